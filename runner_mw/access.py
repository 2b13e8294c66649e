"""Who may call ``/v1/execute`` and ``/runner/-/status|metrics``.

Use ``check_access`` on those routes. The rule (design doc): the peer is in
``access.networks`` (default loopback only) OR it presents one of
``access.tokens`` as ``Authorization: Bearer``; a host app's
``authorize(environ) -> bool`` decides instead when given. ``X-Forwarded-For`` is
believed only when the direct peer is in ``access.trusted_proxies``: behind a
reverse proxy every peer is the proxy, so without that setting everyone would
look like loopback.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

from runner_mw.config import Access

Authorize = Callable[[Mapping[str, Any]], bool]
log = logging.getLogger("runner_mw")
MAX_HOPS = 32  # X-Forwarded-For hops read, from the right (see client_address)

ALLOW = 200
UNAUTHORIZED = 401  # no usable credentials: the client may retry with a token
FORBIDDEN = 403  # credentials understood, caller not allowed


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(environ: Mapping[str, Any], access: Access) -> IPAddress | None:
    """The client's address: the peer, or the right-most X-Forwarded-For hop that is not
    a trusted proxy when (and only when) the peer is one; None when unknown (a trusted
    proxy that sent no X-Forwarded-For, a garbled chain, no usable peer address)."""
    addr = _parse_ip(environ.get("REMOTE_ADDR", ""))
    if addr is None:
        return None  # a unix socket or an unknown peer: never in a network
    if not access.trusted_proxies or not _in(addr, access.trusted_proxies):
        return addr
    forwarded = ",".join(v for k, v in environ.items() if k == "HTTP_X_FORWARDED_FOR")
    # Only the right-most hops can matter (each one left of a client is that client's own
    # word): a chain of thousands, all trusted addresses, cost 355 ms a request parsed whole.
    hops = [h.strip() for h in forwarded.rsplit(",", MAX_HOPS)[-MAX_HOPS:] if h.strip()]
    if not hops:
        # A trusted proxy that names no client (nginx's plain proxy_pass sends no
        # X-Forwarded-For; RFC 7239 Forwarded is not read): the client is unknown, not the
        # proxy, whose loopback address would open /v1/execute to everyone behind it.
        return None
    for hop in reversed(hops):
        try:
            addr = ipaddress.ip_address(hop)
        except ValueError:
            return None  # a garbled chain is not believed at all
        if not _in(addr, access.trusted_proxies):
            return addr
    # Every hop a trusted proxy: either a request that began on a proxy's own host, or a
    # client's own X-Forwarded-For passed through by a proxy that does not append to it
    # (nginx's plain proxy_pass): "127.0.0.1" from anywhere. Not told apart: unknown.
    return None


def check_access(environ: Mapping[str, Any], access: Access, authorize: Authorize | None) -> int:
    """``ALLOW``, ``UNAUTHORIZED`` or ``FORBIDDEN`` for one request."""
    if authorize is not None:
        return ALLOW if authorize(environ) else FORBIDDEN
    # Without trusted proxies the verdict is a function of REMOTE_ADDR alone: made once per
    # peer (ipaddress's containment test is pure Python, 2 us), at most 4096 remembered.
    peer = None if access.trusted_proxies else environ.get("REMOTE_ADDR", "")
    allowed = access.peers.get(peer) if peer is not None else None
    if allowed is None:
        addr = client_address(environ, access)
        allowed = addr is not None and _in(addr, access.networks)
        if peer is not None and len(access.peers) < 4096:
            access.peers[peer] = allowed
    if allowed and _hosts_allowed(environ, access):
        if peer is not None and not _proxy_warned and _forwarded(environ):
            _warn_proxy_in_front(peer)
        return ALLOW
    token = bearer_token(environ)
    if token is not None and access.tokens and token_matches(token, access.tokens):
        return ALLOW
    return UNAUTHORIZED


def _hosts_allowed(environ: Mapping[str, Any], access: Access) -> bool:
    """``Host`` allowed, and from a trusted proxy every ``X-Forwarded-Host`` value too. Both:
    a proxy may pass the client's own X-Forwarded-Host through (nginx unless told to set it;
    Apache appends to it), so that header can only narrow the grant, never widen it. (A proxy
    that rewrites Host and sends no X-Forwarded-Host, nginx's plain ``proxy_pass``, hides the
    client's: the README asks for ``proxy_set_header Host $host``.)"""
    if not _host_allowed(environ.get("HTTP_HOST"), access):
        return False
    forwarded = environ.get("HTTP_X_FORWARDED_HOST")
    if forwarded is None or not access.trusted_proxies:
        return True
    peer = _parse_ip(environ.get("REMOTE_ADDR", ""))
    if peer is None or not _in(peer, access.trusted_proxies):
        return True  # the client's own header, from no proxy: not read
    values = [v.strip() for v in str(forwarded).split(",")]
    return all(v and _host_allowed(v, access) for v in values)  # an empty value is no pass


def _host_allowed(host: str | None, access: Access) -> bool:
    """Whether a grant by ``networks`` holds with this ``Host``. DNS rebinding: a web page
    whose name the attacker points at an allowed address (127.0.0.1, a LAN address) makes
    the victim's browser an allowed peer, same-origin with itself, so it may read the
    replies; it cannot make the browser send an IP address, ``localhost`` or a name the
    operator listed in ``access.hosts``. Decided once per Host string (bounded)."""
    if not host:
        return True  # no browser leaves Host out
    known = access.host_ok.get(host)
    if known is None:
        known = _local_host(host) or _name(host) in access.hosts
        if len(access.host_ok) < 1024 and len(host) <= 300:  # a name is at most 253, a port 6
            access.host_ok[host] = known
        if not known:
            _warn_host(host)
    return known


def _name(host: str) -> str:
    if host.startswith("["):
        return host.rpartition("]")[0][1:].lower()
    # An unbracketed IPv6 address has more than one colon (and no port).
    return (host if host.count(":") > 1 else host.partition(":")[0]).rstrip(".").lower()


_host_warned = False


def _warn_host(host: str) -> None:
    global _host_warned
    if not _host_warned:
        _host_warned = True
        log.warning("runner_mw: a request from a peer that access.networks lets in named Host %.80r, "
                    "which is not an IP address, localhost or in access.hosts: refused (a guard "
                    "against DNS rebinding; a token still lets it in). List the names your own "
                    "callers use in access.hosts. Logged once per process.", host)


def _local_host(host: str) -> bool:
    """Whether a ``Host`` header can only have been written for this machine's addresses:
    an IP address, ``localhost`` or ``*.localhost``."""
    name = _name(host)
    try:
        ipaddress.ip_address(name.partition("%")[0])
        return True
    except ValueError:
        # curl sends "127.1" or "2130706433" as written; a browser writes them as dotted
        # quads, so a rebound page cannot send these forms.
        return name == "localhost" or name.endswith(".localhost") or _ipv4_shorthand(name)


def _ipv4_shorthand(name: str) -> bool:
    try:
        socket.inet_aton(name)
    except OSError:
        return False
    return True


# Set once the warning below was logged: once per process is enough to be seen, and
# a busy proxy would otherwise write it on every request.
_proxy_warned = False


def _forwarded(environ: Mapping[str, Any]) -> bool:
    return ("HTTP_X_FORWARDED_FOR" in environ or "HTTP_FORWARDED" in environ
            or "HTTP_X_REAL_IP" in environ)


def _warn_proxy_in_front(peer: str) -> None:
    """The README's loudest warning, at the moment it applies: a peer that ``networks`` lets
    in forwards requests for others, and nothing says which of them to believe."""
    global _proxy_warned
    _proxy_warned = True
    # The header values are the client's: not logged.
    log.warning("runner_mw: a request from %s, which access.networks lets in, carried "
                "X-Forwarded-For, Forwarded or X-Real-IP, and access.trusted_proxies is empty: "
                "if that peer is a reverse proxy, every client behind it is let in as %s. Set "
                "access.trusted_proxies to the proxy's address and require tokens (README: "
                "'Behind a reverse proxy'). Logged once per process.", peer, peer)


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def config_warnings(access: Access) -> list[str]:
    """What a valid ``access`` section still gets a warning for (``runner-mw check`` prints
    them, every load logs them): with ``trusted_proxies`` set, loopback addresses in
    ``networks`` that are not trusted proxies. Behind a proxy no real client has one, but a
    client can claim one through a proxy that passes its own ``X-Forwarded-For`` through
    (the README asks for a proxy that appends or overwrites), and so can any host inside
    ``trusted_proxies``."""
    warnings = []
    if not access.hosts and any(not net.subnet_of(loop) for net in access.networks  # type: ignore[arg-type]
                                for loop in _LOOPBACK if net.version == loop.version):
        warnings.append(
            f"access.networks lets in {', '.join(str(n) for n in access.networks if not n.is_loopback)} "
            "but access.hosts is empty: a caller there that names this gateway by a DNS name "
            "gets 401 (a guard against DNS rebinding); list those names in access.hosts")
    if not access.trusted_proxies:
        return warnings
    trusted = list(ipaddress.collapse_addresses(
        [n for n in access.trusted_proxies if n.version == 4])) + list(ipaddress.collapse_addresses(
        [n for n in access.trusted_proxies if n.version == 6]))
    for net in access.networks:
        for loop in _LOOPBACK:
            if net.version != loop.version or not net.overlaps(loop):
                continue
            claimable = net if net.prefixlen >= loop.prefixlen else loop  # the loopback part
            if not any(claimable.version == t.version and claimable.subnet_of(t)  # type: ignore[arg-type]
                       for t in trusted):
                warnings.append(
                    f"access.networks: {net} holds loopback addresses that are not trusted proxies: "
                    "no real client behind a proxy has one, but a client can claim one through a "
                    "proxy that passes X-Forwarded-For through, and so can any host inside "
                    "trusted_proxies; remove it, or make sure the proxy appends to the header or "
                    "overwrites it and trusted_proxies holds the proxies alone")
    return warnings


def bearer_token(environ: Mapping[str, Any]) -> str | None:
    header = str(environ.get("HTTP_AUTHORIZATION", ""))
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(token: str, tokens: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured token (no early exit)."""
    given = token.encode("utf-8", "surrogateescape")
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(given, candidate.encode("utf-8"))
    return found


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> IPAddress | None:
    # Cached: the same few peers (a proxy, a load balancer) send nearly every request.
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_network(text: str) -> Any:
    """``text`` as an ``ipaddress`` network, for ``networks`` and ``trusted_proxies``. An
    IPv4-mapped IPv6 one (``::ffff:10.0.0.0/104``, as a dual-stack server shows an IPv4 peer)
    becomes the IPv4 network it maps: peers are matched as IPv4, so that form, left as it is,
    would match nothing (a proxy listed so would not be trusted, and be taken for the client)."""
    net = ipaddress.ip_network(text)
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        return ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return net


def _in(addr: IPAddress, networks: tuple[Any, ...]) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)
