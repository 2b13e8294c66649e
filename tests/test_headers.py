"""Header policy both ways: allow-lists to the runner, hop-by-hop and cookie removal back.
Units on ``runner_mw.headers``, then through real HTTP for both routes."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mwfixtures import INDEX, SERVICE_TOKEN, Gateway, running_gateway

from runner_mw import headers as headers_module
from runner_mw.headers import (
    ASSET_REQUEST_ALLOW,
    EXECUTE_REQUEST_ALLOW,
    HOP_BY_HOP,
    connection_tokens,
    request_headers,
    response_headers,
)

pytest_plugins = ["mwfixtures"]

Q = "?tenant=t1"


# -- units ---------------------------------------------------------------------------------------


def test_connection_tokens() -> None:
    assert connection_tokens(None) == frozenset()
    assert connection_tokens("") == frozenset()
    assert connection_tokens("close") == {"close"}
    assert connection_tokens(" Keep-Alive , X-Foo,,x-bar ") == {"keep-alive", "x-foo", "x-bar"}


def test_request_header_names_are_lower_case_with_dashes() -> None:
    environ = {"HTTP_X_FOO_BAR": "1", "HTTP_ACCEPT": "a", "CONTENT_TYPE": "text/x", "CONTENT_LENGTH": "3",
               "PATH_INFO": "/", "wsgi.input": None}
    every = frozenset({"accept", "content-type", "content-length", "x-foo-bar", "path-info", "wsgi.input"})
    assert request_headers(environ, every) == {"accept": "a", "content-type": "text/x", "x-foo-bar": "1"}


def test_request_headers_connection_listed_first_then_hop_by_hop_then_allow_list() -> None:
    environ = {
        "HTTP_CONNECTION": "close, Accept-Language", "HTTP_ACCEPT_LANGUAGE": "fr", "HTTP_ACCEPT": "*/*",
        "HTTP_KEEP_ALIVE": "timeout=5", "HTTP_TE": "trailers", "HTTP_UPGRADE": "h2c",
        "HTTP_TRANSFER_ENCODING": "chunked", "HTTP_PROXY_CONNECTION": "keep-alive",
        "HTTP_PROXY_AUTHORIZATION": "Basic x", "HTTP_AUTHORIZATION": "Bearer x", "HTTP_COOKIE": "a=1",
        "HTTP_X_RUNNER_SERVICE_TOKEN": "client", "HTTP_USER_AGENT": "ua", "HTTP_X_CUSTOM": "1",
        "HTTP_TRACEPARENT": "tp", "HTTP_IF_NONE_MATCH": '"e"',
    }
    assert request_headers(environ, ASSET_REQUEST_ALLOW) == {
        "accept": "*/*", "user-agent": "ua", "traceparent": "tp", "if-none-match": '"e"'}


def _request_headers_spelled_out(environ: dict[str, str], allow: frozenset[str],
                                 allow_prefix: str | None) -> dict[str, str]:
    """The rule as written in the module docstring, with no shortcut."""
    named = connection_tokens(environ.get("HTTP_CONNECTION"))
    out = {}
    given = [(k[5:].replace("_", "-").lower(), v) for k, v in environ.items() if k.startswith("HTTP_")]
    if environ.get("CONTENT_TYPE"):
        given.append(("content-type", environ["CONTENT_TYPE"]))
    for name, value in given:
        if name in named or name in HOP_BY_HOP:
            continue
        if ((name in allow or (allow_prefix is not None and name.startswith(allow_prefix)))
                and re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name)
                and not re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value)):
            out[name] = value
    return out


_KEYS = st.sampled_from(["HTTP_ACCEPT", "HTTP_USER_AGENT", "HTTP_X_ALGA_TENANT", "HTTP_X_ALGA_",
                         "HTTP_CONNECTION", "HTTP_TE", "HTTP_COOKIE", "HTTP_X_REQUEST_ID",
                         "HTTP_CONTENT_TYPE", "CONTENT_TYPE", "CONTENT_LENGTH", "HTTP_", "PATH_INFO",
                         "HTTP_X ALGA", "HTTP_X_ALGA_\u00e9", "HTTP_TRACEPARENT"]) | st.text(max_size=12)
_VALUES = st.sampled_from(["", "a", "x-alga-tenant, accept", "content-type", "te, close", "a\r\nb",
                           "\t", "\x7f"]) | st.text(max_size=8)


@settings(max_examples=400, deadline=None)
@given(environ=st.dictionaries(_KEYS, _VALUES, max_size=10),
       execute=st.booleans())
@example(environ={"CONTENT_TYPE": "a", "HTTP_CONNECTION": "content-type"}, execute=True)
@example(environ={"CONTENT_TYPE": "a\nb"}, execute=True)
@example(environ={"HTTP_X_ALGA_\u00e9": "a", "HTTP_X_ALGA_T": "\x00"}, execute=True)
def test_request_headers_matches_the_rule_spelled_out(environ: dict[str, str], execute: bool) -> None:
    allow, prefix = (EXECUTE_REQUEST_ALLOW, "x-alga-") if execute else (ASSET_REQUEST_ALLOW, None)
    for _ in range(2):  # the second time from the name cache
        assert request_headers(environ, allow, allow_prefix=prefix) == \
            _request_headers_spelled_out(environ, allow, prefix)


def test_request_header_decisions_stay_right_and_bounded_for_any_number_of_names() -> None:
    # Names come from clients: past the bound they are decided each time, never stored.
    for i in range(3000):
        environ = {f"HTTP_X_ALGA_N{i}": "v", f"HTTP_X_OTHER_{i}": "w", "HTTP_ACCEPT": "a"}
        assert request_headers(environ, EXECUTE_REQUEST_ALLOW, allow_prefix="x-alga-") == \
            {f"x-alga-n{i}": "v", "accept": "a"}
        assert request_headers(environ, ASSET_REQUEST_ALLOW) == {"accept": "a"}
        assert request_headers(environ, EXECUTE_REQUEST_ALLOW) == {"accept": "a"}  # no prefix
    assert all(len(decided) <= 1024 for decided in headers_module._DECISIONS.values())
    # Hop-by-hop stays out even when a caller's own allow-list names it.
    assert request_headers({"HTTP_TE": "trailers", "HTTP_ACCEPT": "a"}, frozenset({"te", "accept"})) == \
        {"accept": "a"}


def test_request_headers_even_an_allowed_header_named_in_connection_is_dropped() -> None:
    environ = {"HTTP_CONNECTION": "x-request-id", "HTTP_X_REQUEST_ID": "r", "HTTP_ACCEPT": "a"}
    assert request_headers(environ, EXECUTE_REQUEST_ALLOW) == {"accept": "a"}


def test_request_headers_prefix_and_control_characters() -> None:
    environ = {"HTTP_X_ALGA_TENANT": "t", "HTTP_X_ALGA_EVIL": "a\r\nb", "HTTP_X_ALGAX": "no",
               "HTTP_ACCEPT": "a\x00b", "CONTENT_TYPE": "application/json", "HTTP_X_ALGA_": "empty-name"}
    got = request_headers(environ, EXECUTE_REQUEST_ALLOW, allow_prefix="x-alga-")
    assert {k: v for k, v in got.items() if k != "x-alga-"} == {"x-alga-tenant": "t",
                                                                 "content-type": "application/json"}


def test_allow_lists_never_hold_credentials_or_hop_by_hop_names() -> None:
    for allow in (ASSET_REQUEST_ALLOW, EXECUTE_REQUEST_ALLOW):
        assert not allow & {"authorization", "cookie", "x-runner-service-token", "host",
                            "proxy-authorization"}
        assert not allow & HOP_BY_HOP
    assert {"proxy-connection", "keep-alive", "te", "transfer-encoding", "upgrade"} <= HOP_BY_HOP


def test_response_headers_drop_hops_cookies_and_server_set_ones() -> None:
    upstream = [
        ("Content-Type", "text/html"), ("Connection", "X-Hop, close"), ("X-Hop", "1"), ("Keep-Alive", "t=5"),
        ("Transfer-Encoding", "chunked"), ("Set-Cookie", "a=1"), ("set-cookie", "b=2"), ("Server", "runner"),
        ("Date", "today"), ("X-Request-Id", "runner-id"), ("Link", "</a>; rel=preload"),
        ("Link", "</b>; rel=preload"), ("X-Bad", "a\r\nInjected: 1"), ("ETag", '"e"'), ("Trailer", "X-T"),
        ("Upgrade", "h2c"), ("Proxy-Authenticate", "Basic"), ("Content-Length", "10"),
    ]
    for _ in range(2):  # the second time from the per-name decisions
        assert response_headers(upstream) == ([
            ("Content-Type", "text/html"), ("Link", "</a>; rel=preload"), ("Link", "</b>; rel=preload"),
            ("ETag", '"e"'), ("Content-Length", "10")], False)


def test_response_headers_say_whether_a_location_may_need_rewriting() -> None:
    for _ in range(2):
        assert response_headers([("LOCATION", "/ext-ui/x"), ("ETag", '"e"')]) == (
            [("LOCATION", "/ext-ui/x"), ("ETag", '"e"')], True)
        assert response_headers([("Content-Type", "a/b"), ("Content-Location", "/x")])[1] is False
        # Named in Connection and so dropped: still True, a harmless "may".
        out, _ = response_headers([("Connection", "location"), ("Location", "/x"), ("ETag", "e")])
        assert out == [("ETag", "e")]


# -- through HTTP: assets ---------------------------------------------------------------------------

CLIENT_HEADERS = {
    "Accept": "text/html", "Accept-Encoding": "gzip, br", "Accept-Language": "de", "User-Agent": "browser/1",
    "If-Modified-Since": "Wed, 21 Oct 2015 07:28:00 GMT", "Range": "bytes=0-10", "If-Range": '"sha256-old"',
    "Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "Tracestate": "v=1",
    "Authorization": "Bearer user-token", "Cookie": "session=user-cookie", "X-Runner-Service-Token": "fake",
    "Proxy-Authorization": "Basic x", "X-Forwarded-For": "1.2.3.4", "X-Forwarded-Host": "evil.example",
    "Forwarded": "for=1.2.3.4", "X-Tenant-Id": "t2", "X-Alga-Tenant": "t2", "Origin": "https://x.example",
    "Referer": "https://x.example/", "X-Custom": "1", "Keep-Alive": "timeout=1", "TE": "trailers",
    "Upgrade": "websocket", "X-Request-Id": "asset-req-1",
}


def test_asset_requests_carry_only_allow_listed_headers(gateway: Gateway) -> None:
    resp = gateway.get(INDEX + Q, headers=CLIENT_HEADERS)
    assert resp.status_code == 200
    got = gateway.runner.received[0].headers
    # If-Range goes with Range: without it a conditional range request would become an
    # unconditional one, and a slice of a changed file would be spliced onto a stale copy.
    assert set(got) == {"host", "accept", "accept-encoding", "accept-language", "user-agent",
                        "if-modified-since", "range", "if-range", "traceparent", "tracestate",
                        "x-request-id", "x-runner-service-token"}
    for name in ("accept", "accept-encoding", "accept-language", "user-agent", "if-modified-since", "range",
                 "if-range", "traceparent", "tracestate"):
        assert got[name] == CLIENT_HEADERS[next(k for k in CLIENT_HEADERS if k.lower() == name)]
    assert got["host"] == gateway.upstream_host  # from config, never the client's
    assert got["x-runner-service-token"] == SERVICE_TOKEN
    assert got["x-request-id"] == "asset-req-1"


def test_asset_request_headers_named_in_connection_are_dropped(gateway: Gateway) -> None:
    resp = gateway.raw("GET", INDEX + Q, [("Connection", "Accept-Language, Range"), ("Accept-Language", "de"),
                                          ("Range", "bytes=0-1"), ("Accept", "text/html")])
    assert resp.status == 200
    got = gateway.runner.received[0].headers
    assert "accept-language" not in got and "range" not in got and got["accept"] == "text/html"


RUNNER_RESPONSE = [
    ("Content-Type", "text/javascript"), ("Connection", "X-Hop-Secret"), ("X-Hop-Secret", "internal"),
    ("Keep-Alive", "timeout=5"), ("Proxy-Connection", "keep-alive"), ("Upgrade", "h2c"),
    ("Proxy-Authenticate", "Basic realm=x"), ("Set-Cookie", "runner=1"), ("Set-Cookie", "other=2"),
    ("Server", "ext-runner/1.0"), ("X-Request-Id", "runner-own-id"), ("Link", "</a.js>; rel=preload"),
    ("Link", "</b.css>; rel=preload"), ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'self'"), ("ETag", '"sha256-1"'), ("X-Kept", "yes"),
]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_asset_responses_lose_hop_by_hop_connection_listed_and_cookies(gateway: Gateway,
                                                                      chunked: bool) -> None:
    gateway.runner.respond("/ext-ui/", 200, RUNNER_RESPONSE, b"let a = 1;", chunked=chunked)
    resp = gateway.raw("GET", "/runner/ext-ui/x/h/app.js", [("X-Request-Id", "ours-1")])
    assert resp.status == 200 and resp.body == b"let a = 1;"
    names = {n.lower() for n in resp.headers}
    for dropped in ("x-hop-secret", "keep-alive", "proxy-connection", "upgrade", "proxy-authenticate",
                    "set-cookie", "trailer"):
        assert dropped not in names, dropped
    assert resp.headers.get_all("Link") == ["</a.js>; rel=preload", "</b.css>; rel=preload"]
    assert resp.headers.get_all("X-Request-Id") == ["ours-1"]
    assert resp.header("Server") != "ext-runner/1.0"
    assert (resp.header("X-Kept"), resp.header("X-Content-Type-Options"), resp.header("ETag")) == (
        "yes", "nosniff", '"sha256-1"')
    assert resp.header("Content-Security-Policy") == "default-src 'self'"
    assert "internal" not in str(resp.headers)


def test_credentials_a_runner_echoes_never_reach_the_browser(gateway: Gateway) -> None:
    # An ingress in front of the runner, or a debugging layer, may reflect request headers.
    echoed = [("Content-Type", "text/javascript"), ("X-Runner-Service-Token", SERVICE_TOKEN),
              ("Authorization", f"Bearer {SERVICE_TOKEN}"), ("Proxy-Authorization", "Basic eA=="),
              ("X-Debug-Headers", f"host=runner; x-runner-service-token={SERVICE_TOKEN}"), ("X-Kept", "yes")]
    gateway.runner.respond("/ext-ui/", 200, echoed, b"let a = 1;")
    resp = gateway.raw("GET", "/runner/ext-ui/x/h/app.js")
    assert resp.status == 200 and resp.header("X-Kept") == "yes"
    assert SERVICE_TOKEN not in str(resp.headers)
    names = {n.lower() for n in resp.headers}
    assert not names & {"x-runner-service-token", "authorization", "proxy-authorization", "x-debug-headers"}


def test_a_short_service_token_does_not_take_headers_that_happen_to_hold_it() -> None:
    # "self" is in every CSP, "1" in many ETags: only a token long enough to be one is looked for.
    with running_gateway(upstream={"service_token": "self"}) as gw:
        gw.runner.respond("/ext-ui/", 200, [("Content-Type", "text/javascript"), ("ETag", '"sha256-1f"'),
                                            ("Content-Security-Policy", "default-src 'self'")], b"let a = 1;")
        resp = gw.raw("GET", "/runner/ext-ui/x/h/app.js")
        assert resp.header("Content-Security-Policy") == "default-src 'self'"
        assert resp.header("ETag") == '"sha256-1f"' and resp.header("Content-Length") == "10"


# -- through HTTP: execute (the request side; the reply headers are all the gateway's) -------------


def test_execute_requests_carry_only_allow_listed_headers(gateway: Gateway) -> None:
    resp = gateway.execute(headers={**CLIENT_HEADERS, "X-Idempotency-Key": "k", "X-Alga-Tenant": "tenant-1"})
    assert resp.status_code == 200
    got = gateway.runner.received[0].headers
    assert set(got) == {"host", "content-type", "content-length", "accept", "accept-encoding", "user-agent",
                        "traceparent", "tracestate", "x-request-id", "x-idempotency-key", "x-alga-tenant",
                        "x-alga-extension", "x-runner-service-token"}
    assert got["x-runner-service-token"] == SERVICE_TOKEN and got["accept-encoding"] == "identity"
    assert set(resp.headers) >= {"Content-Type", "Cache-Control", "X-Request-Id"}
    assert "Set-Cookie" not in resp.headers


def test_a_long_connection_header_is_not_remembered() -> None:
    # Bounded in entries only, the cache kept 256 values of whatever size a client sent:
    # gunicorn joins 100 fields of 8 KB, and a worker kept 860 MB for good.
    from runner_mw import headers

    headers._cached_tokens.cache_clear()
    big = ", ".join(f"x-pad-{n:05d}" for n in range(2000))
    assert headers.connection_tokens(big) == frozenset(f"x-pad-{n:05d}" for n in range(2000))
    assert headers.connection_tokens("keep-alive, X-Trace") == frozenset({"keep-alive", "x-trace"})
    assert headers._cached_tokens.cache_info().currsize == 1  # the short one only
