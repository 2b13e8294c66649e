"""PasteDeploy filter: put ``RunnerMiddleware`` in an ini pipeline (``pserve``, ``gunicorn --paste``).

Use it in a PasteDeploy ini file (the entry point ``egg:runner_mw``, i.e. ``main`` in the
``paste.filter_app_factory`` group)::

    [pipeline:main]
    pipeline = runner myapp

    [filter:runner]
    use = egg:runner_mw
    config = %(here)s/config/runner.yaml    ; relative paths are relative to this ini's folder
    execute_hook = myapp.security:bind_to_caller   ; optional, "module:attribute"
    authorize = myapp.security:may_execute         ; optional, "module:attribute"
    reload_signal = true                           ; optional (default true): SIGHUP reloads

    [app:myapp]
    use = egg:myapp

Settings (all optional; any other key is refused with a ``ValueError`` naming it):

- ``config``: the YAML file. Without it, ``$RUNNER_MW_CONFIG``, else ``config/runner.yaml``
  relative to the working directory (the same default as the gunicorn hooks). Under
  ``gunicorn --paste`` with ``runner_mw.gunicorn``'s hooks, ``$RUNNER_MW_CONFIG`` must name the
  same file, or HUP will not reload this middleware.
- ``execute_hook``, ``authorize``: dotted references to the callables of the same names of
  ``RunnerMiddleware`` (Python objects cannot be written in an ini file).
- ``reload_signal``: ``true``/``false`` (also ``yes``/``no``, ``on``/``off``, ``1``/``0``).

A broken config file fails the loading with ``runner_mw.ConfigError`` (every ``FILE:LINE``
problem), so ``pserve`` does not start with it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

from runner_mw.middleware import RunnerMiddleware

__all__ = ["filter_app_factory", "resolve"]

CONFIG_ENV = "RUNNER_MW_CONFIG"
DEFAULT_CONFIG = "config/runner.yaml"
_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f", ""}


def filter_app_factory(app: Any, global_conf: Mapping[str, Any], config: str | None = None,
                       **local: Any) -> RunnerMiddleware:
    """Wrap ``app`` in a ``RunnerMiddleware`` built from the ini section's settings."""
    unknown = sorted(set(local) - {"execute_hook", "authorize", "reload_signal"})
    if unknown:
        raise ValueError(f"runner_mw filter: unknown setting(s) {', '.join(unknown)} "
                         "(known: config, execute_hook, authorize, reload_signal)")
    if config:
        here = global_conf.get("here") or os.getcwd()
        path = os.path.join(here, os.path.expanduser(config))  # an absolute config wins
    else:
        path = os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG
    return RunnerMiddleware(
        app,
        os.path.abspath(path),
        execute_hook=resolve(local["execute_hook"]) if local.get("execute_hook") else None,
        authorize=resolve(local["authorize"]) if local.get("authorize") else None,
        reload_signal=_bool("reload_signal", local.get("reload_signal", True)),
    )


def resolve(reference: str) -> Any:
    """The object named ``"package.module:attribute"`` (or ``"package.module.attribute"``)."""
    text = str(reference).strip()
    module_name, sep, attr = text.partition(":")
    if not sep:
        module_name, _, attr = text.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"runner_mw filter: {reference!r} is not a 'module:attribute' reference")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"runner_mw filter: {reference!r} is not callable")
    return obj


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"runner_mw filter: {name} = {value!r} is not a boolean (true/false)")
