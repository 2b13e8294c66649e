"""RunnerMiddleware: routing, fall-through to real Flask and Pyramid apps, request ids, the
gateway's own endpoints, and its access log."""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mwfixtures import (
    ACCESS_TOKEN,
    EXT,
    HASH,
    INDEX,
    SERVICE_TOKEN,
    TENANT,
    Gateway,
    config_for,
    envelope,
    running_gateway,
    send,
    serve_wsgi,
    wait_until,
)
from standin import StandinRunner, closed_port
from werkzeug.test import EnvironBuilder

from runner_mw import RunnerMiddleware

pytest_plugins = ["mwfixtures"]

HEX32 = re.compile(r"[0-9a-f]{32}")


# -- routing -------------------------------------------------------------------------------------


APP_PATHS = [
    "/", "/index.html", "/v1/execute/", "/v1/execute/more", "/v1/executeX", "/v1/execute.json",
    "/v1/exec", "/v2/execute", "/V1/execute", "/v1/Execute", "/runnerX", "/runnerX/ext-ui/a",
    "/runner.js", "/runner-/ext-ui/a", "/RUNNER/ext-ui/a", "/Runner", "/x/runner/ext-ui/a",
]


@pytest.mark.parametrize("path", APP_PATHS)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_other_paths_belong_to_the_app(gateway: Gateway, path: str, method: str) -> None:
    resp = gateway.request(method, path, data=b"{}", headers={"Content-Type": "application/json"})
    assert resp.status_code == 200 and resp.headers["X-From-App"] == "yes"
    assert resp.json() == {"app": True, "path": path}
    assert "X-Request-Id" not in resp.headers
    assert gateway.runner.received == []


def test_an_encoded_slash_after_execute_is_the_apps(gateway: Gateway) -> None:
    resp = gateway.raw("POST", "/v1/execute%2F", [("Content-Type", "application/json")], b"{}")
    assert resp.status == 200 and resp.json() == {"app": True, "path": "/v1/execute/"}
    assert gateway.runner.received == []


@pytest.mark.parametrize("path", ["/runner", "/runner/", "/runner/ext-ui", "/runner/other/x",
                                  "/runner/static/app.js", "/runner/-/nope", "/runner/-/healthz/",
                                  "/runner/-"])
def test_our_paths_outside_the_forwarded_prefixes_are_404_locally(gateway: Gateway, path: str) -> None:
    resp = gateway.get(path)
    assert resp.status_code == 404
    assert resp.json() == {"error": "not_found", "requestId": resp.headers["X-Request-Id"]}
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Content-Type"] == "application/json"
    assert gateway.runner.received == [] and gateway.app.seen == []


def test_other_asset_prefixes_are_forwarded_when_configured() -> None:
    with running_gateway(routes={"asset_prefixes": ["ext-ui/", "static/"]}) as gw:
        gw.runner.respond("/static/", 200, [("Content-Type", "text/css")], b"body{}")
        resp = gw.get("/runner/static/app.css?v=1")
        assert resp.status_code == 200 and resp.content == b"body{}"
        assert gw.runner.received[0].raw_path == "/static/app.css?v=1"
        assert gw.get("/runner/other/x").status_code == 404
        assert len(gw.runner.received) == 1


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
def test_execute_takes_only_post(gateway: Gateway, method: str) -> None:
    resp = gateway.request(method, "/v1/execute")
    assert resp.status_code == 405 and resp.headers["Allow"] == "POST"
    if method != "HEAD":
        assert resp.json()["error"] == "method_not_allowed"
    assert gateway.runner.received == [] and gateway.app.seen == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", [INDEX, "/runner/", "/runner/-/healthz"])
def test_runner_paths_take_only_get_and_head(gateway: Gateway, method: str, path: str) -> None:
    resp = gateway.request(method, path, data=b"x")
    assert resp.status_code == 405 and resp.headers["Allow"] == "GET, HEAD"
    assert resp.json()["error"] == "method_not_allowed"
    assert gateway.runner.received == []


# -- request ids ---------------------------------------------------------------------------------

OUR_RESPONSES: list[tuple[str, str, dict[str, str], bytes | None, int]] = [
    ("GET", INDEX + f"?tenant={TENANT}", {}, None, 200),
    ("HEAD", INDEX + f"?tenant={TENANT}", {}, None, 200),
    ("GET", "/runner/", {}, None, 404),
    ("GET", "/runner/ext-ui/%2e%2e/x", {}, None, 400),
    ("DELETE", INDEX, {}, None, 405),
    ("GET", "/v1/execute", {}, None, 405),
    ("POST", "/v1/execute", {"Content-Type": "application/json"}, json.dumps(envelope()).encode(), 200),
    ("POST", "/v1/execute", {"Content-Type": "text/plain"}, b"{}", 415),
    ("POST", "/v1/execute", {"Content-Type": "application/json"}, b"nope", 400),
    ("GET", "/runner/-/healthz", {}, None, 200),
    ("GET", "/runner/-/status", {}, None, 200),
]


@pytest.mark.parametrize(("method", "path", "headers", "body", "status"), OUR_RESPONSES,
                         ids=[f"{m}-{p[:24]}-{s}" for m, p, _, _, s in OUR_RESPONSES])
def test_every_response_of_ours_carries_a_request_id(gateway: Gateway, method: str, path: str,
                                                     headers: dict[str, str], body: bytes | None,
                                                     status: int) -> None:
    resp = gateway.request(method, path, headers=headers, data=body)
    assert resp.status_code == status
    assert HEX32.fullmatch(resp.headers["X-Request-Id"])
    given = gateway.request(method, path, headers={**headers, "X-Request-Id": "client.id-42_A"}, data=body)
    assert given.status_code == status and given.headers["X-Request-Id"] == "client.id-42_A"
    if status >= 400 and method != "HEAD":
        assert given.json()["requestId"] == "client.id-42_A"
        assert set(given.json()) <= {"error", "requestId", "detail"}


@pytest.mark.parametrize(("given", "kept"), [
    ("a", True), ("A.b-c_9", True), ("x" * 128, True), ("x" * 129, False), ("has space", False),
    ("semi;colon", False), ("slash/", False), ("é", False), ("", False),
])
def test_only_sane_client_request_ids_are_kept(gateway: Gateway, given: str, kept: bool) -> None:
    resp = gateway.get("/runner/", headers={"X-Request-Id": given.encode("utf-8").decode("latin-1")})
    rid = resp.headers["X-Request-Id"]
    assert rid == given if kept else HEX32.fullmatch(rid)


def test_a_request_id_that_is_a_credential_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    # The access line logs the id unredacted, and it travels to the runner and back.
    caplog.set_level(logging.INFO, logger="runner_mw.access")
    with running_gateway(access={"networks": [], "tokens": [ACCESS_TOKEN]},
                         upstream={"service_token": SERVICE_TOKEN}) as gw:
        bearer = {"Authorization": f"Bearer {ACCESS_TOKEN}"}
        for rid, headers in ((ACCESS_TOKEN, bearer), (f"x-{SERVICE_TOKEN}", bearer),
                             ("sid-value-0123456789", {**bearer, "Cookie": "sid=sid-value-0123456789"}),
                             (f"{SERVICE_TOKEN[4:]}.1", bearer), (f"req-{ACCESS_TOKEN[:-2]}", bearer)):
            resp = gw.execute(headers={**headers, "X-Request-Id": rid})
            assert HEX32.fullmatch(resp.headers["X-Request-Id"]), resp.headers["X-Request-Id"]
        sent = [r.headers["x-request-id"] for r in gw.runner.received]
        assert len(sent) == 5 and all(HEX32.fullmatch(rid) for rid in sent)
        ok = gw.execute(headers={"Authorization": f"Bearer {ACCESS_TOKEN}", "X-Request-Id": "plain-id-7"})
        assert ok.headers["X-Request-Id"] == "plain-id-7"
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert ACCESS_TOKEN[:-2] not in text and SERVICE_TOKEN[4:] not in text


def test_each_request_gets_a_new_id(gateway: Gateway) -> None:
    ids = {gateway.get("/runner/").headers["X-Request-Id"] for _ in range(5)}
    assert len(ids) == 5


# -- fall-through to real apps ---------------------------------------------------------------------


def flask_app(seen: list[dict[str, Any]]) -> Any:
    from flask import Flask, jsonify, request

    app = Flask("inline_flask_app")

    @app.before_request
    def capture() -> Any:
        # Before routing can answer 404/405: every request reaches this "view".
        seen.append(dict(request.environ))
        ui = request.environ.get("runner_mw.ui_url")
        return jsonify(app="flask", path=request.path, body=request.get_data().decode("latin-1"),
                       ui_url=ui(EXT, HASH, "/settings", TENANT) if ui else None,
                       execute_url=request.environ.get("runner_mw.execute_url"))

    return app


def pyramid_app(seen: list[dict[str, Any]]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # webob imports cgi on Python 3.11+
        from pyramid.config import Configurator
        from pyramid.response import Response

    def view(request: Any) -> Any:
        seen.append(dict(request.environ))
        ui = request.environ.get("runner_mw.ui_url")
        doc = {"app": "pyramid", "path": request.path_info, "body": request.body.decode("latin-1"),
               "ui_url": ui(EXT, HASH, "/settings", TENANT) if ui else None}
        return Response(json.dumps(doc).encode(), content_type="application/json")

    with Configurator() as config:
        config.add_route("everything", "/*rest")
        config.add_view(view, route_name="everything")
        return config.make_wsgi_app()


APPS: dict[str, Callable[[list[dict[str, Any]]], Any]] = {"flask": flask_app, "pyramid": pyramid_app}
VOLATILE = {"REMOTE_PORT"}  # differs per connection


class Toggle:
    """One served WSGI app that is either the framework app alone or wrapped by the middleware."""

    def __init__(self, inner: Any, wrapped: Any) -> None:
        self.inner, self.wrapped, self.use_middleware = inner, wrapped, False

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return (self.wrapped if self.use_middleware else self.inner)(environ, start_response)


@pytest.fixture(params=sorted(APPS))
def framework(request: pytest.FixtureRequest) -> Iterator[tuple[str, Toggle, list[dict[str, Any]], Any]]:
    seen: list[dict[str, Any]] = []
    app = APPS[request.param](seen)
    with StandinRunner() as runner:
        mw = RunnerMiddleware(app, config_for(runner.url), reload_signal=False)
        toggle = Toggle(app, mw)
        try:
            with serve_wsgi(toggle) as served:
                yield served.url, toggle, seen, runner
        finally:
            mw.close()


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/hello?x=1&y=%2F", None), ("POST", "/v1/execute/", b'{"a": 1}'),
    ("PUT", "/v1/execute/more", b"raw \x00 bytes"), ("GET", "/runnerX/a", None), ("DELETE", "/", None),
])
def test_the_app_sees_the_same_environ_plus_two_keys(framework: Any, method: str, path: str,
                                                    body: bytes | None) -> None:
    url, toggle, seen, runner = framework
    headers = {"Cookie": "sid=abc", "Authorization": "Bearer x", "X-Custom": "1",
               "Content-Type": "application/octet-stream", "X-Request-Id": "keep-me"}
    answers = []
    for use in (False, True):
        toggle.use_middleware = use
        resp = send(method, url + path, data=body, headers=headers)
        assert resp.status_code == 200
        answers.append(resp.json())
    without, with_mw = seen[-2:]
    assert set(with_mw) - set(without) == {"runner_mw.ui_url", "runner_mw.execute_url"}
    assert set(without) - set(with_mw) == set()
    for key, value in without.items():
        if isinstance(value, str) and key not in VOLATILE:
            assert with_mw[key] == value, key
    assert answers[0]["body"] == answers[1]["body"] == (body or b"").decode("latin-1")
    assert answers[0]["path"] == answers[1]["path"]
    assert answers[0]["ui_url"] is None
    assert answers[1]["ui_url"].startswith(f"/runner/ext-ui/{EXT}/")
    assert "X-Request-Id" not in resp.headers or resp.headers["X-Request-Id"] == "keep-me"
    assert runner.received == []


@pytest.mark.parametrize("path", ["/v1/execute/", "/anything", "/runnerX"])
def test_environ_is_unchanged_but_for_ui_url_and_execute_url_in_process(path: str) -> None:
    def build() -> dict[str, Any]:
        return EnvironBuilder(path=path, method="POST", data=b"body", query_string="a=1",
                              headers={"Cookie": "c=1", "X-Thing": "t"}).get_environ()

    got: list[dict[str, Any]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        got.append(dict(environ))
        got[-1]["body"] = environ["wsgi.input"].read()
        start_response("204 No Content", [])
        return []

    mw = RunnerMiddleware(app, config_for("http://127.0.0.1:9"), reload_signal=False)
    plain, wrapped = build(), build()
    expected = dict(plain)
    app(plain, lambda *a: None)
    mw(wrapped, lambda *a: None)
    alone, through = got
    assert set(through) == set(alone) | {"runner_mw.ui_url", "runner_mw.execute_url"}
    for key in alone:
        if key != "wsgi.input":
            assert through[key] == alone[key], key
    assert through["body"] == b"body"
    assert set(expected) | {"body"} == set(alone)
    assert through["runner_mw.ui_url"](EXT, HASH) == mw.ui_url(EXT, HASH)
    assert through["runner_mw.execute_url"] == "/v1/execute"


def test_ui_url_honours_the_mount_point_and_loads_through_the_gateway() -> None:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    seen: list[dict[str, Any]] = []
    with StandinRunner() as runner:
        mw = RunnerMiddleware(flask_app(seen), config_for(runner.url), reload_signal=False)
        root = DispatcherMiddleware(lambda e, s: [], {"/app": mw})
        try:
            with serve_wsgi(root) as served:
                resp = send("GET", served.url + "/app/page")
                ui_url = resp.json()["ui_url"]
                assert ui_url.startswith(f"/app/runner/ext-ui/{EXT}/sha256%3A")
                assert seen[-1]["SCRIPT_NAME"] == "/app"
                assert resp.json()["execute_url"] == "/app/v1/execute"
                page = send("GET", served.url + ui_url)
                assert page.status_code == 200 and page.headers["Content-Type"] == "text/html"
                assert b"<html" in page.content.lower()
                (got,) = runner.received
                assert got.path == f"/ext-ui/{EXT}/{HASH}/index.html"
                assert f"tenant={TENANT}" in got.query
        finally:
            mw.close()


def test_execute_url_is_the_middlewares_mount_not_the_apps() -> None:
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    seen: list[dict[str, Any]] = []
    with StandinRunner() as runner:
        # The middleware at the root, the app mounted below it by a dispatcher: the app's own
        # script root (/app) is not where /v1/execute is answered.
        mw = RunnerMiddleware(DispatcherMiddleware(lambda e, s: [], {"/app": flask_app(seen)}),
                              config_for(runner.url), reload_signal=False)
        try:
            with serve_wsgi(mw) as served:
                resp = send("GET", served.url + "/app/page")
                assert seen[-1]["SCRIPT_NAME"] == "/app"
                execute_url = resp.json()["execute_url"]
                assert execute_url == "/v1/execute"
                done = send("POST", served.url + execute_url, data=json.dumps(envelope()).encode(),
                            headers={"Content-Type": "application/json"})
                assert done.status_code == 200 and len(runner.received) == 1
        finally:
            mw.close()


@pytest.mark.parametrize(("script_name", "expected"), [
    ("//evil.example", "/evil.example/v1/execute"),  # never another origin's URL
    ("/caf\xc3\xa9/x y", "/caf%C3%A9/x%20y/v1/execute"),  # PEP 3333's latin-1 form of UTF-8
    ("/a\\b", "/a%5Cb/v1/execute"),
    ("/my%20app", "/my%20app/v1/execute"),  # gunicorn's SCRIPT_NAME, still encoded: not again
])
def test_execute_url_is_encoded_like_ui_url(script_name: str, expected: str) -> None:
    got: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        got.append(environ["runner_mw.execute_url"])
        start_response("204 No Content", [])
        return []

    mw = RunnerMiddleware(app, config_for("http://127.0.0.1:9"), reload_signal=False)
    environ = EnvironBuilder(path="/page").get_environ()
    environ["SCRIPT_NAME"] = script_name
    mw(environ, lambda *a: None)
    assert got == [expected]


# -- the gateway's own endpoints -----------------------------------------------------------------


def test_healthz_is_open_to_everyone() -> None:
    with running_gateway(access={"networks": []}) as gw:
        resp = gw.get("/runner/-/healthz")
        assert resp.status_code == 200 and resp.json() == {"ok": True}
        assert resp.headers["Cache-Control"] == "no-store"
        assert gw.runner.received == []  # liveness of the gateway, not a runner probe


@pytest.mark.parametrize("endpoint", ["/runner/-/status", "/runner/-/metrics"])
def test_status_and_metrics_follow_the_access_rule(endpoint: str) -> None:
    with running_gateway(access={"networks": [], "tokens": [ACCESS_TOKEN]},
                         upstream={"service_token": SERVICE_TOKEN}) as gw:
        denied = gw.get(endpoint)
        assert denied.status_code == 401
        assert denied.headers["WWW-Authenticate"].startswith("Bearer")
        assert denied.json()["error"] == "unauthorized"
        wrong = gw.get(endpoint, headers={"Authorization": "Bearer not-the-token-at-all"})
        assert wrong.status_code == 401
        allowed = gw.get(endpoint, headers={"Authorization": f"Bearer {ACCESS_TOKEN}"})
        assert allowed.status_code in (200, 404) and allowed.status_code != 401
        if endpoint.endswith("status"):
            assert allowed.status_code == 200
            doc = allowed.json()
            assert doc["backend"] == "main" and doc["kind"] == "docker"
            assert doc["upstream"]["ok"] is True
            assert SERVICE_TOKEN not in allowed.text and ACCESS_TOKEN not in allowed.text


def test_status_is_open_from_loopback_by_default(gateway: Gateway) -> None:
    resp = gateway.get("/runner/-/status")
    assert resp.status_code == 200 and resp.json()["kind"] == gateway.kind
    assert SERVICE_TOKEN not in resp.text


def test_authorize_decides_for_status_too() -> None:
    with running_gateway(authorize=lambda environ: environ.get("HTTP_X_ADMIN") == "yes") as gw:
        assert gw.get("/runner/-/status").status_code == 403
        assert gw.get("/runner/-/status", headers={"X-Admin": "yes"}).status_code == 200


# -- logs ----------------------------------------------------------------------------------------

COOKIE_SECRET = "cookie-secret-value-77"
CLIENT_SVC_SECRET = "client-service-token-88"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "runner_mw.access"]


def test_one_access_line_per_request_without_secrets(gateway: Gateway,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = {"Authorization": f"Bearer {ACCESS_TOKEN}", "Cookie": f"sid={COOKIE_SECRET}",
               "X-Runner-Service-Token": CLIENT_SVC_SECRET}
    requests_made = [
        ("execute", 200, gateway.execute(headers={**secrets, "X-Request-Id": "log-1"})),
        ("asset", 200, gateway.get(INDEX + "?tenant=t", headers={**secrets, "X-Request-Id": "log-2"})),
        ("asset", 400, gateway.raw("GET", "/runner/ext-ui/%2e%2e/x",
                                   [(k, v) for k, v in {**secrets, "X-Request-Id": "log-3"}.items()])),
        ("execute", 415, gateway.request("POST", "/v1/execute", data=b"{}",
                                         headers={**secrets, "X-Request-Id": "log-4"})),
    ]
    def ours() -> list[str]:
        return [line for line in access_lines(caplog) if "request_id=log-" in line]

    lines = wait_until(lambda: len(ours()) >= 4 and ours(), what="access lines")
    for n, (route, status, _) in enumerate(requests_made, 1):
        (line,) = [line for line in lines if f"request_id=log-{n}" in line]
        assert f"route={route}" in line and f"status={status}" in line
        assert "backend=main" in line and re.search(r"upstream_ms=\d+(\.\d+)?", line)
    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for secret in (ACCESS_TOKEN, COOKIE_SECRET, CLIENT_SVC_SECRET, SERVICE_TOKEN):
        assert secret not in text
    assert gateway.app.seen == []


@pytest.mark.parametrize("path", ["/v1/execute", INDEX])
def test_a_method_with_escape_codes_is_quoted_in_the_access_line(
        gateway: Gateway, caplog: pytest.LogCaptureFixture, path: str) -> None:
    # werkzeug's server takes any method without a space: raw, it could rewrite a terminal.
    caplog.set_level(logging.INFO, logger="runner_mw.access")
    assert gateway.raw("\x1b[1A\x1b[2K\x1b]0;pwned\x07GET", path, [("X-Request-Id", "esc-1")]).status == 405
    assert gateway.raw("PROPFIND", path, [("X-Request-Id", "esc-2")]).status == 405
    lines = wait_until(lambda: [line for line in access_lines(caplog) if "request_id=esc-" in line]
                       if len(access_lines(caplog)) >= 2 else None, what="access lines")
    assert not any("\x1b" in line or "\x07" in line for line in lines), lines
    assert any("method='\\x1b[1A" in line for line in lines), lines
    assert any("method=PROPFIND " in line for line in lines), lines


def test_upstream_failures_are_logged_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with running_gateway(runner_url=f"http://127.0.0.1:{closed_port()}",
                         upstream={"service_token": SERVICE_TOKEN}) as gw:
        resp = gw.execute(headers={"Cookie": f"sid={COOKIE_SECRET}", "X-Request-Id": "fail-1"})
        assert resp.status_code == 502
        lines = wait_until(lambda: access_lines(caplog), what="access line")
        assert any("status=502" in line and "request_id=fail-1" in line for line in lines)
    for secret in (COOKIE_SECRET, SERVICE_TOKEN):
        assert secret not in caplog.text


def test_access_log_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with running_gateway(logging={"access_log": False}) as gw:
        assert gw.get("/runner/").status_code == 404
        assert gw.execute().status_code == 200
    assert access_lines(caplog) == []


# -- the README's recipes: the host's session in execute_hook ------------------------------------


def flask_app_with_session_hook() -> tuple[Any, Any]:
    """The README's Flask recipe: the hook opens the app's request context on the environ."""
    from flask import Flask, session

    app = Flask("hook_flask_app")
    app.secret_key = "test-only-key"

    @app.get("/login")
    def login() -> str:
        session["tenant"] = "tenant-from-session"
        return "ok"

    def bind_to_caller(environ: dict[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
        with app.request_context(environ):  # no request context of Flask's is open here
            tenant = session.get("tenant")
        if tenant is None:
            raise PermissionError
        envelope["context"]["tenant_id"] = tenant
        return envelope

    return app, bind_to_caller


def pyramid_app_with_session_hook() -> tuple[Any, Any]:
    """The README's Pyramid recipe: a Request made on the environ, given the app's registry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # webob imports cgi on Python 3.11+
        from pyramid.config import Configurator
        from pyramid.request import Request
        from pyramid.response import Response
        from pyramid.session import SignedCookieSessionFactory

    def login(request: Any) -> Any:
        request.session["tenant"] = "tenant-from-session"
        return Response("ok")

    with Configurator(session_factory=SignedCookieSessionFactory("test-only-key")) as config:
        config.add_route("login", "/login")
        config.add_view(login, route_name="login")
        app = config.make_wsgi_app()

    def bind_to_caller(environ: dict[str, Any], envelope: dict[str, Any]) -> dict[str, Any]:
        request = Request(environ)  # no request of Pyramid's exists yet
        request.registry = app.registry
        tenant = request.session.get("tenant")
        if tenant is None:
            raise PermissionError
        envelope["context"]["tenant_id"] = tenant
        return envelope

    return app, bind_to_caller


@pytest.mark.parametrize("make", [flask_app_with_session_hook, pyramid_app_with_session_hook],
                         ids=["flask", "pyramid"])
def test_the_readmes_session_recipes_bind_the_call_to_the_session(make: Any) -> None:
    # The hook runs before the framework sees the request: Flask's `session` alone raises
    # "Working outside of request context" (a 500 on every call). The recipes work.
    app, hook = make()
    with StandinRunner() as runner:
        mw = RunnerMiddleware(app, config_for(runner.url), reload_signal=False, execute_hook=hook)
        try:
            with serve_wsgi(mw) as served:
                body = json.dumps(envelope()).encode()
                headers = {"Content-Type": "application/json"}
                assert send("POST", served.url + "/v1/execute", data=body, headers=headers).status_code == 403
                login = send("GET", served.url + "/login")
                assert login.status_code == 200
                cookie = login.headers["Set-Cookie"].split(";", 1)[0]
                resp = send("POST", served.url + "/v1/execute", data=body,
                            headers={**headers, "Cookie": cookie})
                assert resp.status_code == 200, resp.text
                assert runner.received[-1].headers["x-alga-tenant"] == "tenant-from-session"
        finally:
            mw.close()


def test_proxyfix_around_the_middleware_gives_iframe_urls_the_proxys_prefix() -> None:
    # The README's order: ProxyFix outside, so the middleware is called with the prefix the
    # proxy stripped (inside, ui_url was bound to SCRIPT_NAME before ProxyFix set it).
    from werkzeug.middleware.proxy_fix import ProxyFix

    seen: list[dict[str, Any]] = []
    app = flask_app(seen)
    with StandinRunner() as runner:
        mw = RunnerMiddleware(app, config_for(runner.url), reload_signal=False)
        try:
            with serve_wsgi(ProxyFix(mw, x_prefix=1)) as served:
                resp = send("GET", served.url + "/page", headers={"X-Forwarded-Prefix": "/app"})
                assert resp.json()["ui_url"].startswith("/app/runner/ext-ui/")
                asset = send("GET", served.url + resp.json()["ui_url"].removeprefix("/app"),
                             headers={"X-Forwarded-Prefix": "/app"})
                assert asset.status_code == 200
        finally:
            mw.close()
