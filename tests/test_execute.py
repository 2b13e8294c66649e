"""/v1/execute through real HTTP to a stand-in runner: every rule, checked on what the runner got."""

from __future__ import annotations

import base64
import copy
import itertools
import json
import logging
import math
import re
import socket
import time
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from mwfixtures import (
    EXT,
    HASH,
    HOST,
    SERVICE_TOKEN,
    TENANT,
    Gateway,
    echo,
    envelope,
    reply_envelope,
    running_gateway,
)
from standin import (
    DRIP_BODY,
    DripRunner,
    GarbageRunner,
    HugeHeadersRunner,
    NonJsonRunner,
    ResetMidBodyRunner,
    SilentRunner,
    closed_port,
)

from runner_mw.execute import strict_json

pytest_plugins = ["mwfixtures"]


def sent_envelope(gw: Gateway, index: int = -1) -> dict[str, Any]:
    return json.loads(gw.runner.received[index].body)  # type: ignore[no-any-return]


def assert_gateway_error(resp: requests.Response, status: int, code: str) -> None:
    """Our JSON error: status, code, the request id, no-store, and nothing else in the body."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body == {"error": code, "requestId": resp.headers["X-Request-Id"]}
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Content-Type"] == "application/json"


# -- the happy path ------------------------------------------------------------------------------


def test_an_execute_round_trip(gateway: Gateway) -> None:
    resp = gateway.execute()
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    rid = resp.headers["X-Request-Id"]
    (got,) = gateway.runner.received
    assert (got.method, got.raw_path) == ("POST", "/v1/execute")
    assert got.headers["host"] == gateway.upstream_host
    assert got.headers["content-type"] == "application/json"
    assert got.headers["x-alga-tenant"] == TENANT and got.headers["x-alga-extension"] == EXT
    assert got.headers["x-request-id"] == rid
    assert got.headers["x-runner-service-token"] == SERVICE_TOKEN
    assert int(got.headers["content-length"]) == len(got.body)
    sent = json.loads(got.body)
    assert sent["context"]["request_id"] == rid
    assert sent["http"] == envelope()["http"]
    assert echo(resp) == {"tenant": TENANT, "extension": EXT, "method": "POST", "path": "/hello?a=1",
                          "body": "hi there", "request_id": rid, "runner": f"{gateway.kind}-runner"}


def test_every_json_value_reaches_the_runner_unchanged(gateway: Gateway) -> None:
    # Integers beyond 64 bits and lone surrogates take the standard library's encoder;
    # non-ASCII text and floats the fast one.
    extra = {"big": 2**70, "neg": -(2**64), "lone": "\ud800", "text": "café \u2028 </script>",
             "float": 1.5e300, "small": 0.1, "nested": [None, True, {"a": []}]}
    resp = gateway.execute({**envelope(), "extra": extra})  # a key the runner ignores
    assert resp.status_code == 200
    assert sent_envelope(gateway)["extra"] == extra
    resp = gateway.execute({**envelope(), "extra": {"text": "café"}})
    assert resp.status_code == 200
    assert sent_envelope(gateway)["extra"] == {"text": "café"}


@pytest.mark.parametrize("where", ["path", "header-value", "header-name", "config", "provider"])
def test_a_lone_surrogate_where_the_runner_reads_a_string_is_a_400(gateway: Gateway, where: str) -> None:
    # Valid JSON, but the runner's parser refuses it in a string (a 422 the gateway could only
    # call a 502); in a key the runner ignores it passes unchanged (above).
    env = envelope()
    if where == "path":
        env["http"]["path"] = "/\ud800"
    elif where == "header-value":
        env["http"]["headers"] = {"x-a": "\udc00"}
    elif where == "header-name":
        env["http"]["headers"] = {"x-\ud800": "a"}
    elif where == "config":
        env["context"]["config"] = {"k": "ok \udfff"}
    else:
        env["providers"] = ["a", "\ud801"]
    resp = gateway.execute(env)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "invalid_request" and "lone surrogate" in resp.json()["detail"]
    assert gateway.runner.received == []


def test_lone_surrogates_and_nesting_the_runner_ignores_pass_unchanged(gateway: Gateway) -> None:
    # orjson refuses a lone surrogate (the slow path): not a field the runner reads as text.
    deep: Any = "end"
    for _ in range(100):  # within the runner's parser's 128 levels
        deep = [deep]
    env = envelope()
    env["context"]["extra"] = "\ud800"
    env["context"]["nested"] = deep
    resp = gateway.execute(env)
    assert resp.status_code == 200, resp.text
    sent = sent_envelope(gateway)
    assert sent["context"]["extra"] == "\ud800"
    assert sent["context"]["nested"] == deep


@pytest.mark.parametrize("key", [None, "retry-1"])
@pytest.mark.parametrize("first", [None, 2**70, "\ud800"], ids=["deep", "big-int-first", "surrogate-first"])
def test_nesting_beyond_what_orjson_writes_is_refused_at_once(gateway: Gateway, key: str | None,
                                                              first: Any) -> None:
    # Beyond 255 levels (the runner's parser stops at 128) the body went through the slow
    # fallbacks, each walking it again: 3 400 arrays 300 deep cost 1.4 s of CPU a request.
    # Told by orjson's message at first, which names what it met first: a big integer
    # before the deep part hid it.
    deep: Any = "end"
    for _ in range(300):
        deep = [deep]
    env = envelope() if first is None else {"a_first": first, **envelope()}  # written before context
    env["context"]["nested"] = deep
    resp = gateway.execute(env, headers={"X-Idempotency-Key": key} if key else None)
    assert resp.status_code == 400, resp.text
    assert resp.json()["detail"] == "the body nests too deeply"
    assert gateway.runner.received == []


@pytest.mark.parametrize("depth", [256, 600, 1000, 1020])
def test_a_hook_never_sees_a_body_nested_past_what_orjson_writes(kind: str, depth: int) -> None:
    # orjson reads 1 024 levels (the standard library stopped near 990): an auditing hook that
    # dumps the envelope met the recursion limit, a 500 with a traceback per request.
    seen: list[int] = []

    def audit(environ: dict[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
        json.dumps(envelope)
        seen.append(1)
        return envelope

    body = json.dumps(envelope())[:-1] + ', "ignored": ' + "[" * depth + "]" * depth + "}"
    with running_gateway(kind, execute_hook=audit) as gw:
        resp = gw.execute(body.encode())
        assert resp.status_code == 400 and resp.json()["detail"] == "the body nests too deeply", resp.text
        assert seen == [] and gw.runner.received == []
        assert gw.execute().status_code == 200 and seen == [1]  # a plain body still reaches it


def test_a_body_nested_to_the_parsers_limit_is_a_400_never_a_500(gateway: Gateway) -> None:
    # Nested one level short of what json.loads takes, the body parsed; writing it again
    # (orjson stops at 255 levels, the standard library needs a frame more than the parse)
    # raised RecursionError: a 500 and a traceback per request.
    def post(depth: int, key: bool) -> int:
        body = json.dumps(envelope())[:-1] + ', "ignored": ' + "[" * depth + "]" * depth + "}"
        headers = {"X-Idempotency-Key": "retry-1"} if key else {}
        return gateway.execute(body.encode(), headers=headers).status_code

    low, high = 300, 100_000  # parses at 300; not at 100 000: find the first depth that does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if post(middle, key=False) != 400 else (low, middle)
    depths = range(max(300, high - 12), high)
    statuses = {(depth, key): post(depth, key) for depth in depths for key in (True, False)}
    assert 500 not in statuses.values(), statuses
    assert set(statuses.values()) <= {200, 400, 502}, statuses


@pytest.mark.parametrize("where", ["http", "top", "nested"])
def test_a_lone_surrogate_in_any_key_is_a_400(gateway: Gateway, where: str) -> None:
    # The runner's parser reads every key as text, an ignored one too: a 422 it would answer
    # could only be a 502 here.
    env = envelope()
    deep: dict[str, Any] = {"a": [{"b\udc00": 1}]}
    if where == "http":
        env["http"]["x\ud800"] = "a"
    elif where == "top":
        env["\ud800"] = 1
    else:
        env["context"]["extra"] = deep
    resp = gateway.execute(env)
    assert resp.status_code == 400, resp.text
    assert "lone surrogate" in resp.json()["detail"]
    assert gateway.runner.received == []


def test_the_query_of_execute_is_not_forwarded(gateway: Gateway) -> None:
    assert gateway.execute(params={"debug": "1"}).status_code == 200
    assert gateway.runner.received[0].raw_path == "/v1/execute"


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8",
                                   "Application/JSON", "application/json ;charset=UTF-8"])
def test_json_content_types_are_accepted(gateway: Gateway, ctype: str) -> None:
    resp = gateway.raw("POST", "/v1/execute", [("Content-Type", ctype)], json.dumps(envelope()).encode())
    assert resp.status == 200
    assert gateway.runner.received[0].headers["content-type"] == "application/json"


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/json-patch+json",
                                   "application/jsonx", "text/json"])
def test_other_content_types_are_415(gateway: Gateway, ctype: str | None) -> None:
    headers = {} if ctype is None else {"Content-Type": ctype}
    resp = gateway.request("POST", "/v1/execute", data=json.dumps(envelope()).encode(), headers=headers)
    assert resp.status_code == 415 and resp.json()["error"] == "unsupported_media_type"
    assert gateway.runner.received == []


# -- the envelope ----------------------------------------------------------------------------------


def mutated(path: str, value: Any) -> dict[str, Any]:
    env: Any = envelope()
    *parents, last = path.split(".")
    node = env
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return env  # type: ignore[no-any-return]


DELETE = object()
BAD_ENVELOPES: list[tuple[str, Any, str]] = [
    ("not-json", b"{nope", "JSON"),
    ("not-utf8", b'{"a": "\xff\xfe\xfa"}', "UTF-8"),
    ("array", b"[]", "object"),
    ("string", b'"x"', "object"),
    ("empty-body", b"", "JSON"),
    ("nested-too-deep", b"[" * 100_000 + b"]" * 100_000, "JSON"),
    # json.loads takes these; orjson would send them on as null.
    *[(f"number-{word}", json.dumps({**envelope(), "extra": [1.5]}).replace("1.5", word).encode(), "finite")
      for word in ("NaN", "Infinity", "-Infinity", "1e400")],
    ("no-context", mutated("context", DELETE), "context"),
    ("context-list", mutated("context", []), "context"),
    ("no-tenant", mutated("context.tenant_id", DELETE), "context.tenant_id"),
    ("empty-tenant", mutated("context.tenant_id", ""), "context.tenant_id"),
    ("int-tenant", mutated("context.tenant_id", 7), "context.tenant_id"),
    ("no-extension", mutated("context.extension_id", DELETE), "context.extension_id"),
    ("null-extension", mutated("context.extension_id", None), "context.extension_id"),
    ("no-hash", mutated("context.content_hash", DELETE), "context.content_hash"),
    ("hash-no-prefix", mutated("context.content_hash", HASH[7:]), "context.content_hash"),
    ("hash-md5", mutated("context.content_hash", "md5:" + HASH[7:39]), "context.content_hash"),
    ("hash-short", mutated("context.content_hash", HASH[:-1]), "context.content_hash"),
    ("hash-not-hex", mutated("context.content_hash", HASH[:-1] + "g"), "context.content_hash"),
    ("hash-trailing-newline", mutated("context.content_hash", HASH + "\n"), "context.content_hash"),
    ("hash-look-alike", mutated("context.content_hash", "\u017fha256:" + "a" * 64), "context.content_hash"),
    ("int-request-id", mutated("context.request_id", 5), "context.request_id"),
    ("int-install-id", mutated("context.install_id", 5), "context.install_id"),
    ("config-int-value", mutated("context.config", {"a": 1}), "context.config"),
    ("no-http", mutated("http", DELETE), "http"),
    ("no-method", mutated("http.method", DELETE), "http.method"),
    ("empty-path", mutated("http.path", ""), "http.path"),
    ("query-int-value", mutated("http.query", {"a": 1}), "http.query"),
    ("headers-list", mutated("http.headers", ["a"]), "http.headers"),
    ("body-b64-int", mutated("http.body_b64", 3), "http.body_b64"),
    ("limits-string", mutated("limits", "fast"), "limits"),
    ("timeout-negative", mutated("limits", {"timeout_ms": -1}), "limits.timeout_ms"),
    ("timeout-string", mutated("limits", {"timeout_ms": "100"}), "limits.timeout_ms"),
    ("timeout-bool", mutated("limits", {"timeout_ms": True}), "limits.timeout_ms"),
    ("timeout-float", mutated("limits", {"timeout_ms": 1.5}), "limits.timeout_ms"),
    ("fuel-negative", mutated("limits", {"fuel": -5}), "limits.fuel"),
    ("providers-string", mutated("providers", "p"), "providers"),
    ("providers-int-items", mutated("providers", [1]), "providers"),
    ("user-string", mutated("user", "u"), "user"),
    ("secret-envelope-list", mutated("secret_envelope", []), "secret_envelope"),
]


@pytest.mark.parametrize(("body", "detail"), [(b, d) for _, b, d in BAD_ENVELOPES],
                         ids=[n for n, _, _ in BAD_ENVELOPES])
def test_bad_envelopes_are_400_with_a_detail(gateway: Gateway, body: Any, detail: str) -> None:
    resp = gateway.execute(body)
    assert resp.status_code == 400, resp.text
    data = resp.json()
    assert data["error"] == "invalid_request" and detail in data["detail"]
    assert data["requestId"] == resp.headers["X-Request-Id"]
    assert gateway.runner.received == []


def test_upper_case_hash_hex_is_accepted(gateway: Gateway) -> None:
    assert gateway.execute(envelope(content_hash=HASH.upper().replace("SHA256", "sha256"))).status_code == 200


UNSENDABLE_IDS = ["t1\r\nX-Injected: 1", "t1\nx", "租户"]


@pytest.mark.parametrize("field", ["tenant_id", "extension_id"])
@pytest.mark.parametrize("value", UNSENDABLE_IDS, ids=["crlf", "lf", "non-latin1"])
def test_ids_that_cannot_travel_as_headers_are_never_sent(gateway: Gateway, field: str, value: str) -> None:
    resp = gateway.execute(envelope(**{field: value}))
    assert resp.status_code in (400, 500) and resp.json()["error"] in ("invalid_request", "internal_error")
    assert gateway.runner.received == []  # no header injection, nothing sent
    assert "Injected" not in resp.text and "X-Injected" not in resp.headers


@pytest.mark.parametrize("value", UNSENDABLE_IDS, ids=["crlf", "lf", "non-latin1"])
def test_ids_that_cannot_travel_as_headers_are_invalid_requests(gateway: Gateway, value: str) -> None:
    resp = gateway.execute(envelope(tenant_id=value))
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"


# -- transport headers ------------------------------------------------------------------------------


def test_routing_headers_are_filled_from_the_envelope_or_must_match(gateway: Gateway) -> None:
    ok = gateway.execute(headers={"X-Alga-Tenant": TENANT, "X-Alga-Extension": EXT, "X-Alga-User": "u1"})
    assert ok.status_code == 200
    got = gateway.runner.received[0].headers
    assert (got["x-alga-tenant"], got["x-alga-extension"], got["x-alga-user"]) == (TENANT, EXT, "u1")
    for name, value, key in (("X-Alga-Tenant", "other-tenant", "tenant_id"),
                             ("X-Alga-Extension", "com.evil.ext", "extension_id")):
        bad = gateway.execute(headers={name: value})
        assert bad.status_code == 400 and key in bad.json()["detail"]
    assert len(gateway.runner.received) == 1


def test_the_request_id_is_kept_or_made_and_put_in_the_context(gateway: Gateway) -> None:
    kept = gateway.execute(headers={"X-Request-Id": "req-123"})
    assert kept.headers["X-Request-Id"] == "req-123"
    assert gateway.runner.received[0].headers["x-request-id"] == "req-123"
    assert sent_envelope(gateway)["context"]["request_id"] == "req-123"
    own = gateway.execute(envelope(request_id="from-envelope"), headers={"X-Request-Id": "req-456"})
    assert own.status_code == 200
    assert sent_envelope(gateway)["context"]["request_id"] == "from-envelope"
    assert gateway.runner.received[-1].headers["x-request-id"] == "req-456"
    made = gateway.execute(headers={"X-Request-Id": "bad id\x7f"})
    rid = made.headers["X-Request-Id"]
    assert rid != "bad id\x7f" and gateway.runner.received[-1].headers["x-request-id"] == rid
    assert sent_envelope(gateway)["context"]["request_id"] == rid


def test_idempotency_key_is_passed_bound_to_its_caller_and_replays(gateway: Gateway) -> None:
    # The runner's replay cache is global: the gateway forwards the key bound to the whole call.
    first = gateway.execute(headers={"X-Idempotency-Key": "idem-1", "X-Request-Id": "one"})
    second = gateway.execute(headers={"X-Idempotency-Key": "idem-1", "X-Request-Id": "two"})
    other = gateway.execute(envelope(tenant_id="tenant-2"),
                            headers={"X-Idempotency-Key": "idem-1", "X-Request-Id": "three"})
    keys = [r.headers["x-idempotency-key"] for r in gateway.runner.received]
    assert keys[0] == keys[1] != keys[2]
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)  # never the caller's own text
    assert first.content == second.content  # the runner's cached reply, request id "one" inside
    assert echo(second)["request_id"] == "one"
    assert echo(other)["request_id"] == "three" and echo(other)["tenant"] == "tenant-2"


def test_an_idempotency_key_replays_only_the_same_call_of_the_same_caller(gateway: Gateway) -> None:
    # Bound only to tenant + extension, one user's key replayed another user's result (their
    # data) and a reused key replayed another call's. A client's own request_id does not count.
    def call(user: str, path: str, request_id: str) -> dict[str, Any]:
        env = envelope(request_id=request_id)
        env["http"]["path"] = path
        env["user"] = {"user_id": user, "user_email": f"{user}@x", "user_name": user, "user_type": "internal"}
        resp = gateway.execute(env, headers={"X-Idempotency-Key": "save-1"})
        assert resp.status_code == 200
        return echo(resp)

    alice = call("alice", "/notes/1", "r1")
    assert call("bob", "/notes/1", "r2")["request_id"] == "r2"  # not alice's reply
    assert call("alice", "/notes/2", "r3")["request_id"] == "r3"  # another call
    assert call("alice", "/notes/1", "r4") == alice  # a retry of the same call replays
    keys = [r.headers["x-idempotency-key"] for r in gateway.runner.received]
    assert len(set(keys)) == 3 and keys[0] == keys[3]


def test_an_empty_idempotency_key_is_no_key(gateway: Gateway) -> None:
    key = ""  # (servers strip a value's surrounding whitespace: "  " arrives as this)
    # Hashed, "" became a real key shared by every caller of a tenant: the second got the first's reply.
    one, two = envelope(), envelope()
    one["http"]["path"], two["http"]["path"] = "/one", "/two"
    first = gateway.execute(one, headers={"X-Idempotency-Key": key})
    second = gateway.execute(two, headers={"X-Idempotency-Key": key})
    assert echo(first)["path"].startswith("/one") and echo(second)["path"].startswith("/two")
    assert all("x-idempotency-key" not in r.headers for r in gateway.runner.received)


def test_allowed_headers_pass_and_everything_else_is_dropped(gateway: Gateway) -> None:
    headers = {
        "Accept": "application/json", "User-Agent": "ua/1", "Traceparent": "00-" + "a" * 32 + "-" + "b" * 16
        + "-01", "Tracestate": "vendor=x", "X-Idempotency-Key": "k1", "X-Alga-Install": "inst-1",
        "Authorization": "Bearer secret", "Cookie": "sid=secret", "Proxy-Authorization": "Basic x",
        "X-Runner-Service-Token": "client-supplied", "X-Forwarded-For": "1.2.3.4", "Forwarded": "for=1.2.3.4",
        "X-Real-Ip": "1.2.3.4", "X-Custom": "1", "Accept-Encoding": "gzip", "Accept-Language": "fr",
        "Origin": "https://evil.example", "Referer": "https://evil.example/x", "Keep-Alive": "timeout=5",
        "TE": "trailers", "X-Tenant-Id": "other",
    }
    assert gateway.execute(headers=headers).status_code == 200
    got = gateway.runner.received[0].headers
    expected = {"host", "content-length", "content-type", "accept", "user-agent", "traceparent",
                "tracestate", "x-idempotency-key", "x-alga-install", "x-alga-tenant", "x-alga-extension",
                "x-request-id", "x-runner-service-token", "accept-encoding"}
    assert set(got) == expected
    assert got["x-runner-service-token"] == SERVICE_TOKEN
    assert got["accept-encoding"] == "identity"  # the gateway reads the reply: no compression
    assert (got["accept"], got["user-agent"], got["tracestate"]) == ("application/json", "ua/1", "vendor=x")
    assert got["traceparent"] == headers["Traceparent"]


def test_headers_named_in_connection_are_dropped_first(gateway: Gateway) -> None:
    resp = gateway.execute(headers={"Connection": "traceparent, X-Alga-Debug", "Traceparent": "x",
                                    "X-Alga-Debug": "1", "Tracestate": "kept=1"})
    assert resp.status_code == 200
    got = gateway.runner.received[0].headers
    assert "traceparent" not in got and "x-alga-debug" not in got and got["tracestate"] == "kept=1"


def test_service_token_absent_unless_configured(kind: str) -> None:
    with running_gateway(kind) as gw:
        assert gw.execute(headers={"X-Runner-Service-Token": "client-supplied"}).status_code == 200
        assert "x-runner-service-token" not in gw.runner.received[0].headers


def test_a_backend_service_token_overrides_the_global_one(kind: str) -> None:
    with running_gateway(kind, upstream={"service_token": "global-token-0123456789"},
                         backend={"service_token": "backend-token-0123456789"}) as gw:
        assert gw.execute().status_code == 200
        assert gw.runner.received[0].headers["x-runner-service-token"] == "backend-token-0123456789"


# -- limits.timeout_ms -------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "sent"), [(None, 9000), (0, 9000), (5000, 5000), (9000, 9000),
                                             (9001, 9000), (600000, 9000)])
def test_timeout_is_set_or_clamped_below_the_read_deadline(gateway: Gateway, given: int | None,
                                                          sent: int) -> None:
    env = envelope()
    if given is not None:
        env["limits"] = {"timeout_ms": given, "memory_mb": 64}
    assert gateway.execute(env).status_code == 200
    limits = sent_envelope(gateway)["limits"]  # shared gateways: read_ms 10000
    assert limits["timeout_ms"] == sent
    if given is not None:
        assert limits["memory_mb"] == 64


def test_timeout_margin_follows_the_backend_read_deadline(kind: str) -> None:
    with running_gateway(kind, backend={"timeouts": {"read_ms": 2000}}) as gw:
        assert gw.execute().status_code == 200
        assert 1000 < json.loads(gw.runner.received[0].body)["limits"]["timeout_ms"] < 2000


# -- the runner's reply ------------------------------------------------------------------------------


def test_the_reply_is_passed_byte_for_byte(gateway: Gateway) -> None:
    body = ('{ "status" : 201,"headers":{"x-é":"ü"},\n"body_b64":"aGk=", "error":null,'
            '"extra":[1,2.50,{"k":true}] }').encode()
    gateway.runner.respond("/v1/execute", 200, [
        ("Content-Type", "application/json"), ("Cache-Control", "public, max-age=31536000, immutable"),
        ("Set-Cookie", "sid=runner"), ("X-Runner-Internal", "1")], body)
    resp = gateway.execute()
    assert resp.status_code == 200 and resp.content == body
    assert resp.headers["Cache-Control"] == "no-store"
    assert "Set-Cookie" not in resp.headers and "X-Runner-Internal" not in resp.headers
    assert "x-standin" not in resp.headers


@pytest.mark.parametrize(("error", "shown"), [
    ("execute_failed: wasm trap at /srv/bundles/secret/component.wasm:0x1f", "execute_failed"),
    ("bundle_fetch_failed: s3://internal-bucket/key denied", "bundle_fetch_failed"),
    ("missing_routing_headers", "missing_routing_headers"),
    (None, None),
])
def test_runner_error_text_is_reduced_to_its_code(gateway: Gateway, error: str | None,
                                                 shown: str | None) -> None:
    gateway.runner.respond("/v1/execute", 200, [("Content-Type", "application/json")],
                           reply_envelope(500, error, body=None))
    resp = gateway.execute()
    assert resp.status_code == 200
    data = resp.json()
    assert data["error"] == shown and data["status"] == 500 and data["body_b64"] is None
    assert "secret" not in resp.text and "internal-bucket" not in resp.text


@pytest.mark.parametrize("reply", [
    b'{"status":500,"error":"execute_failed: /var/lib/runner/secret.wasm trap","error":"execute_failed"}',
    b'{"status":500,"error":"execute_failed: /var/lib/runner/secret.wasm trap","error":null}',
    b'{"status":500,"\\u0065rror":"execute_failed: /var/lib/runner/secret.wasm trap"}',
    b'{"status":500,"\\u0065rror":"execute_failed: /var/lib/runner/secret.wasm trap",'
    b'"error":"execute_failed"}',
    '{"status":500,"error":"execute_failed: /var/lib/runner/secret.wasm trap","error":"execute_failed"}'
    .encode("utf-16-le"),
    b'{"status":500,"error":{"detail":"execute_failed: /var/lib/runner/secret.wasm trap"}}',
    b'{"status":500,"error":"trap at /var/lib/runner/secret.wasm: 0x1f"}',
], ids=["duplicate", "duplicate-null", "escaped-key", "escaped-duplicate", "utf-16-duplicate", "object",
        "text-before-a-colon"])
def test_runner_error_text_cannot_hide_in_the_replys_bytes(gateway: Gateway, reply: bytes) -> None:
    # JSON keeps a duplicate key's last value: the bytes passed through would keep the first.
    gateway.runner.respond("/v1/execute", 200, [("Content-Type", "application/json")], reply)
    resp = gateway.execute()
    assert resp.status_code == 200 and "/var/lib" not in resp.text, resp.text
    assert resp.json()["status"] == 500


def test_a_reply_nested_to_the_parsers_limit_is_a_502_never_a_500(gateway: Gateway) -> None:
    # A reply with error text is written again without it; nested nearly as deep as the
    # parser takes, writing it raised RecursionError (orjson writes 255 levels at most, the
    # standard library needs more frames than the parse): a 500 and a traceback per request.
    def post(depth: int, error: str | None) -> requests.Response:
        reply = (b'{"status":500,"error":' + json.dumps(error).encode() + b',"x":'
                 + b"[" * depth + b"]" * depth + b"}")
        gateway.runner.respond("/v1/execute", 200, [("Content-Type", "application/json")], reply)
        return gateway.execute()

    low, high = 300, 100_000  # read at 300; not at 100 000: find the first depth that is not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if post(middle, None).status_code == 200 else (low, middle)
    for depth in [*range(250, 260), *range(high - 12, high + 2)]:
        resp = post(depth, "execute_failed: /var/lib/runner/secret.wasm trap")
        assert resp.status_code in (200, 502), (depth, resp.status_code)
        assert "/var/lib" not in resp.text


@pytest.mark.parametrize("error", ["Not found", "validation failed", "", "500"])
def test_an_extensions_own_error_passes_as_it_came(gateway: Gateway, error: str) -> None:
    # The runner passes the extension's own error through: its UI's to show, not runner text.
    reply = json.dumps({"status": 404, "headers": {}, "body_b64": None, "error": error},
                       separators=(",", ":")).encode()
    gateway.runner.respond("/v1/execute", 200, [("Content-Type", "application/json")], reply)
    assert gateway.execute().content == reply


def test_trusted_callers_see_the_runner_error_text(kind: str) -> None:
    text = "execute_failed: wasm trap at /srv/x.wasm"
    with running_gateway(kind, routes={"expose_runner_errors": True}) as gw:
        gw.runner.respond("/v1/execute", 200, [("Content-Type", "application/json")],
                          reply_envelope(500, text))
        assert gw.execute().json()["error"] == text


def test_the_reply_size_is_capped(kind: str) -> None:
    with running_gateway(kind, limits={"max_reply_bytes": 1024}) as gw:
        small = reply_envelope(body=b"x" * 500)
        gw.runner.respond("/v1/execute", 200, [("Content-Type", "application/json")], small)
        assert gw.execute().content == small
        big = reply_envelope(body=b"x" * 5000)
        gw.runner.respond("/v1/execute", 200, [("Content-Type", "application/json")], big)
        assert_gateway_error(gw.execute(), 502, "bad_gateway")
        gw.runner.respond("/v1/execute", 200, [("Content-Type", "application/json")], big, chunked=True)
        assert_gateway_error(gw.execute(), 502, "bad_gateway")
        assert gw.get("/runner/-/healthz").status_code == 200


@pytest.mark.parametrize(("status", "body", "ours", "code"), [
    (500, b"internal runner panic at src/main.rs:42", 502, "bad_gateway"),
    (404, b"", 502, "bad_gateway"),
    (422, b"Failed to deserialize the JSON body", 502, "bad_gateway"),
    (503, b"upstream connect error", 502, "bad_gateway"),
    (413, b"Failed to buffer the request body: length limit exceeded", 413, "payload_too_large"),
    (200, b"oops, not json", 502, "bad_gateway"),
    (200, b"", 502, "bad_gateway"),
    (200, b'{"status": "200"}', 502, "bad_gateway"),
    (200, b"[1, 2]", 502, "bad_gateway"),
    (200, b'{"status": 200, "headers": {}, "body_b64": null, "error": "x: y", "n": NaN}', 502, "bad_gateway"),
], ids=["500", "404", "422", "503", "413", "non-json", "empty", "status-not-int", "not-an-object", "nan"])
def test_runner_failures_are_mapped_without_runner_text(gateway: Gateway, status: int, body: bytes,
                                                        ours: int, code: str) -> None:
    gateway.runner.respond("/v1/execute", status, [("Content-Type", "text/plain")], body)
    resp = gateway.execute()
    assert_gateway_error(resp, ours, code)
    assert len(gateway.runner.received) == 1


def test_a_body_over_the_runners_own_limit_is_413(kind: str) -> None:
    # The gateway allows 3 MiB; the (stand-in) runner refuses above 2 MiB with a plain-text 413.
    with running_gateway(kind, limits={"max_body_bytes": 3 * 1024 * 1024}) as gw:
        env = envelope()
        env["http"]["body_b64"] = base64.b64encode(b"x" * (2 * 1024 * 1024)).decode()
        assert_gateway_error(gw.execute(env), 413, "payload_too_large")
        assert gw.runner.received[0].body_unread


# -- request body limits ------------------------------------------------------------------------------

SMALL_LIMIT = {"max_body_bytes": 2000}
JSON = {"Content-Type": "application/json"}


def padded(size: int) -> bytes:
    """An envelope of exactly ``size`` bytes."""
    env = envelope()
    base = len(json.dumps(env).encode())
    env["http"]["headers"] = {"pad": ""}
    base = len(json.dumps(env).encode())
    env["http"]["headers"] = {"pad": "p" * (size - base)}
    data = json.dumps(env).encode()
    assert len(data) == size
    return data


@pytest.mark.parametrize("server", ["werkzeug", "waitress"])
def test_body_cap_from_content_length_before_reading(kind: str, server: str) -> None:
    with running_gateway(kind, server=server, limits=SMALL_LIMIT) as gw:
        assert gw.execute(padded(2000)).status_code == 200
        assert_gateway_error(gw.execute(padded(2001)), 413, "payload_too_large")
        assert len(gw.runner.received) == 1


def test_body_cap_is_decided_before_the_body_arrives(kind: str) -> None:
    with running_gateway(kind, limits=SMALL_LIMIT) as gw:
        with socket.create_connection((HOST, gw.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/execute HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 5000000000\r\n\r\n" + b"{" * 100)
            head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 413")
        assert gw.runner.received == []


def chunks(data: bytes, size: int = 700) -> Any:
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("server", ["werkzeug", "waitress"])
def test_chunked_bodies_are_read_and_capped(kind: str, server: str) -> None:
    with running_gateway(kind, server=server, limits=SMALL_LIMIT) as gw:
        data = padded(1990)
        ok = gw.request("POST", "/v1/execute", data=chunks(data), headers=JSON)
        assert ok.status_code == 200, ok.text
        (got,) = gw.runner.received
        assert "transfer-encoding" not in got.headers and int(got.headers["content-length"]) == len(got.body)
        assert json.loads(got.body)["http"] == json.loads(data)["http"]
        over = gw.request("POST", "/v1/execute", data=chunks(padded(2600)), headers=JSON)
        assert_gateway_error(over, 413, "payload_too_large")
        assert len(gw.runner.received) == 1


def test_a_chunked_body_over_the_limit_is_refused_once_it_is_over(kind: str) -> None:
    # One chunk past max_body_bytes, the connection left open: the server's reader must not
    # be asked for more than the limit allows (it would wait for 64 KiB that never come).
    with running_gateway(kind, limits=SMALL_LIMIT) as gw, \
            socket.create_connection((HOST, gw.port), timeout=10) as sock:
        over = SMALL_LIMIT["max_body_bytes"] + 500
        sock.sendall(b"POST /v1/execute HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % over + b"{" * over)
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")
        assert gw.runner.received == []


def test_a_malformed_chunked_body_is_a_400(kind: str) -> None:
    with running_gateway(kind) as gw, socket.create_connection((HOST, gw.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/execute HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n")
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 400"), head[:200]
        assert gw.runner.received == []


def test_a_body_shorter_than_its_content_length_is_refused(kind: str) -> None:
    with running_gateway(kind) as gw, socket.create_connection((HOST, gw.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/execute HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"context\":")
        sock.shutdown(socket.SHUT_WR)
        head = sock.recv(65536)
        assert head == b"" or head.startswith(b"HTTP/1.1 400")
        assert gw.runner.received == []


# -- the execute hook ------------------------------------------------------------------------------


def test_execute_hook_binds_the_envelope_to_the_caller(kind: str) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def hook(environ: Any, env: dict[str, Any]) -> dict[str, Any]:
        calls.append((environ["PATH_INFO"], json.loads(json.dumps(env))))
        session = environ.get("HTTP_X_SESSION")
        if session is None:
            raise PermissionError("no session")
        env["context"]["tenant_id"] = f"tenant-of-{session}"
        env["user"] = {"user_id": session, "user_email": f"{session}@x", "user_name": session,
                       "user_type": "internal"}
        return env

    with running_gateway(kind, execute_hook=hook) as gw:
        resp = gw.execute(envelope(tenant_id="claimed-by-client"), headers={"X-Session": "alice"})
        assert resp.status_code == 200
        got = gw.runner.received[0]
        assert got.headers["x-alga-tenant"] == "tenant-of-alice"
        sent = json.loads(got.body)
        assert sent["context"]["tenant_id"] == "tenant-of-alice" and sent["user"]["user_id"] == "alice"
        assert calls[0][0] == "/v1/execute" and calls[0][1]["context"]["tenant_id"] == "claimed-by-client"
        denied = gw.execute()
        assert_gateway_error(denied, 403, "forbidden")
        mismatch = gw.execute(headers={"X-Session": "bob", "X-Alga-Tenant": "claimed-by-client"})
        assert mismatch.status_code == 400
        assert len(gw.runner.received) == 1


def test_a_hook_may_break_the_envelope_or_fail_without_leaking(kind: str) -> None:
    def hook(environ: Any, env: dict[str, Any]) -> Any:
        if environ.get("HTTP_X_MODE") == "break":
            del env["context"]
            return env
        if environ.get("HTTP_X_MODE") == "forget":
            env["context"]["tenant_id"] = "bound"  # edited in place, nothing returned: the host's bug
            return None
        raise RuntimeError("hook exploded with secret detail /etc/shadow")

    with running_gateway(kind, execute_hook=hook) as gw:
        broken = gw.execute(headers={"X-Mode": "break"})  # the hook removed what the client sent
        assert_gateway_error(broken, 500, "internal_error")
        failed = gw.execute()
        assert_gateway_error(failed, 500, "internal_error")
        assert "shadow" not in failed.text
        forgot = gw.execute(headers={"X-Mode": "forget"})  # not the client's fault: no 400
        assert_gateway_error(forgot, 500, "internal_error")
        assert gw.runner.received == []


def test_an_envelope_the_hook_broke_is_the_hosts_500_and_the_clients_own_mistake_its_400(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    def hook(environ: Any, env: dict[str, Any]) -> dict[str, Any]:
        env["context"]["tenant_id"] = "tenant-of-session"  # fills in what the client left out
        if environ.get("HTTP_X_MODE") == "numeric-user":
            env["user"] = {"user_id": 42, "user_email": "a@x", "user_name": "a", "user_type": "internal"}
        return env

    caplog.set_level(logging.ERROR, logger="runner_mw")
    with running_gateway(kind, execute_hook=hook) as gw:
        bare = envelope()
        del bare["context"]["tenant_id"]  # the hook's to set: not the client's mistake
        assert gw.execute(bare).status_code == 200
        broken = gw.execute(bare, headers={"X-Mode": "numeric-user"})
        assert_gateway_error(broken, 500, "internal_error")
        assert "user.user_id" not in broken.text
        logged = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(logged) == 1 and broken.headers["X-Request-Id"] in logged[0].getMessage()
        assert ("execute_hook returned an envelope the runner would refuse: user.user_id must be a string"
                in caplog.text)
        # The client's own mistakes, which the hook passed on as they came: 400 with the detail.
        for field, value, detail in (("user", {"user_id": 7}, "user.user_id must be a string"),
                                     ("http", {"method": "", "path": "/x"}, "http.method must be")):
            mistaken = {**bare, field: value}
            resp = gw.execute(mistaken)
            assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"
            assert detail in resp.json()["detail"]
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
        assert len(gw.runner.received) == 1


def test_a_clients_mistake_stays_its_400_when_the_hook_adds_beside_it(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    def hook(environ: Any, env: dict[str, Any]) -> dict[str, Any]:
        env["http"]["headers"]["x-caller"] = "alice"  # the host's own entries beside the client's
        env["context"]["config"] = {**env["context"].get("config", {}), "plan": "gold"}
        if environ.get("HTTP_X_MODE") == "whitelist":
            return {k: v for k, v in env.items() if k in ("context", "http")}
        if environ.get("HTTP_X_MODE") == "rekey":  # header names lower-cased, a provider first
            env["http"]["headers"] = {k.lower(): v for k, v in env["http"]["headers"].items()}
            env["providers"] = ["host.audit", *[p for p in env.get("providers", []) if p != "secrets"]]
        if environ.get("HTTP_X_MODE") == "host-provider":
            env["providers"] = [*env.get("providers", []), 5]
        return env

    caplog.set_level(logging.ERROR, logger="runner_mw")
    with running_gateway(kind, execute_hook=hook) as gw:
        cases = [
            ({"http": {**envelope()["http"], "headers": {"x-n": 1}}},
             "http.headers must be an object of strings"),
            ({"context": {**envelope()["context"], "config": {"k": 2}}},
             "context.config must be an object of strings"),
        ]
        cases += [
            ({"http": {**envelope()["http"], "headers": {"X-Trace": 5}}}, "http.headers must be"),
            ({"providers": ["secrets", "kv", 5]}, "providers must be a list of strings"),
        ]
        for (change, detail), mode in itertools.product(cases, ("", "rekey")):
            resp = gw.execute({**envelope(), **change}, headers={"X-Mode": mode})
            assert resp.status_code == 400, (mode, resp.text)
            assert detail in resp.json()["detail"]
        # A lone surrogate the client sent in a key the hook kept (and an "a" it dropped).
        body = json.dumps({**envelope(), "a": 0}).encode()
        body = body.replace(b'"headers": {}', b'"headers": {"\\ud800": "v"}')
        assert b"\\ud800" in body
        resp = gw.execute(body, headers={"X-Mode": "whitelist"})
        assert resp.status_code == 400 and "http.headers holds text" in resp.json()["detail"], resp.text
        nested = body.replace(b'"a": 0', b'"a": 0, "http2": 1').replace(
            b'"path": "/hello"', b'"path": "/hello", "extra": {"k": {"\\udfff": 1}}')
        resp = gw.execute(nested, headers={"X-Mode": "whitelist"})
        assert resp.status_code == 400 and "holds text" in resp.json()["detail"], resp.text
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        # The host's own mistakes: its 500, logged.
        appended = gw.execute({**envelope(), "providers": ["kv"]}, headers={"X-Mode": "host-provider"})
        assert_gateway_error(appended, 500, "internal_error")
        assert "refuse: providers must be a list of strings" in caplog.text
        assert gw.runner.received == []


def test_whose_mistake_when_the_hook_rewrites_text_drops_a_field_or_adds_a_cycle(
        kind: str, caplog: pytest.LogCaptureFixture) -> None:
    class Node(dict):  # type: ignore[type-arg]  # a host's own mapping type
        pass

    def hook(environ: Any, env: dict[str, Any]) -> dict[str, Any]:
        mode = environ.get("HTTP_X_MODE")
        if mode == "upper":  # normalises what the client sent
            env["http"]["method"] = env["http"]["method"].upper()
        if mode == "user":  # from a session row whose NULL column was left out
            env["user"] = {"user_id": "u1", "user_email": "u@x", "user_name": "U"}
        if mode == "header":  # in place
            env["http"]["headers"] = {**env["http"].get("headers", {}), "x-caller": "alice"}
        if mode == "deepcopy":
            env = copy.deepcopy(env)
            env["http"] = {**env["http"], "headers": {"x-caller": "alice"}}
        if mode == "json":
            env = json.loads(json.dumps(env))
        if mode == "rebuild":  # an allow-list of fields, the method normalised
            http = env["http"]
            env["http"] = {k: v for k, v in http.items() if k in ("path", "query", "headers")}
            if "method" in http:
                env["http"]["method"] = http["method"].upper()
        if mode == "cycle":
            node = Node()
            node["self"] = node
            env["host"] = node
        return env

    caplog.set_level(logging.ERROR, logger="runner_mw")
    with running_gateway(kind, execute_hook=hook) as gw:
        body = json.dumps(envelope()).encode().replace(b'"method": "POST"', b'"method": "post\\udcff"')
        assert b"\\udcff" in body
        resp = gw.execute(body, headers={"X-Mode": "upper"})
        assert resp.status_code == 400 and "http.method holds text" in resp.json()["detail"], resp.text
        assert caplog.records == []
        # The client sent no user: the missing user_type is the host's. Sent without it
        # (and passed on as it came), the client's.
        incomplete = {**envelope(), "user": {"user_id": "u1", "user_email": "u@x", "user_name": "U"}}
        resp = gw.execute(incomplete)
        assert resp.status_code == 400 and resp.json()["detail"] == "user.user_type must be a string"
        assert caplog.records == []
        assert_gateway_error(gw.execute(headers={"X-Mode": "user"}), 500, "internal_error")
        assert "refuse: user.user_type must be a string" in caplog.text
        # A part the client sent, whatever the hook did with it (edited in place, copied,
        # rebuilt from its fields), owns its missing fields: never an error line that any
        # client could add to the host's log with its own omission.
        no_http = {"context": envelope()["context"]}  # nobody wrote http: the client's to send
        resp = gw.execute(no_http)
        assert resp.status_code == 400 and resp.json()["detail"] == "http must be an object"
        no_method = {**envelope(), "http": {"path": "/x"}}
        errors = len(caplog.records)
        extra = {**envelope(), "http": {"path": "/x", "note": "dropped by the allow-list"}}
        for mode, body in (("header", no_method), ("deepcopy", no_method), ("json", no_method),
                           ("rebuild", extra), ("", no_method)):
            resp = gw.execute(body, headers={"X-Mode": mode})
            assert resp.status_code == 400, (mode, resp.text)
            assert resp.json()["detail"] == "http.method must be a non-empty string"
        assert len(caplog.records) == errors
        assert_gateway_error(gw.execute(headers={"X-Mode": "cycle"}), 500, "internal_error")
        assert "refuse: the body nests too deeply" in caplog.text
        assert gw.runner.received == []


def test_a_body_that_is_no_object_is_400_at_every_depth_with_a_hook(kind: str) -> None:
    # The hook never runs for it, and its body is never parsed twice (a second parse a few
    # frames deeper met the recursion limit the first one had just passed: a 500).
    with running_gateway(kind, execute_hook=lambda environ, env: env) as gw:
        for depth in range(900, 1000):
            body = b"[" * depth + b"1234567890123456789" + b"]" * depth  # 19 digits: the stdlib's parse
            resp = gw.execute(body)
            assert resp.status_code == 400, (depth, resp.text)


# -- upstream failures ---------------------------------------------------------------------------


def test_a_closed_port_is_502_runner_unreachable(kind: str) -> None:
    quick = {"retry": {"attempts": 2, "backoff_ms": 10}} if kind == "knative" else None
    with running_gateway(kind, runner_url=f"http://{HOST}:{closed_port()}", backend=quick) as gw:
        assert_gateway_error(gw.execute(), 502, "runner_unreachable")


def test_an_unresolvable_host_is_502_runner_unreachable(kind: str) -> None:
    with running_gateway(kind, runner_url="http://runner-does-not-exist.invalid:8085",
                         backend={"retry": {"attempts": 1}} if kind == "knative" else None) as gw:
        assert_gateway_error(gw.execute(timeout=60), 502, "runner_unreachable")


def test_a_silent_runner_is_504_within_the_read_deadline_and_never_retried(kind: str) -> None:
    with SilentRunner() as silent, running_gateway(kind, runner_url=silent.url,
                                                   timeouts={"read_ms": 500}) as gw:
        started = time.monotonic()
        resp = gw.execute()
        elapsed = time.monotonic() - started
        assert_gateway_error(resp, 504, "runner_timeout")
        assert 0.4 < elapsed < 1.5, elapsed  # well before 3x the read deadline
        assert silent.connections == 1  # the request was sent: never sent again


@pytest.mark.parametrize("head_at_once", [False, True], ids=["dripped-head", "dripped-body"])
def test_read_ms_is_the_total_deadline_of_an_execute_call(kind: str, head_at_once: bool) -> None:
    body = b" " * 200 + DRIP_BODY
    with DripRunner(0.05, body=body, head_at_once=head_at_once) as drip, \
            running_gateway(kind, runner_url=drip.url, timeouts={"read_ms": 300}) as gw:
        try:
            resp = gw.execute(timeout=1.0)  # over 3x the deadline: the gateway must have answered
        except requests.Timeout:
            pytest.fail("no answer within 3x read_ms")
        assert_gateway_error(resp, 504, "runner_timeout")
        assert drip.connections == 1


@pytest.mark.parametrize("fault", [ResetMidBodyRunner, GarbageRunner, NonJsonRunner, HugeHeadersRunner],
                         ids=lambda f: f.__name__)
def test_broken_runners_are_502_bad_gateway_and_not_retried(kind: str, fault: Any) -> None:
    with fault() as runner, running_gateway(kind, runner_url=runner.url) as gw:
        resp = gw.execute()
        assert_gateway_error(resp, 502, "bad_gateway")
        assert "oops" not in resp.text and "SSH" not in resp.text
        assert runner.connections == 1


@pytest.mark.parametrize("codec", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
                                   "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("text", ['{"a": "\u00e9\u4e2d"}', "{}", "{", '["x"]', '"s"', "7"])
def test_strict_json_reads_every_encoding_json_loads_reads(codec: str, text: str) -> None:
    # The UTF-8 shortcut (a "{" whose next byte is not NUL) must never take a UTF-16 or -32
    # body for UTF-8: both read the same, or both refuse.
    data = text.encode(codec)
    try:
        expected = json.loads(data)
    except ValueError:
        with pytest.raises(ValueError):
            strict_json(data)
        return
    assert strict_json(data) == expected


def _stdlib_json(data: bytes) -> Any:
    """What strict_json was before orjson read for it: the reference it must agree with."""
    from runner_mw import execute

    text = data.decode(json.detect_encoding(data), "surrogatepass")
    return execute._DECODER.decode(text)


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 == 1.0 and 0.0 == -0.0 are not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b)


def _outcome(read: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "value", read(data)
    except RecursionError:
        return "error", "RecursionError"
    except UnicodeDecodeError:
        return "error", "UnicodeDecodeError"
    except ValueError as exc:  # _NonFinite, or not JSON
        return "error", type(exc).__name__ if type(exc).__name__ == "_NonFinite" else "ValueError"


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**18])
    | st.text(st.characters(codec="utf-8") | st.sampled_from(["\ud800", "\udfff", "\u2028", "\x00"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(value=_JSON_VALUES, ascii_only=st.booleans(), cut=st.integers(min_value=0, max_value=40),
       insert=st.sampled_from([b"", b"NaN", b"1e400", b"-Infinity", b"\xed\xa0\x80", b"\xff", b",", b"0" * 20,
                               "\ufeff".encode(), b'"\\ud800"', b"\t"]))
def test_strict_json_reads_what_the_standard_library_reads(value: Any, ascii_only: bool, cut: int,
                                                           insert: bytes) -> None:
    # orjson reads for it where it can: every body must read to the same value (types
    # included: an integer beyond 64 bits must never become a float), or fail the same way.
    data = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    for body in (data, data[:cut] + insert + data[cut:], insert + data):
        expected, got = _outcome(_stdlib_json, body), _outcome(strict_json, body)
        if expected[0] == "value":
            assert got[0] == "value" and _same(got[1], expected[1]), (body, got, expected)
        else:
            assert got == expected, body


def test_strict_json_reads_long_numbers_exactly() -> None:
    for text in ("18446744073709551616", "-9223372036854775809", "123456789012345678901234567890",
                 "9223372036854775808", "-9223372036854775808", "18446744073709551615", "999999999999999999"):
        for body in (text.encode(), b'{"n":' + text.encode() + b"}", b"[" + text.encode() + b".5]"):
            assert _same(strict_json(body), _stdlib_json(body)), body


@pytest.mark.parametrize("levels", [1, 2, 253, 254, 255, 256, 300])
@pytest.mark.parametrize("kind", [list, dict])
def test_the_depth_walk_agrees_with_orjson(levels: int, kind: type) -> None:
    # At exactly orjson's limit the walk said "not too deep": a 255-level body still went
    # through the slow fallbacks and on to the runner.
    import orjson

    from runner_mw.execute import _too_deep

    doc: Any = "leaf"
    for _ in range(levels):
        doc = [doc] if kind is list else {"k": doc}
    try:
        orjson.dumps(doc)
        refused = False
    except TypeError:
        refused = True
    assert _too_deep(doc) is refused
