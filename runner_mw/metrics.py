"""Prometheus metrics at ``/runner/-/metrics`` (placeholder until metrics land)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner_mw.responses import error

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse


def render(start_response: StartResponse, snap: Any, rid: str) -> tuple[int, list[bytes]]:
    return 404, error(start_response, 404, "not_found", rid, detail="metrics are not enabled")
