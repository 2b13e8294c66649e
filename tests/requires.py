"""``missing(reason)``: what a test does when a tool or setting it needs is not here.

Use it instead of ``pytest.skip`` for anything ``.ci/run`` installs (Chromium,
chromedriver, docker-compose, openssl) or sets up (the venv the quick start reuses).
On a developer's machine the test is skipped with the reason; in CI (``CI`` set) it
fails, because there a skip would hide a missing install step, not a missing tool.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide this (see .ci/run): {reason}")
    pytest.skip(reason)
