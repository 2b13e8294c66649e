"""The middleware's own responses: JSON errors with a request id, and request ids.

Use ``error(status, code, request_id)`` to answer any request the gateway refuses
or fails; the body is always ``{"error": code, "requestId": id}`` (+ ``detail``),
``Cache-Control: no-store``, and never exception or runner text.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from runner_mw.logs import REDACTOR
from runner_mw.pid import current as current_pid

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
REASONS = {
    200: "OK", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
    415: "Unsupported Media Type", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


_STATUS_LINES = {status: f"{status} {reason}" for status, reason in REASONS.items()}


def status_line(status: int) -> str:
    """``"200 OK"`` for 200: the WSGI status string of a code (made once for the usual ones)."""
    line = _STATUS_LINES.get(status)
    if line is not None:
        return line
    from http import HTTPStatus

    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"{status} {reason}"


def request_id(environ: Mapping[str, Any]) -> str:
    """The client's X-Request-Id when it is sane (1-128 of [A-Za-z0-9._-]) and no credential,
    else a new one. Call it after ``logs.bind_request``: the id goes to the access line
    unredacted, to the runner and back, so it must not be (or hold) a bearer token, a cookie
    value or the service token."""
    given = environ.get("HTTP_X_REQUEST_ID")
    if given and REQUEST_ID.fullmatch(given) and not REDACTOR.names_a_secret(given):
        return str(given)
    return _new_id()


# New ids: 16 random hex digits per process, then a counter (32 hex digits in all, like a
# uuid4's hex). Unique without asking the kernel for randomness on every request: uuid4()
# reads os.urandom, a syscall that also releases the GIL, on the hot path.
_id_state: tuple[int, str, Iterator[int]] = (0, "", itertools.count())


def _new_id() -> str:
    pid, prefix, counter = _id_state
    if pid != current_pid():  # first use, or a forked worker: a prefix of its own
        pid, prefix, counter = _reset_ids()
    return f"{prefix}{next(counter):016x}"


def _reset_ids() -> tuple[int, str, Iterator[int]]:
    global _id_state
    _id_state = (current_pid(), os.urandom(8).hex(), itertools.count())
    return _id_state


def json_response(
    start_response: StartResponse, status: int, body: Mapping[str, Any], rid: str,
    extra: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    data = json.dumps(body, separators=(",", ":")).encode()
    start_response(status_line(status), [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        ("X-Request-Id", rid),
        *extra,
    ])
    return [data]


def error(
    start_response: StartResponse, status: int, code: str, rid: str, *,
    detail: str | None = None, headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    """A JSON error response (see the error table in the design doc)."""
    body: dict[str, Any] = {"error": code, "requestId": rid}
    if detail:
        body["detail"] = detail
    return json_response(start_response, status, body, rid, headers)
