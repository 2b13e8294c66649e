"""Who may call /v1/execute: networks OR bearer tokens, X-Forwarded-For only from trusted proxies,
or the host app's ``authorize`` callable. Units on environ dicts, then through real HTTP."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import time
from typing import Any

import pytest
from mwfixtures import ACCESS_TOKEN, HOST, T, envelope, running_gateway

from runner_mw import access as access_module
from runner_mw.access import (
    ALLOW,
    FORBIDDEN,
    UNAUTHORIZED,
    bearer_token,
    check_access,
    client_address,
    config_warnings,
    token_matches,
)
from runner_mw.config import Access
from runner_mw.loader import config_from_mapping

pytest_plugins = ["mwfixtures"]


def access(networks: tuple[str, ...] | None = None, tokens: tuple[str, ...] = (),
           trusted: tuple[str, ...] = ()) -> Access:
    kwargs: dict[str, Any] = {"tokens": tokens,
                              "trusted_proxies": tuple(ipaddress.ip_network(n) for n in trusted)}
    if networks is not None:
        kwargs["networks"] = tuple(ipaddress.ip_network(n) for n in networks)
    return Access(**kwargs)


def env(peer: str = "127.0.0.1", xff: str | None = None, auth: str | None = None) -> dict[str, Any]:
    environ: dict[str, Any] = {"REMOTE_ADDR": peer}
    if xff is not None:
        environ["HTTP_X_FORWARDED_FOR"] = xff
    if auth is not None:
        environ["HTTP_AUTHORIZATION"] = auth
    return environ


# -- units ---------------------------------------------------------------------------------------


def test_the_default_is_loopback_only() -> None:
    default = config_from_mapping({"version": 1, "backend": "d",
                                   "backends": {"d": {"kind": "docker", "url": "http://x"}}}).access
    assert check_access(env("127.0.0.1"), default, None) == ALLOW
    assert check_access(env("::1"), default, None) == ALLOW
    assert check_access(env("::ffff:127.0.0.1"), default, None) == ALLOW
    for outside in ("10.0.0.1", "192.168.1.10", "127.0.0.2", "2001:db8::1", "", "unix:/sock"):
        assert check_access(env(outside), default, None) == UNAUTHORIZED, outside


def test_ipv4_mapped_networks_in_the_config_match_their_ipv4_peers() -> None:
    # A dual-stack server shows an IPv4 proxy as ::ffff:a.b.c.d, and an operator may copy that
    # form into the config; peers are matched as IPv4, so it matched nothing: the proxy was not
    # trusted, was taken for the client, and (in networks) let every client in.
    def load(**section: Any) -> Access:
        return config_from_mapping({"version": 1, "backend": "d", "access": section,
                                    "backends": {"d": {"kind": "docker", "url": "http://x"}}}).access

    behind = load(networks=["172.28.0.0/16"], trusted_proxies=["::ffff:172.28.0.1/128"])
    assert check_access(env("::ffff:172.28.0.1", xff="203.0.113.9"), behind, None) == UNAUTHORIZED
    assert check_access(env("172.28.0.1", xff="172.28.5.5"), behind, None) == ALLOW
    mapped = load(networks=["::ffff:10.0.0.0/104"])
    assert mapped.networks == (ipaddress.ip_network("10.0.0.0/8"),)
    assert check_access(env("10.1.2.3"), mapped, None) == ALLOW
    assert check_access(env("::ffff:10.1.2.3"), mapped, None) == ALLOW
    assert check_access(env("11.0.0.1"), mapped, None) == UNAUTHORIZED
    assert load(networks=["2001:db8::/32"]).networks == (ipaddress.ip_network("2001:db8::/32"),)


@pytest.mark.parametrize(("host", "allowed"), [
    (None, True), ("localhost", True), ("localhost:8000", True), ("LOCALHOST.", True),
    ("app.localhost:8000", True), ("127.0.0.1:8000", True), ("[::1]:8000", True), ("10.0.0.5", True),
    ("127.1:8000", True), ("2130706433", True), ("::1", True), ("[fe80::1%25eth0]:8000", True),
    ("rebind.attacker.example:8000", False), ("localhost.attacker.example", False),
    ("127.0.0.1.nip.io", False),
])
def test_a_loopback_peer_counts_only_with_a_host_of_this_machine(host: str | None, allowed: bool) -> None:
    # DNS rebinding: a page whose name the attacker points at 127.0.0.1 makes the victim's
    # browser a loopback peer, same-origin with itself (it can read the replies).
    environ = env("127.0.0.1")
    if host is not None:
        environ["HTTP_HOST"] = host
    default = access()
    assert check_access(environ, default, None) == (ALLOW if allowed else UNAUTHORIZED)
    assert check_access(environ, default, None) == (ALLOW if allowed else UNAUTHORIZED)  # remembered
    with_token = access(tokens=("t" * 20,))
    environ["HTTP_AUTHORIZATION"] = "Bearer " + "t" * 20
    assert check_access(environ, with_token, None) == ALLOW  # a token still opens it
    # The same for a peer of any other network (a rebound name may point at a LAN address)...
    lan = {"REMOTE_ADDR": "10.1.2.3", "HTTP_HOST": host or ""}
    assert check_access(lan, access(networks=("10.0.0.0/8",)), None) == (ALLOW if allowed else UNAUTHORIZED)
    # ... but for the names the operator lists in access.hosts.
    listed = dataclasses.replace(access(networks=("10.0.0.0/8",)),
                                 hosts=frozenset({"rebind.attacker.example", "localhost.attacker.example",
                                                  "127.0.0.1.nip.io"}))
    assert check_access(lan, listed, None) == ALLOW


def test_a_peers_remembered_verdict_is_the_networks_own_and_bounded() -> None:
    rules = access(("10.0.0.0/8",))
    for _ in range(2):  # decided, then remembered: the same answers
        assert check_access(env("10.1.2.3"), rules, None) == ALLOW
        assert check_access(env("11.1.2.3"), rules, None) == UNAUTHORIZED
        assert check_access(env("11.1.2.3", auth=f"Bearer {ACCESS_TOKEN}"), rules, None) == UNAUTHORIZED
    assert rules.peers == {"10.1.2.3": True, "11.1.2.3": False}
    # Another config (a reload) decides afresh: nothing is shared with the old one, also
    # when it is derived from this one with other networks.
    assert check_access(env("11.1.2.3"), access(("11.0.0.0/8",)), None) == ALLOW
    stricter = dataclasses.replace(rules, networks=(ipaddress.ip_network("10.9.0.0/16"),))
    assert check_access(env("10.1.2.3"), stricter, None) == UNAUTHORIZED
    for i in range(5000):  # peers from everywhere: at most 4096 remembered, all still right
        assert check_access(env(f"10.0.{i // 256}.{i % 256}"), rules, None) == ALLOW
    assert len(rules.peers) == 4096


@pytest.mark.parametrize(("peer", "xff", "trusted", "expected"), [
    ("10.9.9.9", "1.2.3.4", (), "10.9.9.9"),  # peer not a trusted proxy: XFF ignored
    ("127.0.0.1", "1.2.3.4", (), "127.0.0.1"),  # no trusted proxies at all: XFF ignored
    ("127.0.0.1", "1.2.3.4", ("127.0.0.1/32",), "1.2.3.4"),
    ("127.0.0.1", "6.6.6.6, 1.2.3.4", ("127.0.0.1/32",), "1.2.3.4"),  # the left part is the client's claim
    ("127.0.0.1", "1.2.3.4, 10.0.0.2", ("127.0.0.1/32", "10.0.0.0/8"), "1.2.3.4"),
    ("127.0.0.1", "1.2.3.4,10.0.0.2 , 10.0.0.3", ("127.0.0.1/32", "10.0.0.0/8"), "1.2.3.4"),
    ("127.0.0.1", "10.0.0.5", ("127.0.0.1/32", "10.0.0.0/8"), None),  # all trusted: unknown
    ("127.0.0.1", "127.0.0.1", ("127.0.0.1/32",), None),  # a client's own claim, passed through
    ("::1", "::1, ::1", ("::1/128",), None),
    ("127.0.0.1", "", ("127.0.0.1/32",), None),  # a trusted proxy naming no client: unknown
    ("127.0.0.1", " , ,", ("127.0.0.1/32",), None),
    ("::1", "2001:db8::7", ("::1/128",), "2001:db8::7"),
    ("::ffff:127.0.0.1", "1.2.3.4", ("127.0.0.1/32",), "1.2.3.4"),
])
def test_client_address(peer: str, xff: str, trusted: tuple[str, ...], expected: str | None) -> None:
    want = None if expected is None else ipaddress.ip_address(expected)
    assert client_address(env(peer, xff), access(trusted=trusted)) == want


def test_a_trusted_proxy_that_names_no_client_or_only_proxies_opens_nothing() -> None:
    # nginx's plain proxy_pass sends no X-Forwarded-For: every request would look like the
    # proxy's loopback address, and the default networks (loopback) would let anyone in.
    rules = access(trusted=("127.0.0.1/32",))
    assert check_access(env("127.0.0.1"), rules, None) == UNAUTHORIZED  # no header at all
    # A proxy that passes the client's header through unchanged: the client claims loopback.
    assert check_access(env("127.0.0.1", "127.0.0.1"), rules, None) == UNAUTHORIZED
    environ = env("127.0.0.1", "")
    environ["HTTP_FORWARDED"] = "for=127.0.0.1"  # RFC 7239 is not read: no way around it
    assert check_access(environ, rules, None) == UNAUTHORIZED
    with_token = env("127.0.0.1", "", auth=f"Bearer {ACCESS_TOKEN}")
    assert check_access(with_token, access(trusted=("127.0.0.1/32",), tokens=(ACCESS_TOKEN,)), None) == ALLOW


@pytest.mark.parametrize(("networks", "trusted", "claimable"), [
    (None, (), []),  # no proxy: nothing is read from X-Forwarded-For
    (None, ("127.0.0.1/32",), ["::1/128"]),  # a same-host proxy on IPv4 only
    (None, ("10.0.0.7/32",), ["127.0.0.1/32", "::1/128"]),  # a proxy on another host
    (None, ("127.0.0.0/8", "::1/128"), []),  # every loopback caller is a proxy: claims fail
    (("10.0.0.0/8",), ("10.0.0.7/32",), []),  # a deliberate network, not loopback
    (("::/127", "126.0.0.0/7"), ("10.0.0.7/32",), ["::/127", "126.0.0.0/7"]),  # loopback inside
    (("127.0.0.0/8",), ("127.0.0.0/9", "127.128.0.0/9"), []),  # trusted together, not one by one
], ids=["no-proxy", "v4-proxy", "remote-proxy", "all-loopback-trusted", "office-network",
        "wider-than-loopback", "trusted-in-halves"])
def test_config_warnings_name_the_loopback_networks_a_client_could_claim(
        networks: tuple[str, ...] | None, trusted: tuple[str, ...], claimable: list[str]) -> None:
    warnings = config_warnings(access(networks, trusted=trusted))
    assert [w.split()[1] for w in warnings if w.startswith("access.networks: ")] == claimable
    rules = access(networks, trusted=trusted)
    for net in claimable:  # each warning is a real claim: allowed through a pass-through proxy
        proxy = str(next(iter(ipaddress.ip_network(trusted[0]).hosts()), trusted[0].split("/")[0]))
        claim = str(ipaddress.ip_network(net).network_address)
        assert check_access(env(proxy, claim), rules, None) == ALLOW


@pytest.fixture
def proxy_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Any:
    """The once-per-process warning, reset for one test; returns a reader of its lines."""
    monkeypatch.setattr(access_module, "_proxy_warned", False)
    caplog.set_level(logging.WARNING, logger="runner_mw")
    return lambda: [r.getMessage() for r in caplog.records if "trusted_proxies is empty" in r.getMessage()]


def test_a_forwarding_peer_let_in_by_networks_is_warned_about_once(proxy_warning: Any) -> None:
    rules = access()  # loopback networks, no trusted proxies: the README's "every peer is the proxy"
    assert check_access(env("127.0.0.1"), rules, None) == ALLOW
    assert proxy_warning() == []  # a local caller that forwards nothing
    assert check_access(env("10.9.9.9", "127.0.0.1"), rules, None) == UNAUTHORIZED
    assert proxy_warning() == []  # refused anyway: nothing to warn about
    assert check_access(env("127.0.0.1", "203.0.113.9"), rules, None) == ALLOW  # the rule holds
    (line,) = proxy_warning()
    assert "127.0.0.1" in line and "203.0.113.9" not in line  # the client's value is not logged
    real_ip = env("127.0.0.1")
    real_ip["HTTP_X_REAL_IP"] = "203.0.113.9"
    check_access(real_ip, rules, None)
    check_access(env("127.0.0.1", "203.0.113.10"), rules, None)
    assert len(proxy_warning()) == 1  # once per process


@pytest.mark.parametrize("header", ["X-Real-IP", "Forwarded"])
def test_the_proxy_warning_through_http(kind: str, header: str, proxy_warning: Any) -> None:
    with running_gateway(kind) as gw:
        assert gw.execute().status_code == 200
        assert proxy_warning() == []
        value = "for=203.0.113.9" if header == "Forwarded" else "203.0.113.9"
        assert gw.execute(headers={header: value}).status_code == 200
        assert len(proxy_warning()) == 1


@pytest.mark.parametrize("xff", ["not-an-ip", "1.2.3.4, garbage", "1.2.3.4:8080", "unknown, 10.0.0.2"])
def test_a_garbled_forwarded_chain_is_not_believed(xff: str) -> None:
    rules = access(networks=("0.0.0.0/0",), trusted=("127.0.0.1/32", "10.0.0.0/8"))
    assert client_address(env("127.0.0.1", xff), rules) is None
    assert check_access(env("127.0.0.1", xff), rules, None) == UNAUTHORIZED


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"), ("Bearer", None),
    ("Bearer ", None), ("Basic YWJjOmRlZg==", None), ("abc", None), ("", None),
])
def test_bearer_token(header: str, token: str | None) -> None:
    assert bearer_token({"HTTP_AUTHORIZATION": header}) == token
    assert bearer_token({}) is None


def test_token_matches_any_configured_token() -> None:
    tokens = ("first-token-0123456789", "second-token-0123456789")
    assert token_matches("first-token-0123456789", tokens)
    assert token_matches("second-token-0123456789", tokens)
    for wrong in ("first-token-012345678", "first-token-01234567890", "", "x", "sécond-token"):
        assert not token_matches(wrong, tokens)
    assert not token_matches("anything", ())


def test_tokens_open_access_from_anywhere_but_only_as_bearer() -> None:
    rules = access(networks=(), tokens=(ACCESS_TOKEN,))
    assert check_access(env("8.8.8.8", auth=f"Bearer {ACCESS_TOKEN}"), rules, None) == ALLOW
    assert check_access(env("8.8.8.8", auth="Bearer wrong-token-0123456789"), rules, None) == UNAUTHORIZED
    assert check_access(env("8.8.8.8", auth=f"Basic {ACCESS_TOKEN}"), rules, None) == UNAUTHORIZED
    assert check_access(env("127.0.0.1"), rules, None) == UNAUTHORIZED  # networks: [] closes loopback


def test_authorize_decides_instead_of_networks_and_tokens() -> None:
    rules = access(tokens=(ACCESS_TOKEN,))
    seen: list[Any] = []

    def no(environ: Any) -> bool:
        seen.append(environ)
        return False

    loopback_with_token = env("127.0.0.1", auth=f"Bearer {ACCESS_TOKEN}")
    assert check_access(loopback_with_token, rules, no) == FORBIDDEN
    assert seen == [loopback_with_token]
    assert check_access(env("8.8.8.8"), rules, lambda e: True) == ALLOW


# -- through HTTP --------------------------------------------------------------------------------

OUTSIDE = {"networks": ["10.0.0.0/8"]}  # loopback (every test client) is not allowed


def test_closed_to_non_members_with_a_bearer_challenge(kind: str) -> None:
    with running_gateway(kind, access=OUTSIDE) as gw:
        resp = gw.execute()
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert resp.json() == {"error": "unauthorized", "requestId": resp.headers["X-Request-Id"]}
        assert resp.headers["Cache-Control"] == "no-store"
        assert gw.runner.received == []


def test_a_network_beyond_loopback_without_hosts_is_warned_about() -> None:
    # After the DNS-rebinding guard, its callers that use a name get 401 unless listed.
    (warning,) = config_warnings(access(("127.0.0.1/32", "10.0.0.0/8")))
    assert "lets in 10.0.0.0/8 but access.hosts is empty" in warning
    assert config_warnings(dataclasses.replace(access(("10.0.0.0/8",)), hosts=frozenset({"gw"}))) == []
    assert config_warnings(access()) == []  # loopback only: IP addresses and localhost suffice


def test_behind_a_trusted_proxy_the_forwarded_host_is_checked() -> None:
    # nginx with "proxy_set_header X-Forwarded-Host $host" (and Host rewritten to its upstream).
    rules = access(("10.0.0.0/8",), trusted=("127.0.0.1/32",))
    rebound = {**env("127.0.0.1", "10.1.2.3"), "HTTP_HOST": "127.0.0.1:8000",
               "HTTP_X_FORWARDED_HOST": "rebind.attacker.example"}
    assert check_access(rebound, rules, None) == UNAUTHORIZED
    local = {**rebound, "HTTP_X_FORWARDED_HOST": "10.0.0.5:8443, localhost"}
    assert check_access(local, rules, None) == ALLOW


@pytest.mark.parametrize("forwarded", ["localhost", "127.0.0.1", "localhost, rebind.attacker.example",
                                       ", rebind.attacker.example", " ", ",", "[::1]:8000"])
def test_a_forwarded_host_a_client_sent_through_the_proxy_never_widens_the_grant(forwarded: str) -> None:
    # nginx with only "proxy_set_header Host $host" passes the client's X-Forwarded-Host
    # through; Apache appends to it. Host is checked anyway; the header can only narrow.
    rules = access(("10.0.0.0/8",), trusted=("127.0.0.1/32",))
    rebound = {**env("127.0.0.1", "10.1.2.3"), "HTTP_HOST": "rebind.attacker.example",
               "HTTP_X_FORWARDED_HOST": forwarded}
    assert check_access(rebound, rules, None) == UNAUTHORIZED
    empty = {**env("127.0.0.1", "10.1.2.3"), "HTTP_HOST": "127.0.0.1", "HTTP_X_FORWARDED_HOST": ", x"}
    assert check_access(empty, rules, None) == UNAUTHORIZED  # an empty value is no pass
    # From a peer that is not a trusted proxy, X-Forwarded-Host is the client's word: not read.
    direct = {"REMOTE_ADDR": "10.1.2.3", "HTTP_HOST": "rebind.attacker.example",
              "HTTP_X_FORWARDED_HOST": "localhost"}
    assert check_access(direct, rules, None) == UNAUTHORIZED


def test_access_hosts_come_from_the_config_lowercased() -> None:
    backends = {"d": {"kind": "docker", "url": "http://x"}}
    loaded = config_from_mapping({"version": 1, "backend": "d", "backends": backends,
                                  "access": {"networks": ["10.0.0.0/8"],
                                             "hosts": ["Gateway", "app.internal", "runner_mw_gateway_1"]}})
    assert loaded.access.hosts == frozenset({"gateway", "app.internal", "runner_mw_gateway_1"})
    peer = {"REMOTE_ADDR": "10.1.2.3"}
    assert check_access({**peer, "HTTP_HOST": "GATEWAY:8000"}, loaded.access, None) == ALLOW
    assert check_access({**peer, "HTTP_HOST": "gateway.evil.example"}, loaded.access, None) == UNAUTHORIZED


def test_a_dns_rebound_name_is_not_let_in_as_loopback(kind: str) -> None:
    with running_gateway(kind) as gw:
        rebound = {"Host": f"rebind.attacker.example:{gw.port}"}
        assert gw.execute(headers=rebound).status_code == 401
        assert gw.get("/runner/-/status", headers=rebound).status_code == 401
        assert gw.runner.received == []
        assert gw.get("/runner/-/status", headers={"Host": f"localhost:{gw.port}"}).status_code == 200
        assert gw.execute().status_code == 200  # Host 127.0.0.1:<port>, as any local client sends


@pytest.mark.parametrize(("xff", "trusted", "allowed"), [
    ("10.1.2.3", [], False),  # from an untrusted peer: ignored
    ("10.1.2.3", ["127.0.0.1/32"], True),
    ("10.1.2.3, 192.168.1.1", ["127.0.0.1/32", "192.168.0.0/16"], True),
    ("10.1.2.3, 8.8.8.8", ["127.0.0.1/32", "192.168.0.0/16"], False),  # spoofed left part
    ("garbage, 192.168.1.1", ["127.0.0.1/32", "192.168.0.0/16"], False),
], ids=["untrusted-peer", "trusted-proxy", "trusted-chain", "spoofed", "garbled"])
def test_forwarded_for_through_http(kind: str, xff: str, trusted: list[str], allowed: bool) -> None:
    with running_gateway(kind, access={**OUTSIDE, "trusted_proxies": trusted}) as gw:
        resp = gw.execute(headers={"X-Forwarded-For": xff})
        assert resp.status_code == (200 if allowed else 401), resp.text
        assert len(gw.runner.received) == (1 if allowed else 0)
        if allowed:
            assert "x-forwarded-for" not in gw.runner.received[0].headers


def test_repeated_forwarded_for_lines_count_as_one_chain(kind: str) -> None:
    with running_gateway(kind, access={**OUTSIDE, "trusted_proxies": ["127.0.0.1/32"]}) as gw:
        ok = gw.raw("POST", "/v1/execute", [("Content-Type", "application/json"),
                                            ("X-Forwarded-For", "8.8.8.8"), ("X-Forwarded-For", "10.1.2.3")],
                    body=b'{"context": {}}')
        assert ok.status == 400  # past the access check: the envelope is refused
        spoof = gw.raw("POST", "/v1/execute",
                       [("Content-Type", "application/json"), ("X-Forwarded-For", "10.1.2.3"),
                        ("X-Forwarded-For", "8.8.8.8")], body=b'{"context": {}}')
        assert spoof.status == 401


@pytest.mark.parametrize(("auth", "status"), [
    (f"Bearer {ACCESS_TOKEN}", 200), (f"bearer {ACCESS_TOKEN}", 200),
    ("Bearer wrong-token-0123456789abc", 401), (f"Basic {ACCESS_TOKEN}", 401), (ACCESS_TOKEN, 401),
    (f"Bearer {ACCESS_TOKEN[:-1]}", 401), (f"Bearer {ACCESS_TOKEN}x", 401),
])
def test_bearer_tokens_through_http(kind: str, auth: str, status: int) -> None:
    tokens = ["other-token-0123456789", ACCESS_TOKEN]
    with running_gateway(kind, access={"networks": [], "tokens": tokens}) as gw:
        resp = gw.execute(headers={"Authorization": auth})
        assert resp.status_code == status, resp.text
        if status == 200:
            (got,) = gw.runner.received
            assert "authorization" not in got.headers  # the credential stops at the gateway
            assert ACCESS_TOKEN not in repr(got)
        else:
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert gw.runner.received == []


def test_a_token_in_the_query_is_not_a_credential(kind: str) -> None:
    with running_gateway(kind, access={"networks": [], "tokens": [ACCESS_TOKEN]}) as gw:
        assert gw.execute(params={"access_token": ACCESS_TOKEN}).status_code == 401


def test_authorize_callable_through_http(kind: str) -> None:
    calls: list[dict[str, Any]] = []

    def authorize(environ: Any) -> bool:
        calls.append(dict(environ))
        return environ.get("HTTP_X_SESSION") == "valid-session"

    with running_gateway(kind, authorize=authorize, access={"networks": [], "tokens": [ACCESS_TOKEN]}) as gw:
        ok = gw.execute(headers={"X-Session": "valid-session"})
        assert ok.status_code == 200
        denied = gw.execute(headers={"Authorization": f"Bearer {ACCESS_TOKEN}"})  # authorize decides
        assert denied.status_code == 403
        assert denied.json()["error"] == "forbidden" and "WWW-Authenticate" not in denied.headers
        assert len(gw.runner.received) == 1
        assert calls[0]["PATH_INFO"] == "/v1/execute" and calls[0]["REMOTE_ADDR"] == HOST


def test_access_is_decided_before_the_content_type_and_the_body(kind: str) -> None:
    with running_gateway(kind, access=OUTSIDE, limits={"max_body_bytes": 1000}) as gw:
        assert gw.execute(b"not json", headers={"Content-Type": "text/plain"}).status_code == 401
        # Headers announcing a gigabyte, and no body: the refusal comes without reading it.
        started = time.monotonic()
        with socket.create_connection((HOST, gw.port), timeout=T) as sock:
            sock.sendall(b"POST /v1/execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000000000\r\n\r\n")
            head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 401") and time.monotonic() - started < T / 2
        assert gw.runner.received == []


def test_authorized_requests_still_need_a_valid_envelope(kind: str) -> None:
    with running_gateway(kind, authorize=lambda e: True) as gw:
        bad = envelope()
        del bad["context"]["tenant_id"]
        assert gw.execute(bad).status_code == 400
        assert gw.runner.received == []


def test_only_the_right_most_forwarded_hops_are_read() -> None:
    # A chain of thousands of trusted addresses was parsed whole: 355 ms a request.
    from runner_mw.access import MAX_HOPS

    rule = access(("10.0.0.0/8",), trusted=("127.0.0.1/32",))
    near = ", ".join(["127.0.0.1"] * (MAX_HOPS - 1))
    assert client_address(env(xff=f"10.1.2.3, {near}"), rule) == ipaddress.ip_address("10.1.2.3")
    far = ", ".join(["127.0.0.1"] * MAX_HOPS)  # the client beyond the hops read: unknown
    assert client_address(env(xff=f"10.1.2.3, {far}"), rule) is None
    ignored = "garbage, " * 100_000  # left of the hops read: never parsed
    assert client_address(env(xff=f"{ignored}10.1.2.3"), rule) == ipaddress.ip_address("10.1.2.3")


def test_a_long_host_is_not_remembered() -> None:
    # Keyed by the whole Host, 1024 entries of 737 KB each: +717 MB kept.
    rule = access(("127.0.0.0/8",))
    huge = "a" * 100_000 + ".example"
    assert check_access({**env(), "HTTP_HOST": huge}, rule, None) == UNAUTHORIZED
    assert huge not in rule.host_ok
    assert check_access({**env(), "HTTP_HOST": "localhost:8000"}, rule, None) == ALLOW
    assert "localhost:8000" in rule.host_ok
