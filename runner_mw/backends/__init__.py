"""Runner backends: the pluggable part of runner_mw (see ``base.RunnerBackend``)."""

from __future__ import annotations

from runner_mw.backends.base import AssetResponse, ExecuteReply, RunnerBackend
from runner_mw.backends.registry import backend_class, build_backend, known_kinds

__all__ = [
    "AssetResponse",
    "ExecuteReply",
    "RunnerBackend",
    "backend_class",
    "build_backend",
    "known_kinds",
]
