"""Fuzzing (hypothesis): paths, headers and execute bodies over real sockets; config files; paths.

Requests are written byte for byte on a socket (client libraries normalise what matters) to the
middleware served by werkzeug and by waitress in front of a recording ``StandinRunner``. After
each one:

- the middleware never answers a 5xx of its own but 502/503/504 (a 500 is a bug);
- the runner only ever receives ``/v1/execute`` or ``/ext-ui/...`` with a strictly encoded path,
  never ``Authorization``, cookies, a client's service token, hop-by-hop or Connection-listed
  headers;
- every response from the middleware (not the app's) has an ``X-Request-Id`` and, for an error of
  its own, a JSON body ``{"error", "requestId"}``.

The loader is fed random text, bytes, YAML documents and mutations of the shipped
``config/runner.yaml``: it returns a ``Config`` or raises ``ConfigError``, nothing else.

Bounded for the default run (the file takes well under a minute); ``RUNNER_MW_FUZZ_LONG=1`` runs
a hundred times more examples of each property.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mwfixtures import EXT, HASH, HOST, RecordingApp, config_for, envelope, serve_wsgi
from standin import Received, StandinRunner
from testsecrets import (
    TEST_CLIENT_BEARER,
    TEST_CLIENT_SERVICE_TOKEN,
    TEST_COOKIE,
    TEST_SERVICE_TOKEN,
    TEST_TOKEN,
)

from runner_mw import RunnerMiddleware
from runner_mw.config import Config
from runner_mw.errors import ConfigError
from runner_mw.headers import HOP_BY_HOP
from runner_mw.loader import config_from_text, load_config
from runner_mw.paths import InvalidPath, canonical_tail, encode

# A failing example with a 40 KB header has a big repr: report it rather than warn about it.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

LONG = os.environ.get("RUNNER_MW_FUZZ_LONG") == "1"
settings.register_profile(
    "runner_mw-fuzz", deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("runner_mw-fuzz")


def examples(n: int) -> settings:
    """``n`` examples normally, a hundred times more with RUNNER_MW_FUZZ_LONG=1."""
    return settings(FUZZ, max_examples=n * 100 if LONG else n)


ROOT = Path(__file__).resolve().parent.parent
SHIPPED = (ROOT / "config" / "runner.yaml").read_text(encoding="utf-8")
HASH_ENC = quote(HASH, safe="")
T = 10.0
SERVERS = ("werkzeug", "waitress")

#: Names the gateway sets itself upstream (a client's copy is replaced, not forwarded).
GATEWAY_SET = frozenset({"host", "content-length", "content-type", "user-agent", "accept-encoding",
                         "x-request-id", "x-runner-service-token", "x-alga-tenant", "x-alga-extension",
                         "x-idempotency-key"})


# --------------------------------------------------------------------------- the served gateway


@dataclass
class Fuzzed:
    port: int
    server: str
    runner: StandinRunner
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # fuzz id -> environ (str values)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def fuzz_gateway(server: str) -> Iterator[Fuzzed]:
    with StandinRunner(name=f"fuzz-{server}") as runner:
        config = config_for(runner.url, "docker",
                            upstream={"service_token": TEST_SERVICE_TOKEN},
                            access={"tokens": [TEST_TOKEN]},
                            timeouts={"connect_ms": 2000, "read_ms": 10000})
        mw = RunnerMiddleware(RecordingApp(), config, reload_signal=False)
        state = Fuzzed(0, server, runner)

        def outer(environ: dict[str, Any], start_response: Any) -> Any:
            fid = environ.get("HTTP_X_FUZZ_ID")
            if fid:
                with state.lock:
                    state.seen[fid] = {k: v for k, v in environ.items() if isinstance(v, str)}
            return mw(environ, start_response)

        try:
            with serve_wsgi(outer, server) as served:
                state.port = served.port
                yield state
        finally:
            mw.close()


@pytest.fixture(scope="module", params=SERVERS)
def fz(request: pytest.FixtureRequest) -> Iterator[Fuzzed]:
    with fuzz_gateway(request.param) as state:
        yield state


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def send_raw(port: int, data: bytes, method: str) -> Answer | None:
    """Write ``data`` on a new connection; the response, or None when the server just closed."""
    with socket.create_connection((HOST, port), timeout=T) as sock:
        # The server may refuse early (a 431 for huge headers): its answer may still be there.
        with contextlib.suppress(ConnectionError):
            sock.sendall(data)
        resp = http.client.HTTPResponse(sock, method=method)
        try:
            resp.begin()
            body = resp.read()
        except (http.client.HTTPException, ConnectionError):
            return None  # closed, or an HTTP/0.9 answer to a request line cut by a CR/LF
        finally:
            resp.close()
        return Answer(resp.status, resp.headers, body)


def request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None,
                  fid: str, port: int) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", f"Host: {HOST}:{port}".encode(),
             b"X-Fuzz-Id: " + fid.encode()]
    lines += [n + b": " + v for n, v in headers]
    if not any(n.lower() == b"connection" for n, _ in headers):
        lines.append(b"Connection: close")
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def exchange(fz: Fuzzed, method: str, target: bytes, headers: list[tuple[bytes, bytes]] | None = None,
             body: bytes | None = None) -> tuple[Answer | None, dict[str, Any] | None, list[Received]]:
    """One fuzzed request: (answer, environ the middleware saw or None, what the runner received)."""
    fz.runner.clear()
    fid = uuid.uuid4().hex
    answer = send_raw(fz.port, request_bytes(method.encode(), target, headers or [], body, fid, fz.port),
                      method)
    with fz.lock:
        environ = fz.seen.pop(fid, None)
    received = fz.runner.received
    # A CR or LF inside the target or a header cuts the head where the server sees it: what
    # follows may be parsed as another request (or an HTTP/0.9 one) without our X-Fuzz-Id.
    cut = any(b"\r" in part or b"\n" in part for part in [target, *(n + v for n, v in headers or [])])
    check(fz, answer, environ, received, cut)
    return answer, environ, received


def check(fz: Fuzzed, answer: Answer | None, environ: dict[str, Any] | None,
          received: list[Received], cut: bool = False) -> None:
    """The properties every fuzzed exchange must keep (see the module docstring)."""
    for r in received:
        check_forwarded(r, environ)
    if environ is None or answer is None:
        assert cut or not received or environ is not None, "the runner got a request the middleware never saw"
        # The middleware had it: only an HTTP/0.9 request (a line cut by CR/LF) gets no status line.
        assert environ is None or environ.get("SERVER_PROTOCOL") == "HTTP/0.9", "no answer"
        return
    if answer.headers.get("X-From-App") == "yes":
        path = environ.get("PATH_INFO", "")
        assert path != "/v1/execute" and not (path == "/runner" or path.startswith("/runner/")), path
        assert not received
        return
    rid = answer.headers.get("X-Request-Id")
    assert rid, (answer.status, dict(answer.headers))
    assert answer.status < 500 or answer.status in (502, 503, 504), (answer.status, answer.body[:300])
    passthrough = environ.get("PATH_INFO", "") != "/v1/execute" and any(
        r.headers.get("x-request-id") == rid for r in received)
    if answer.status >= 400 and not passthrough and environ.get("REQUEST_METHOD") != "HEAD":
        doc = json.loads(answer.body)
        assert isinstance(doc.get("error"), str) and doc.get("requestId") == rid, doc
        assert answer.headers.get("Cache-Control") == "no-store"


def check_forwarded(r: Received, environ: dict[str, Any] | None) -> None:
    # (/healthz: the status endpoint's health probe, a fixed path)
    assert r.path in ("/v1/execute", "/healthz") or r.path.startswith("/ext-ui/"), r.raw_path
    pieces = r.path.split("/")[1:]
    assert not {".", ".."} & set(pieces), r.raw_path
    low = r.path.lower()
    for bad in ("%2e", "%2f", "%5c", "\\", ";", "%00"):
        assert bad not in low, r.raw_path
    assert not any(ord(c) < 0x21 or ord(c) >= 0x7f for c in r.raw_path), r.raw_path
    names = [n.lower() for n, _ in r.header_list]
    assert not (set(names) & (HOP_BY_HOP | {"authorization", "cookie", "proxy-authorization"})), names
    tokens = [v for n, v in r.header_list if n.lower() == "x-runner-service-token"]
    assert tokens == [TEST_SERVICE_TOKEN], (r.raw_path, tokens)  # the health probe carries it too
    for _, value in r.header_list:
        assert not set(value) & set("\r\n\x00"), value
    if environ is None:
        return
    # Hop-by-hop and Connection-listed headers: the client's value never arrives (the ones the
    # gateway sets itself are replaced by its own values, or adopted: a sane X-Request-Id).
    dropped = set(HOP_BY_HOP)
    dropped |= {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",") if t.strip()}
    for name in dropped - GATEWAY_SET:
        client = environ.get("HTTP_" + name.upper().replace("-", "_"))
        if client:
            assert client not in [v for n, v in r.header_list if n.lower() == name], (name, client)


# --------------------------------------------------------------------------- strategies

ATOMS = st.sampled_from([
    ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%2F", "%5c", "%5C", "%25", "%252e", "%252f",
    "%3b", "%3B", ";", "\\", "%00", "%0a", "%0d%0a", "%09", "%7f", "%1f", "%", "%z", "%2", "%e9",
    "%c3%a9", "%c0%ae", "%ff", "é", "\u202e", "\u2215", "\uff0e\uff0e", "~", "ext-ui", EXT, HASH_ENC,
    HASH, "index.html", "-", "status", "metrics", "healthz", "", " ", "\t", "?", "#", "a", "//",
    "%u002e", "+", "&", "=", ":", "@", "!",
])
SEGMENT = st.one_of(
    st.lists(ATOMS, min_size=1, max_size=3).map("".join),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=6),
)
PREFIXES = st.sampled_from([
    "/runner/", "/runner/ext-ui/", f"/runner/ext-ui/{EXT}/{HASH_ENC}/", f"/runner/ext-ui/{EXT}/{HASH}/",
    "/runner/-/", "/runner", "/runnerX/", "/runner%2f", "/v1/execute", "/v1/execute/", "/v1/", "/", "",
    "//runner/", "/RUNNER/", f"http://{HOST}/runner/ext-ui/", "*", "/./runner/", "/app/../runner/",
])
QUERIES = st.one_of(st.just(""), st.sampled_from(["?tenant=t1", "?a=%2e%2e/..&b=%", "?", "?x=1#f"]),
                    st.text(max_size=12).map(lambda s: "?" + s))


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:  # arbitrary bytes after a prefix (CR/LF and spaces break the request line)
        return draw(PREFIXES).encode() + draw(st.binary(max_size=40))
    if kind == 1:  # very long
        n = draw(st.integers(200, 3000))
        unit = draw(st.sampled_from(["a/", "../", "%2e%2e/", "é", "x" * 7 + "/", "%41"]))
        return (f"/runner/ext-ui/{EXT}/{HASH_ENC}/" + unit * n).encode()
    path = draw(PREFIXES) + "/".join(draw(st.lists(SEGMENT, max_size=6))) + draw(QUERIES)
    return path.encode("utf-8", "surrogatepass")


@given(target=targets(), method=st.sampled_from(["GET", "GET", "HEAD", "POST", "PUT", "OPTIONS"]))
@examples(60)
def test_fuzzed_paths(fz: Fuzzed, target: bytes, method: str) -> None:
    body = json.dumps(envelope()).encode() if method == "POST" else None
    headers = [(b"Content-Type", b"application/json")] if method == "POST" else []
    exchange(fz, method, target, headers, body)


# -- headers

CREDENTIAL_NAMES = st.sampled_from([
    "Authorization", "authorization", "Cookie", "X-Runner-Service-Token", "x-runner-service-token",
    "Proxy-Authorization", "X_Runner_Service_Token", "Cookie2",
])
CREDENTIALS = st.sampled_from([f"Bearer {TEST_TOKEN}", f"Bearer {TEST_CLIENT_BEARER}", f"sid={TEST_COOKIE}",
                               TEST_CLIENT_SERVICE_TOKEN, f"Basic {TEST_CLIENT_BEARER}"])
NAMES = st.one_of(
    st.sampled_from([
        "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Upgrade", "Accept",
        "Accept-Encoding", "Accept-Language", "If-None-Match", "Range", "User-Agent", "X-Request-Id",
        "X-Alga-Tenant", "X-Alga-Extension", "X-Alga-Anything", "X-Idempotency-Key", "Traceparent",
        "X-Forwarded-For", "X-Custom", "Set-Cookie", "X-Runner-Service-Token ",
    ]),
    st.text(st.sampled_from("abcxyz-_!#$%&'*+.^`|~0123456789"), min_size=1, max_size=12),
)
VALUES = st.one_of(
    st.sampled_from(["close", "keep-alive", "x-alga-tenant, x-request-id", "cookie, accept",
                     "accept, user-agent", "Upgrade, x-idempotency-key", "traceparent, x-alga-anything",
                     "gzip", "*/*", "fuzz-request-id.1"]),
    st.text(st.characters(min_codepoint=0, max_codepoint=255, exclude_characters="\r\n"), max_size=30),
    st.builds(lambda a, sep, b: a + sep + b, st.text("abc;=, ", max_size=8),
              st.sampled_from(["\r\n ", "\r\n\t", "\n", "\r", "\x00", "\x0b", "\x7f", "\xff"]),
              st.text("abc;=, ", max_size=8)),
    st.integers(1000, 40000).map(lambda n: "v" * n),  # huge
)
#: Credentials only under credential names (a secret sent as, say, an X-Request-Id is logged as one).
HEADERS = st.one_of(st.tuples(NAMES, VALUES), st.tuples(CREDENTIAL_NAMES, CREDENTIALS | VALUES))


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    pairs = draw(st.lists(HEADERS, max_size=8))
    out = []
    for name, value in pairs:
        if name.lower().strip() in ("x-fuzz-id", "host", "content-length", "transfer-encoding", "expect"):
            continue
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    if draw(st.booleans()) and out:  # duplicates
        out.append(draw(st.sampled_from(out)))
    # Servers join repeated headers into one line: keep each under the stand-in's own 64 KiB line
    # limit, or it refuses the request (431) before recording it and the check cannot tell.
    kept, size = [], {}
    for name, value in out:
        key = name.lower().strip()
        if size.get(key, 0) + len(value) + 2 < 60_000:
            size[key] = size.get(key, 0) + len(value) + 2
            kept.append((name, value))
    return kept


ROUTES = st.sampled_from([
    ("GET", f"/runner/ext-ui/{EXT}/{HASH_ENC}/index.html?tenant=t1"),
    ("HEAD", f"/runner/ext-ui/{EXT}/{HASH_ENC}/app.js"),
    ("GET", "/runner/-/status"),
    ("POST", "/v1/execute"),
])


@given(route=ROUTES, headers=header_lists())
@examples(60)
def test_fuzzed_headers(fz: Fuzzed, route: tuple[str, str], headers: list[tuple[bytes, bytes]]) -> None:
    method, target = route
    body = None
    if method == "POST":
        body = json.dumps(envelope()).encode()
        headers = [*headers, (b"Content-Type", b"application/json")]
    exchange(fz, method, target.encode(), headers, body)


# -- execute bodies

def _json_nest(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10),
    _json_nest, max_leaves=12,
)
CTX_KEYS = st.sampled_from(["tenant_id", "extension_id", "content_hash", "install_id", "request_id",
                            "version_id", "config"])
TOP_KEYS = st.sampled_from(["context", "http", "limits", "providers", "secret_envelope", "user", "x"])
HTTP_KEYS = st.sampled_from(["method", "path", "query", "headers", "body_b64"])


def deep(n: int, leaf: str = "null") -> str:
    return "[" * n + leaf + "]" * n


@st.composite
def execute_bodies(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    kind = draw(st.integers(0, 6))
    headers: list[tuple[bytes, bytes]] = [(b"Content-Type", b"application/json")]
    if draw(st.booleans()):
        headers.append((b"X-Idempotency-Key", draw(st.sampled_from([b"k1", b"same-key", b"\xe9t\xe9"]))))
    if kind == 0:  # any JSON at all
        return json.dumps(draw(JSON)).encode(), headers
    if kind == 1:  # deep nesting, bare or inside a valid envelope
        n = draw(st.sampled_from([10, 500, 900, 960, 975, 990, 1000, 1100, 5000, 100_000]))
        where = draw(st.sampled_from(["bare", "user", "x", "config", "query"]))
        if where == "bare":
            return deep(n).encode(), headers
        env = envelope()
        if where in ("user", "x"):
            env[where] = "@@DEEP@@"
        elif where == "config":
            env["context"]["config"] = "@@DEEP@@"
        else:
            env["http"]["query"] = "@@DEEP@@"
        text = json.dumps(env).replace('"@@DEEP@@"', '{"k": ' + deep(n) + "}")
        return text.encode(), headers
    if kind == 2:  # not UTF-8 / other encodings
        env = json.dumps(envelope(), ensure_ascii=False)
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "garbage"]))
        if codec == "garbage":
            return draw(st.binary(min_size=1, max_size=60)), headers
        return (env.replace("tenant-1", "t\xe9n\xe0nt") if codec == "latin-1" else env).encode(codec), headers
    # a valid envelope with fields replaced by anything
    env = envelope()
    for _ in range(draw(st.integers(1, 3))):
        part = draw(st.sampled_from(["top", "ctx", "http"]))
        value = draw(JSON | st.sampled_from(["", "\x00", "a\r\nX-Injected: 1", "é", "\u2028", "%0d%0a",
                                              HASH.upper(), "sha256:" + "0" * 63, -1, 2**70, 1.5, True]))
        if part == "top":
            env[draw(TOP_KEYS)] = value
        elif part == "ctx" and isinstance(env.get("context"), dict):
            env["context"][draw(CTX_KEYS)] = value
        elif isinstance(env.get("http"), dict):
            env["http"][draw(HTTP_KEYS)] = value
    return json.dumps(env).encode(), headers


@given(case=execute_bodies())
@examples(80)
def test_fuzzed_execute_bodies(fz: Fuzzed, case: tuple[bytes, list[tuple[bytes, bytes]]]) -> None:
    body, headers = case
    answer, environ, received = exchange(fz, "POST", b"/v1/execute", headers, body)
    assert answer is not None and environ is not None
    assert answer.status != 500
    for r in received:  # what reached the runner is JSON, and the ids travel as headers
        doc = json.loads(r.body)
        assert r.headers["x-alga-tenant"] == doc["context"]["tenant_id"]
        assert r.headers["x-alga-extension"] == doc["context"]["extension_id"]


# --------------------------------------------------------------------------- canonical paths

RAW_ALPHABET = st.sampled_from([*"abz09-._~!$&'()*+,=:@/é", "%2e", "%2E", "%2f", "%5c", "%25", "%3b", "%41",
                                "%c3%a9", "%ff", "%00", "%7f", "%", "%g1", ".", "..", "\\", ";", "\x01",
                                "\u202e", "\x7f", " "])


def server_decoded(raw: str) -> str:
    """PATH_INFO as werkzeug/waitress make it: percent-decoded bytes, read as latin-1."""
    return unquote_to_bytes(raw).decode("latin-1")


@given(tail=st.lists(RAW_ALPHABET, max_size=24).map("".join),
       key=st.sampled_from(["RAW_URI", "REQUEST_URI", None]), script=st.sampled_from(["", "/app"]))
@examples(400)
def test_canonical_tail_and_encode(tail: str, key: str | None, script: str) -> None:
    raw = script + "/runner/" + tail
    wire = raw.encode("utf-8").decode("latin-1")  # what a server reads from the request line
    path_info = server_decoded(wire)[len(script):]
    environ = {key: wire} if key else {}
    try:
        segments = canonical_tail(environ, path_info, 1)
    except InvalidPath:
        return
    out = encode(segments)
    assert out.isascii()
    pieces = out.split("/")
    assert not {".", ".."} & set(pieces), out
    low = out.lower()
    for bad in ("%2e", "%2f", "%5c", "\\", ";", "?", "#", " "):
        assert bad not in low, out
    assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in out), out
    assert [unquote_to_bytes(p).decode("latin-1") for p in pieces] == segments
    for seg in segments:
        seg.encode("latin-1").decode("utf-8")  # the URL is UTF-8, as promised
    if key:  # with the raw form, nothing encoded may have slipped through as a separator
        assert len(segments) == wire[len(script):].split("?")[0].count("/") - 1, (wire, out)


# --------------------------------------------------------------------------- the loader

TAGS = st.sampled_from(["", "!!str ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!binary ",
                        "!!timestamp ", "!!map ", "!!seq ", "!!set ", "!!omap ", "!custom ",
                        "!!python/name:os.system ", "&a ", "*a ", "<<: ", "? "])
SCALARS = st.one_of(
    st.sampled_from(["${RUNNER_BACKEND}", "${X:-1}", "$${", "${", "${A B}", "${EXT_GATEWAY_TIMEOUT_MS:-x}",
                     "{file: /nonexistent}", "{file: ''}", "{file: .}", "[1, 2", "'unterminated", "\"\\q\"",
                     "~", "null", "0x1F", "1e400", "-1", "2026-13-45", "2001-12-14t21:59:43.10-05:00", "yes",
                     "http://a@b", "http://[::1", "http://x:99999", "\t", "- - -", "{", "}", ":", "|", ">",
                     "%TAG", "---", "...", "\x00", "\ufeff", "\x85", "é", "10.0.0.0/33", "::1/129"]),
    st.text(max_size=12), st.integers().map(str),
)


@st.composite
def mutated_configs(draw: st.DrawFn) -> str:
    lines = SHIPPED.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 6))
        i = draw(st.integers(0, len(lines) - 1))
        if op == 0 and len(lines) > 1:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[draw(st.integers(0, len(lines) - 1))])
        elif op == 2 and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(TAGS)}{draw(SCALARS)}"
        elif op == 3:
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + draw(st.text(max_size=4)) + lines[i][pos:]
        elif op == 4:
            lines[i] = draw(st.sampled_from(["", " ", "  ", "\t"])) + lines[i].lstrip()
        elif op == 5:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            indent = draw(st.sampled_from(["", "  ", "    "]))
            lines.insert(i, f"{indent}{draw(SCALARS)}: {draw(TAGS)}{draw(SCALARS)}")
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\r\n"]))


ENVS = st.dictionaries(
    st.sampled_from(["RUNNER_BACKEND", "RUNNER_BASE_URL", "RUNNER_DOCKER_HOST", "RUNNER_PUBLIC_BASE",
                     "RUNNER_SERVICE_TOKEN", "EXT_GATEWAY_TIMEOUT_MS"]),
    st.one_of(SCALARS, st.sampled_from(["knative", "docker", "http://h:1", "/runner", "100", "0", "1e3"])),
    max_size=4,
)


def only_config_error(text: str, env: dict[str, str]) -> Config | None:
    try:
        return config_from_text(text, env=env, base_dir=ROOT / "config")
    except ConfigError as exc:
        assert exc.issues and str(exc)
        return None


@given(text=mutated_configs(), env=ENVS)
@examples(150)
def test_mutations_of_the_shipped_config(text: str, env: dict[str, str]) -> None:
    only_config_error(text, env)


@given(text=st.text(max_size=200))
@examples(100)
def test_random_text(text: str) -> None:
    only_config_error(text, {})


KEYS = st.sampled_from(["version", "backend", "backends", "kind", "url", "timeouts", "read_ms", "access",
                        "tokens", "networks", "service_token", "upstream", "file", "docker", "x"])
KEYS |= st.text(max_size=6)


def _nest(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4)


DOCS = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                    _nest, max_leaves=15)


@given(doc=DOCS, style=st.sampled_from([None, "'", '"', "|"]), flow=st.booleans())
@examples(100)
def test_random_yaml_documents(doc: Any, style: str | None, flow: bool) -> None:
    text = yaml.safe_dump(doc, default_style=style, default_flow_style=flow, allow_unicode=True)
    only_config_error(text, {})
    if isinstance(doc, dict):  # and the same under a valid head
        head = {"version": 1, "backend": "d", "backends": {"d": {"kind": "docker", "url": "http://h:1"}}}
        only_config_error(yaml.safe_dump({**head, **doc}, default_flow_style=flow, allow_unicode=True), {})


@given(data=st.binary(max_size=300) | mutated_configs().map(lambda t: t.encode("utf-8", "surrogatepass")))
@examples(60)
def test_load_config_reads_any_bytes(data: bytes) -> None:
    fd, name = tempfile.mkstemp(suffix=".yaml", prefix="fuzz-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        with contextlib.suppress(ConfigError):
            load_config(name, env={})
    finally:
        os.unlink(name)


@pytest.mark.parametrize("value", ["!!timestamp soon", "!!timestamp 2026-13-45x", '!!int ""', "!!float ''",
                                   "!!int\n", "!!float \x85", "!!bool maybe"])
def test_a_bad_tag_value_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError):
        config_from_text(SHIPPED.replace("pool_size: 16", f"pool_size: {value}"), env={})


# -- errors never echo a secret

SECRET_SHAPES = st.sampled_from([
    "[{s}]", "{{a: {s}}}", "{{file: {s}, x: 1}}", "'{s} with space'", "\"{s}\\n\"", "{s}\t", "[[{s}]]",
    "{{{s}: 1}}", "'{s}' # comment", "{s}{s}" + "x" * 4,
])


@given(shape=SECRET_SHAPES, where=st.sampled_from(["upstream", "backend", "tokens"]))
@examples(60)
def test_config_errors_never_echo_a_secret(shape: str, where: str) -> None:
    value = shape.format(s=TEST_SERVICE_TOKEN)
    base = SHIPPED
    if where == "upstream":
        text = base.replace("service_token: ${RUNNER_SERVICE_TOKEN:-}", f"service_token: {value}")
    elif where == "backend":
        anchor = "    public_base: /runner  "
        text = base.replace(anchor, f"    service_token: {value}\n{anchor}")
    else:
        text = base.replace("tokens: []", f"tokens: [{value}]")
    assert text != base
    try:
        config_from_text(text, env={}, base_dir=ROOT / "config")
    except ConfigError as exc:
        assert TEST_SERVICE_TOKEN not in str(exc), str(exc)


@pytest.mark.parametrize("value", ["!!int {s}", "!!binary {s}", "!vault {s}", "${{{s}}}"])
def test_a_secret_with_a_bad_tag_or_expression_is_not_echoed(value: str) -> None:
    text = SHIPPED.replace("service_token: ${RUNNER_SERVICE_TOKEN:-}",
                           f"service_token: {value.format(s=TEST_SERVICE_TOKEN)}")
    with pytest.raises(ConfigError) as info:
        config_from_text(text, env={})
    assert TEST_SERVICE_TOKEN not in str(info.value)
