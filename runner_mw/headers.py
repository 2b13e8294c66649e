"""Header policy both ways: allow-lists to the runner, hop-by-hop and cookie removal back.

Use ``request_headers`` to build what is sent upstream from a WSGI environ and
``response_headers`` to filter what the runner sent before it reaches the client.
The rules (design doc, "Security rules"): drop the headers named in
``Connection`` first, then the hop-by-hop ones, then add ours; never forward the
client's ``Authorization``, cookies or a client-supplied service token; keep each
``Set-Cookie`` separate (assets drop them all: the UI runs on the host's origin, and so
do the headers that would act on that whole origin, ``ORIGIN_WIDE``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
SERVICE_TOKEN = "x-runner-service-token"

#: Request headers passed to ``/runner/*`` (the reference gateway's list, plus tracing, plus
#: ``if-range``: a Range without its If-Range would turn a conditional request unconditional).
ASSET_REQUEST_ALLOW = frozenset({
    "accept", "accept-encoding", "accept-language", "if-none-match", "if-modified-since",
    "range", "if-range", "user-agent", "traceparent", "tracestate",
})
#: Request headers passed to ``/v1/execute`` (plus every ``x-alga-*``). No accept-encoding:
#: the gateway reads the reply (to reduce error texts), so it asks for identity.
EXECUTE_REQUEST_ALLOW = frozenset({
    "accept", "content-type", "user-agent", "x-request-id", "x-idempotency-key",
    "traceparent", "tracestate",
})
# Set by the WSGI server or by us; a runner's copy would duplicate them.
# Credentials a runner or an ingress in front of it may echo (the service token among them)
# never reach a browser either.
# And headers that act on the whole origin, not on this one response: on the host app's origin
# a runner could wipe the app's cookies and storage (Clear-Site-Data, honoured even from a
# sandboxed frame), pin HSTS or alternative services, widen a service worker's scope, or
# collect the origin's error reports. (A Refresh that names a target is a redirect: see
# ``assets._relocate``.)
ORIGIN_WIDE = frozenset({
    "clear-site-data", "strict-transport-security", "alt-svc", "service-worker-allowed",
    "nel", "report-to", "reporting-endpoints", "origin-agent-cluster",
    "accept-ch", "critical-ch", "set-login", "public-key-pins", "public-key-pins-report-only",
    "expect-ct",
})
_RESPONSE_DROP = HOP_BY_HOP | ORIGIN_WIDE | {
    "set-cookie", "set-cookie2", "server", "date", "x-request-id", SERVICE_TOKEN, "authorization",
    "proxy-authorization",
}

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def connection_tokens(value: str | None) -> frozenset[str]:
    """Header names listed in a ``Connection`` header (lower-cased)."""
    if not value:
        return frozenset()
    if len(value) > _CACHED_CONNECTION:
        # Not remembered: a cache bounded in entries only kept 256 of whatever size a client
        # sends (gunicorn joins 100 fields of 8 KB): 860 MB a worker kept for good.
        return _tokens(value)
    return _cached_tokens(value)


_CACHED_CONNECTION = 128


def _tokens(value: str) -> frozenset[str]:
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


_cached_tokens = functools.lru_cache(maxsize=256)(_tokens)  # nearly always "keep-alive" or "close"


# Per allow policy, an environ key -> the header name it goes upstream as, or "" (not a
# header, not a token, hop-by-hop, off the list): decided once per key, not per request.
# Bounded: keys come from clients, but the usual few dozen fill it and then every request
# hits (a browser's dozen headers: 12 -> 7 us).
_DECISIONS: dict[tuple[frozenset[str], str | None], dict[str, str]] = {}


def _decisions(allow: frozenset[str], allow_prefix: str | None) -> dict[str, str]:
    policy = (allow, allow_prefix)
    found = _DECISIONS.get(policy)
    if found is None:
        found = {}
        if len(_DECISIONS) < 16:
            _DECISIONS[policy] = found
    return found


def _decide(key: str, allow: frozenset[str], allow_prefix: str | None) -> str:
    if key[:5] != "HTTP_":
        return ""  # CONTENT_TYPE is looked at on its own; the rest are not headers
    name = key[5:].replace("_", "-").lower()
    if not _TOKEN.fullmatch(name) or name in HOP_BY_HOP:
        return ""
    if name in allow or (allow_prefix is not None and name.startswith(allow_prefix)):
        return name
    return ""


def request_headers(environ: Mapping[str, Any], allow: frozenset[str], *,
                    allow_prefix: str | None = None) -> dict[str, str]:
    """The client headers that may go upstream: Connection-listed dropped, then hop-by-hop,
    then everything off the allow-list (cookies, authorization, the service token...)."""
    # The client's headers are the environ's HTTP_* keys and CONTENT_TYPE.
    named = connection_tokens(environ.get("HTTP_CONNECTION"))
    decisions = _decisions(allow, allow_prefix)
    out: dict[str, str] = {}
    for key, value in environ.items():
        name = decisions.get(key)
        if name is None:
            name = _decide(key, allow, allow_prefix)
            if len(decisions) < 1024:
                decisions[key] = name
        if name and name not in named and not has_ctl(value):
            out[name] = value
    ctype = environ.get("CONTENT_TYPE")
    if ctype and "content-type" in allow and "content-type" not in named and not has_ctl(ctype):
        out["content-type"] = ctype
    return out


# What becomes of a response header, by its name as the runner spelled it: decided once per
# spelling (a lower() and a set test for every header of every reply cost 3 us an asset).
# Bounded: the names are the runner's choice.
_PASS, _DROP, _CONNECTION, _LOCATION = 0, 1, 2, 3
_RESPONSE_KINDS: dict[str, int] = {}


def _response_kind(name: str) -> int:
    low = name.lower()
    kind = (_CONNECTION if low == "connection" else _DROP if low in _RESPONSE_DROP
            else _LOCATION if low in ("location", "refresh") else _PASS)
    if len(_RESPONSE_KINDS) < 1024:
        _RESPONSE_KINDS[name] = kind
    return kind


def response_headers(headers: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, str]], bool]:
    """The runner's response headers minus Connection-listed, hop-by-hop, cookies and
    the ones the server or the gateway sets itself (order and duplicates kept), and whether
    a ``Location`` or ``Refresh`` may be among them (False: certainly none, nothing to rewrite)."""
    out: list[tuple[str, str]] = []
    named: set[str] = set()
    location = False
    kinds = _RESPONSE_KINDS
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = _response_kind(name)
        if kind != _PASS:
            if kind == _CONNECTION:  # dropped (hop-by-hop); what it names goes too
                named |= connection_tokens(value) - _RESPONSE_DROP
                continue
            if kind == _DROP:
                continue
            location = True
        out.append((name, value))
    if named:  # beyond "keep-alive" or "close", which are dropped anyway: rare
        out = [(n, v) for n, v in out if n.lower() not in named]
    # One check over every value (a space joins them: it is allowed) finds none, almost always.
    if has_ctl(" ".join([v for _, v in out])):
        out = [(n, v) for n, v in out if not has_ctl(v)]
    return out, location


def has_ctl(value: str) -> bool:
    """Whether ``value`` holds a control character other than HTAB: not allowed in a field
    value (RFC 9110, 5.5), and CR or LF would split a header in two."""
    # isprintable() is true only without any control character, and ten times faster
    # than the search; only text with a tab (or a non-printable letter) needs the search.
    return not value.isprintable() and _CTL.search(value) is not None


_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
