"""Which backend kinds exist: the built-in ones plus the ``runner_mw.backends`` entry points.

Use ``known_kinds()`` to list them and ``build_backend(settings)`` to make one.
A plugin registers a kind in its own packaging::

    entry_points={"runner_mw.backends": ["mykind=my_pkg.backend:MyBackend"]}

where ``MyBackend`` subclasses ``RunnerBackend`` and returns the JSON Schema of
its settings from ``settings_schema()``, so its entries are validated as strictly
as the built-in ones.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner_mw.backends.base import RunnerBackend
    from runner_mw.config import BackendSettings, Config

log = logging.getLogger("runner_mw")
ENTRY_POINT_GROUP = "runner_mw.backends"
BUILTIN_KINDS = ("docker", "knative")  # their settings are the main schema's (a plugin's are its own)


def _builtin() -> dict[str, type[RunnerBackend]]:
    from runner_mw.backends.docker import DockerBackend
    from runner_mw.backends.knative import KnativeBackend

    return {"docker": DockerBackend, "knative": KnativeBackend}


@cache
def _scan() -> tuple[dict[str, type[RunnerBackend]], dict[str, str]]:
    from runner_mw.backends.base import RunnerBackend

    kinds = _builtin()
    broken: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in kinds:
            continue  # the built-ins (also declared as entry points) cannot be replaced
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not break the gateway
            log.warning("backend plugin %r could not be loaded: %s", ep.name, exc)
            broken[ep.name] = f"{type(exc).__name__}: {exc}"
            continue
        if not (isinstance(cls, type) and issubclass(cls, RunnerBackend)):
            log.warning("backend plugin %r is not a RunnerBackend subclass; skipped", ep.name)
            broken[ep.name] = f"{ep.value} is not a RunnerBackend subclass"
            continue
        kinds[ep.name] = cls
    return kinds, broken


def known_kinds() -> dict[str, type[RunnerBackend]]:
    """Every usable kind by name. A plugin that fails to import is logged and skipped."""
    return _scan()[0]


def broken_kinds() -> dict[str, str]:
    """The kinds a plugin registers but that could not be used, and why (for config errors)."""
    return _scan()[1]


def backend_class(kind: str) -> type[RunnerBackend] | None:
    """The class of ``kind``, or None when no such kind is known."""
    return known_kinds().get(kind)


def build_backend(settings: BackendSettings) -> RunnerBackend:
    """Make the backend for one validated entry (no I/O: pools open lazily)."""
    cls = backend_class(settings.kind)
    if cls is None:  # the loader refuses unknown kinds, so this is a programming error
        raise LookupError(f"unknown backend kind {settings.kind!r}")
    return cls(settings)


def trial_build(config: Config) -> None:
    """Build the active backend of a validated config and close it, to find what only its
    constructor finds (a plugin's own checks) before anyone relies on the config: the
    gunicorn master before it publishes a file, ``runner-mw check`` and ``reload``. Raises
    ``ConfigError`` naming the entry, the constructor's text redacted (it may quote a
    secret). The built-in kinds open nothing (pools open lazily; a plugin's constructor is its
    own business); a ``close()`` that raises is a warning,
    not a failure: close is for a backend that served, and the file is fine."""
    from runner_mw.errors import ConfigError, ConfigIssue
    from runner_mw.logs import redacted

    try:
        backend = build_backend(config.active)
    except Exception as exc:
        text = redacted(f"{type(exc).__name__}: {exc}", config)
        raise ConfigError([ConfigIssue(config.source, None, f"backends.{config.backend}",
                                       f"the backend cannot be built: {text}")]) from None
    try:
        backend.close()
    except Exception as exc:
        log.warning("runner_mw: backend %r: close() of an unused instance raised %s (ignored)",
                    config.backend, type(exc).__name__)
