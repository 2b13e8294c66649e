"""``kind: knative``: the runner as a Knative service behind its ingress (production).

Use it in Kubernetes. Knative routes on the ``Host`` header (``host``), scales to
zero (so the first connect may be refused or slow: requests that were never sent
are retried within ``retry.attempts`` and ``retry.budget_ms``), and usually
publishes UI assets on its own public URL (``public_base``).
"""

from __future__ import annotations

from typing import Any

from runner_mw.backends.http import HTTPBackend
from runner_mw.schema import builtin_backend_schema


class KnativeBackend(HTTPBackend):
    """A Knative service; see the module docstring."""

    kind = "knative"

    @classmethod
    def settings_schema(cls) -> dict[str, Any]:
        return builtin_backend_schema("knativeBackend")
