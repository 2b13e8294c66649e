"""Canonical paths: the traversal corpus through real HTTP (werkzeug and waitress), plus units.

Every corpus entry is sent byte for byte (a raw request line: client libraries normalise ``..``
and ``%2e``) to a gateway served by werkzeug (which sets RAW_URI and REQUEST_URI) and by waitress
(REQUEST_URI only), for both backend kinds; each must get 400 ``invalid_path`` while neither the
runner nor the wrapped app sees anything.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mwfixtures import (
    ASSET_BASE,
    EXT,
    HASH,
    HOST,
    INDEX,
    KINDS,
    SERVERS,
    UPSTREAM_INDEX,
    Gateway,
    running_gateway,
)

from runner_mw.paths import InvalidPath, canonical_tail, encode, raw_path

pytest_plugins = ["mwfixtures"]

E = ASSET_BASE  # /runner/ext-ui/{ext}/{hash}: a prefix that is forwarded when the rest is clean

CORPUS: list[tuple[str, str]] = [
    # dot segments, plain
    ("dotdot-etc-passwd", "/runner/ext-ui/../../etc/passwd"),
    ("dotdot-to-execute", "/runner/../v1/execute"),
    ("dot-before-prefix", "/runner/./ext-ui/x"),
    ("dotdot-in-bundle", f"{E}/../../../secret.js"),
    ("dot-in-bundle", f"{E}/./index.html"),
    ("trailing-dotdot", f"{E}/.."),
    ("trailing-dot", f"{E}/."),
    ("deep-dotdot", "/runner/ext-ui/a/b/../../../../etc/passwd"),
    ("dotdot-out-of-local", "/runner/-/../ext-ui/x"),
    ("dotdot-with-query", "/runner/ext-ui/../x?tenant=t1"),
    # encoded dots
    ("pct-2e2e", "/runner/ext-ui/%2e%2e/x"),
    ("pct-2E2E-upper", "/runner/ext-ui/%2E%2E/x"),
    ("dot-pct-2e", "/runner/ext-ui/.%2e/x"),
    ("pct-2e-dot", "/runner/ext-ui/%2e./x"),
    ("pct-single-dot", "/runner/ext-ui/%2e/x"),
    ("pct-dot-in-name", f"{E}/index%2ehtml"),
    ("pct-dotdot-local", "/runner/-/%2e%2e/ext-ui/x"),
    # encoded separators
    ("pct-2f", "/runner/ext-ui/a%2fb"),
    ("pct-2F-chain", "/runner/ext-ui/a%2F..%2F..%2Fetc%2Fpasswd"),
    ("dotdot-pct-2f", "/runner/ext-ui/..%2f..%2fetc"),
    ("pct-2f-in-prefix", "/runner%2fext-ui/x"),
    ("pct-2F-to-execute", "/runner%2F..%2Fv1/execute"),
    # backslashes, raw and encoded
    ("pct-5c", "/runner/ext-ui/a%5cb"),
    ("pct-5c-chain", "/runner/ext-ui/..%5c..%5cwindows%5cwin.ini"),
    ("pct-5C-alone", "/runner/ext-ui/%5C"),
    ("raw-backslash", "/runner/ext-ui/a\\b"),
    ("raw-backslash-dotdot", "/runner/ext-ui/..\\..\\x"),
    # double encoding
    ("double-2e", "/runner/ext-ui/%252e%252e/x"),
    ("double-2f", "/runner/ext-ui/%252f"),
    ("pct-25-alone", "/runner/ext-ui/%25"),
    ("pct-encoded-pct", "/runner/ext-ui/%25%32%65%25%32%65/x"),
    # semicolons (path parameters)
    ("semicolon", "/runner/ext-ui/a;b"),
    ("dotdot-semicolon", "/runner/ext-ui/..;/x"),
    ("pct-3b", "/runner/ext-ui/a%3bjsessionid=1"),
    ("semicolon-in-bundle", f"{E};/index.html"),
    # control characters
    ("pct-00", "/runner/ext-ui/a%00b"),
    ("pct-00-extension", f"{E}/index.html%00.js"),
    ("pct-crlf-injection", "/runner/ext-ui/a%0d%0aX-Injected:%201"),
    ("pct-0a", "/runner/ext-ui/a%0ab"),
    ("pct-09", "/runner/ext-ui/a%09b"),
    ("pct-7f", "/runner/ext-ui/a%7fb"),
    ("pct-1f", "/runner/ext-ui/a%1fb"),
    # empty segments
    ("empty-before-prefix", "/runner//ext-ui/x"),
    ("empty-after-prefix", "/runner/ext-ui//etc/passwd"),
    ("empty-in-bundle", f"{E}//index.html"),
    # overlong / invalid UTF-8 and malformed escapes
    ("overlong-c0ae", "/runner/ext-ui/%c0%ae%c0%ae/x"),
    ("overlong-e080ae", "/runner/ext-ui/%e0%80%ae%e0%80%ae/x"),
    ("invalid-utf8", "/runner/ext-ui/%ff%fe"),
    ("malformed-zz", "/runner/ext-ui/a%zz"),
    ("malformed-trailing-pct", "/runner/ext-ui/a%"),
    ("malformed-one-digit", "/runner/ext-ui/a%2"),
    ("iis-u-escape", "/runner/ext-ui/%u002e%u002e/x"),
    # a fragment character that decodes in front of a dot segment
    ("pct-23-dotdot", "/runner/ext-ui/a%23/../b"),
    # absolute-form request targets
    ("absolute-form-dotdot", f"http://{HOST}/runner/ext-ui/../x"),
    ("absolute-form-pct-2e", f"http://{HOST}/runner/ext-ui/%2e%2e/x"),
]
assert len(CORPUS) >= 40 and len({name for name, _ in CORPUS}) == len(CORPUS)

COMBOS = [(server, kind) for server in SERVERS for kind in KINDS]


@pytest.fixture(params=COMBOS, ids=[f"{s}-{k}" for s, k in COMBOS])
def any_gateway(request: pytest.FixtureRequest, gateways: Any) -> Gateway:
    server, kind = request.param
    return gateways(kind, server)  # type: ignore[no-any-return]


@pytest.mark.parametrize("target", [t for _, t in CORPUS], ids=[n for n, _ in CORPUS])
def test_traversal_corpus_is_refused_before_anything_is_sent(any_gateway: Gateway, target: str) -> None:
    resp = any_gateway.raw("GET", target)
    assert resp.status == 400, (resp.status, resp.body[:200])
    assert resp.json()["error"] == "invalid_path"
    assert resp.header("X-Request-Id") == resp.json()["requestId"]
    assert resp.header("Cache-Control") == "no-store"
    assert any_gateway.runner.received == []
    assert any_gateway.app.seen == []


@pytest.mark.parametrize("target", ["/runner/ext-ui/a\tb", "/runner/ext-ui/a b", "/runner/ext-ui/a\x00b"],
                         ids=["raw-tab", "raw-space", "raw-nul"])
def test_raw_whitespace_and_nul_in_the_request_line_never_reach_the_runner(
        any_gateway: Gateway, target: str) -> None:
    # Some servers refuse these themselves (their own 400 page); either way: 400, nothing sent.
    resp = any_gateway.raw("GET", target)
    assert resp.status == 400
    assert any_gateway.runner.received == []


def test_refused_head_requests_too(any_gateway: Gateway) -> None:
    resp = any_gateway.raw("HEAD", "/runner/ext-ui/%2e%2e/x")
    assert resp.status == 400 and resp.body == b""
    assert any_gateway.runner.received == []


@pytest.mark.parametrize(("target", "upstream"), [
    (INDEX + "?tenant=t1", UPSTREAM_INDEX + "?tenant=t1"),
    (f"{E}/", f"/ext-ui/{EXT}/{HASH}/"),
    (f"{E}/%C3%A9t%C3%A9.js", f"/ext-ui/{EXT}/{HASH}/%C3%A9t%C3%A9.js"),
    (f"{E}/my%20file.png", f"/ext-ui/{EXT}/{HASH}/my%20file.png"),  # a file name with a space
    (f"{E}/%c3%a9.js", f"/ext-ui/{EXT}/{HASH}/%C3%A9.js"),
    (f"{E}/a%3Fx=1", f"/ext-ui/{EXT}/{HASH}/a%3Fx=1"),
    (f"{E}/a%23b", f"/ext-ui/{EXT}/{HASH}/a%23b"),
    (f"{E}/%7Etilde%40at%3Acolon", f"/ext-ui/{EXT}/{HASH}/~tilde@at:colon"),
    (f"{E}/...js", f"/ext-ui/{EXT}/{HASH}/...js"),
], ids=["index", "trailing-slash", "utf8", "space-in-a-name", "lowercase-escapes", "encoded-question-mark",
        "encoded-hash", "unreserved-escapes", "dots-inside-a-name"])
def test_clean_paths_are_forwarded_re_encoded_strictly(any_gateway: Gateway, target: str,
                                                      upstream: str) -> None:
    resp = any_gateway.raw("GET", target)
    assert resp.status in (200, 400, 404), resp.status  # the runner's verdict on the file
    (got,) = any_gateway.runner.received
    assert got.raw_path == upstream


# -- units --------------------------------------------------------------------------------------


def env(path_info: str, raw: str | None = None, key: str = "RAW_URI",
        script_name: str = "") -> dict[str, Any]:
    environ: dict[str, Any] = {"PATH_INFO": path_info, "SCRIPT_NAME": script_name}
    if raw is not None:
        environ[key] = raw
    return environ


@pytest.mark.parametrize("key", ["RAW_URI", "REQUEST_URI"])
def test_raw_path_strips_query_fragment_and_absolute_form(key: str) -> None:
    assert raw_path({key: "/runner/a?b=1#c"}) == "/runner/a"
    assert raw_path({key: "http://h:1/runner/a?x"}) == "/runner/a"
    assert raw_path({key: "https://h"}) == "/"
    assert raw_path({}) is None


def test_canonical_tail_returns_decoded_segments_after_skip() -> None:
    assert canonical_tail(env("/runner/ext-ui/a/b.js", "/runner/ext-ui/a/b.js"), "/runner/ext-ui/a/b.js",
                          1) == ["ext-ui", "a", "b.js"]
    assert canonical_tail(env("/runner/x/%C3%A9", "/runner/x/%C3%A9"), "/runner/x/\xc3\xa9", 1) == [
        "x", "\xc3\xa9"]
    assert canonical_tail(env("/runner"), "/runner", 1) == []
    assert canonical_tail(env("/runner/"), "/runner/", 1) == [""]
    assert canonical_tail(env("/v1/execute", "/v1/execute?x=1"), "/v1/execute", 2) == []


def test_a_request_target_too_long_is_refused_before_its_segments_are_checked() -> None:
    # Each segment is checked in Python: a 64 KB target (werkzeug and waitress take that much)
    # cost 38 ms, a 64 KB query 28 ms, before any access check.
    from runner_mw.paths import MAX_PATH, MAX_QUERY, MAX_SEGMENTS

    fine = "/runner/ext-ui/" + "a/" * 100 + "x.js"
    assert len(canonical_tail(env(fine, fine), fine, 1)) == 102
    refused = ["/runner/" + "a" * MAX_PATH, "/runner/" + "a/" * MAX_SEGMENTS + "x",
               "/runner/ext-ui/" + "/" * 60_000 + "x"]
    for path in refused:
        with pytest.raises(InvalidPath, match="too long"):
            canonical_tail(env(path, path), path, 1)
    encoded = "/runner/" + "%C3%A9" * (MAX_PATH // 2)  # within MAX_PATH decoded, not raw
    with pytest.raises(InvalidPath, match="too long"):
        canonical_tail(env(encoded, encoded), "/runner/" + "\xc3\xa9" * (MAX_PATH // 2), 1)
    with pytest.raises(InvalidPath, match="too long"):
        canonical_tail({**env(fine, fine), "QUERY_STRING": "q=" + "%" * MAX_QUERY}, fine, 1)


@pytest.mark.parametrize("path_info", [
    "/runner/ext-ui/../x", "/runner/ext-ui/./x", "/runner/ext-ui/x/..", "/runner//x", "/runner/a\\b",
    "/runner/a;b", "/runner/a\x00b", "/runner/a\rb", "/runner/a\nb", "/runner/a\tb", "/runner/a\x7fb",
    "/runner/a\x1fb", "/runner/\xc0\xae", "/runner/\xff",
])
def test_decoded_path_rules_apply_without_a_raw_uri(path_info: str) -> None:
    with pytest.raises(InvalidPath):
        canonical_tail(env(path_info), path_info, 1)


def test_raw_and_decoded_paths_must_agree() -> None:
    with pytest.raises(InvalidPath):
        canonical_tail(env("/runner/ext-ui/a", "/runner/ext-ui/b"), "/runner/ext-ui/a", 1)
    with pytest.raises(InvalidPath):  # werkzeug replaces invalid UTF-8 with U+FFFD in PATH_INFO
        canonical_tail(env("/runner/\xef\xbf\xbd", "/runner/%ff"), "/runner/\xef\xbf\xbd", 1)
    with pytest.raises(InvalidPath):  # a raw path shorter than PATH_INFO
        canonical_tail(env("/runner/a/b", "/runner/a%2Fb"), "/runner/a/b", 1)


def test_script_name_may_precede_the_raw_path() -> None:
    environ = env("/runner/ext-ui/a", "/app/runner/ext-ui/a", script_name="/app")
    assert canonical_tail(environ, "/runner/ext-ui/a", 1) == ["ext-ui", "a"]
    environ = env("/runner/ext-ui/%C3%A9", "/caf%C3%A9/runner/ext-ui/%C3%A9", script_name="/caf\xc3\xa9")
    assert canonical_tail(environ, "/runner/ext-ui/\xc3\xa9", 1) == ["ext-ui", "\xc3\xa9"]
    # gunicorn passes a mount point as it matched it in the raw target, still encoded.
    for mount in ("/my%20app", "/caf%C3%A9", "/caf%c3%a9"):
        environ = env("/runner/-/healthz", mount + "/runner/-/healthz", script_name=mount)
        assert canonical_tail(environ, "/runner/-/healthz", 1) == ["-", "healthz"]
    # A request line with raw (unencoded) latin-1 bytes, as PEP 3333 hands them over.
    environ = env("/runner/x", "/caf\xc3\xa9/runner/x", script_name="/caf\xc3\xa9")
    assert canonical_tail(environ, "/runner/x", 1) == ["x"]


@pytest.mark.parametrize(("raw", "script_name"), [
    ("//v1/execute", ""),  # waitress: PATH_INFO "/v1/execute", REQUEST_URI as sent
    ("///v1/execute", ""), ("/x/../v1/execute", ""), ("/./v1/execute", ""),
    ("/other/v1/execute", "/app"), ("/app//v1/execute", "/app"), ("/%61pp/v1/e%78ecute", "/b"),
])
def test_only_script_name_may_precede_the_raw_path(raw: str, script_name: str) -> None:
    # A server that normalised the raw target into this PATH_INFO must not make it this route.
    with pytest.raises(InvalidPath):
        canonical_tail(env("/v1/execute", raw, script_name=script_name), "/v1/execute", 2)


@pytest.mark.parametrize("raw", ["/runner/%2e", "/runner/%2F", "/runner/%5C", "/runner/%25", "/runner/%3B",
                                 "/runner/%00", "/runner/%1F", "/runner/%7F", "/runner/%zz", "/runner/%",
                                 "/runner/a b"])
@pytest.mark.parametrize("key", ["RAW_URI", "REQUEST_URI"])
def test_raw_escapes_are_refused(raw: str, key: str) -> None:
    decoded = unquote(raw, encoding="latin-1")
    with pytest.raises(InvalidPath):
        canonical_tail(env(decoded, raw, key), decoded, 1)


def test_encode_is_strict() -> None:
    assert encode(["ext-ui", "a b", "\xc3\xa9", "x:y@z", "q?", "h#", "p%", "~!$&'()*+,="]) == (
        "ext-ui/a%20b/%C3%A9/x:y@z/q%3F/h%23/p%25/~!$&'()*+,=")
    assert encode([]) == "" and encode(["a", ""]) == "a/"


segment = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="/"),
                  min_size=1, max_size=12)


@settings(database=None, deadline=None)
@given(st.lists(segment, min_size=1, max_size=5))
def test_accepted_segments_round_trip_and_never_traverse(parts: list[str]) -> None:
    path_info = "/runner/" + "/".join(p.encode("utf-8").decode("latin-1") for p in parts)
    try:
        segments = canonical_tail(env(path_info), path_info, 1)
    except InvalidPath:
        return
    encoded = encode(segments)
    pieces = encoded.split("/")
    assert len(pieces) == len(parts)
    assert all(p not in (".", "..") for p in pieces)
    assert [unquote(p) for p in pieces] == parts
    assert not set(encoded) & set("?#\\; \r\n\x00")


@given(st.lists(st.text(st.characters(max_codepoint=0xFF)), min_size=1, max_size=5))
def test_encode_fast_path_equals_strict_quoting(segments: list[str]) -> None:
    # encode() skips quote() when nothing needs encoding: it must give the same bytes.
    expected = "/".join(quote(s.encode("latin-1"), safe="!$&'()*+,=:@-._~") for s in segments)
    assert encode(segments) == expected


@pytest.mark.parametrize("target", ["//v1/execute", "///v1/execute", "//runner/ext-ui/a/b.js"])
def test_a_doubled_leading_slash_is_not_a_gateway_route_under_waitress(target: str) -> None:
    # waitress reads "//v1/execute" as PATH_INFO "/v1/execute" and keeps the target in REQUEST_URI.
    with running_gateway(server="waitress") as gw:
        resp = gw.raw("POST" if "execute" in target else "GET", target,
                      [("Content-Type", "application/json")], b"{}")
        assert resp.status == 400 and resp.json()["error"] == "invalid_path"
        assert gw.runner is not None and gw.runner.received == []
