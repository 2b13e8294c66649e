"""runner_mw: an extension-runner gateway inside any WSGI app.

``RunnerMiddleware(app, "config/runner.yaml")`` sends ``/runner/*`` and
``/v1/execute`` to the runner backend named in the YAML file and everything else
to ``app`` untouched; SIGHUP swaps in an edited file without a restart.
"""

from __future__ import annotations

from runner_mw.config import Config
from runner_mw.errors import ConfigError, ConfigIssue, RunnerMWError, UpstreamError
from runner_mw.loader import config_from_mapping, load_config
from runner_mw.middleware import RunnerMiddleware

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "ConfigIssue",
    "RunnerMWError",
    "RunnerMiddleware",
    "UpstreamError",
    "__version__",
    "config_from_mapping",
    "load_config",
]
