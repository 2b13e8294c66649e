"""``kind: docker``: one local runner container reached directly on a fixed port.

Use it in development (``http://127.0.0.1:8085`` by convention, ``runner:8080``
inside Compose). UI assets are proxied same-origin under ``/runner``. No retries:
a local container that refuses a connection is down, not scaling from zero.
"""

from __future__ import annotations

from typing import Any

from runner_mw.backends.http import HTTPBackend
from runner_mw.schema import builtin_backend_schema


class DockerBackend(HTTPBackend):
    """A runner container on a fixed address; see the module docstring."""

    kind = "docker"

    @classmethod
    def settings_schema(cls) -> dict[str, Any]:
        return builtin_backend_schema("dockerBackend")
