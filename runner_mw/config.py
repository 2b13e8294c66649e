"""The validated configuration as frozen dataclasses, with the defaults.

Use ``runner_mw.loader.load_config`` (a file) or ``config_from_mapping`` (settings
kept in code) to get a ``Config``; never build these by hand. A ``Config`` never
changes after it is built: a reload builds a new one and swaps it in whole, so a
request that started with one config finishes with the same one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Defaults live here; the schema documents them ("default" keywords) and a test
# checks that the two agree.
DEFAULT_CONNECT_MS = 2000
DEFAULT_READ_MS = 30000  # the reference gateway's EXT_GATEWAY_TIMEOUT_MS
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024  # the runner's own JSON limit
DEFAULT_MAX_REPLY_BYTES = 8 * 1024 * 1024
DEFAULT_POOL_SIZE = 16
DEFAULT_POOL_WAIT_MS = 1000
DEFAULT_PUBLIC_BASE = "/runner"
DEFAULT_ASSET_PREFIXES = ("ext-ui/",)
DEFAULT_NETWORKS = ("127.0.0.1/32", "::1/128")  # closed by default except from loopback
DEFAULT_RETRY_ATTEMPTS = 3
DEFAULT_RETRY_BUDGET_MS = 10000
DEFAULT_RETRY_BACKOFF_MS = 100


@dataclass(frozen=True)
class Timeouts:
    """Upstream timeouts: ``connect_ms`` bounds the connect; ``read_ms`` is the total
    deadline of an execute call; for assets it bounds the reply head, then each silence."""

    connect_ms: int = DEFAULT_CONNECT_MS
    read_ms: int = DEFAULT_READ_MS


@dataclass(frozen=True)
class Retry:
    """Bounded retry of requests that were never sent (Knative scale-from-zero)."""

    attempts: int = DEFAULT_RETRY_ATTEMPTS
    budget_ms: int = DEFAULT_RETRY_BUDGET_MS
    backoff_ms: int = DEFAULT_RETRY_BACKOFF_MS


@dataclass(frozen=True)
class BackendSettings:
    """One entry of ``backends``, with the shared settings already merged in."""

    name: str
    kind: str
    url: str
    public_base: str = DEFAULT_PUBLIC_BASE
    timeouts: Timeouts = Timeouts()
    service_token: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None
    host: str | None = None
    retry: Retry = Retry(attempts=1)
    pool_size: int = DEFAULT_POOL_SIZE
    pool_wait_ms: int = DEFAULT_POOL_WAIT_MS
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    #: The entry as written (after interpolation), for plugin kinds' own keys.
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)


@dataclass(frozen=True)
class Access:
    """Who may call /v1/execute and the status/metrics endpoints."""

    networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in DEFAULT_NETWORKS)
    tokens: tuple[str, ...] = field(default=(), repr=False)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    #: Host names (lowercase, no port) a request let in by ``networks`` may name.
    hosts: frozenset[str] = frozenset()
    #: Peer address -> in ``networks`` (``access.check_access``; no proxies only).
    #: Not an init field: ``dataclasses.replace`` with other networks starts an empty one.
    peers: dict[str, bool] = field(default_factory=dict, init=False, compare=False, repr=False)
    #: Host header -> whether a grant by ``networks`` holds with it (``access.check_access``).
    host_ok: dict[str, bool] = field(default_factory=dict, init=False, compare=False, repr=False)


@dataclass(frozen=True)
class Config:
    """A whole validated configuration. ``active`` is the backend requests go to."""

    backend: str
    backends: Mapping[str, BackendSettings]
    timeouts: Timeouts = Timeouts()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    asset_prefixes: tuple[str, ...] = DEFAULT_ASSET_PREFIXES
    expose_runner_errors: bool = False
    access: Access = Access()
    metrics_enabled: bool = True
    log_format: str = "text"
    access_log: bool = True
    #: Where it came from (a file path or "<mapping>") and the sha256 of the source text
    #: (and of the secret files and CA bundles it names, when it names any: see the loader).
    source: str = "<mapping>"
    sha256: str = ""
    #: The validated data after interpolation: what a gunicorn master hands its workers.
    data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    def __post_init__(self) -> None:
        # The middleware matches with str.startswith(tuple): a list from code (say, in
        # dataclasses.replace) must work as the loader's tuple does, not fail every request.
        if not isinstance(self.asset_prefixes, tuple):
            object.__setattr__(self, "asset_prefixes", tuple(self.asset_prefixes))

    @property
    def active(self) -> BackendSettings:
        return self.backends[self.backend]


#: Keys whose values are secrets: never logged, echoed in errors or re-read as YAML.
SECRET_KEYS = frozenset({"service_token", "tokens"})


def redacted(data: Any) -> Any:
    """A copy of config data with every secret replaced by ``***`` (for logs and summaries)."""
    if isinstance(data, Mapping):
        out = {}
        for key, value in data.items():
            if key in SECRET_KEYS and value not in (None, "", []):
                out[key] = [("***") for _ in value] if isinstance(value, list) else "***"
            else:
                out[key] = redacted(value)
        return out
    if isinstance(data, list):
        return [redacted(v) for v in data]
    return data
