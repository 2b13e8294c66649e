"""Suite-wide check: no test secret may ever appear in a log record of the session.

A handler on the root logger and on ``runner_mw`` sees every record from the start of the
session to its end (collection, fixtures and teardowns included). It checks each record as it
comes (message, format, arguments, exception and stack text) against ``testsecrets.ALL`` and
the tokens of ``mwfixtures``, keeping only the offenders, so its memory stays flat in soak
tests. ``pytest_sessionfinish`` then fails the run, whatever the tests said, naming the logger
and the test of every leak. ``runner_mw`` logs at DEBUG for the session so that info and debug
lines are checked too. Logs of subprocesses (gunicorn) are checked by the tests that start them.

Also: tests marked ``slow`` (the soak) are deselected unless ``-m`` chooses (``-m slow``).
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from testsecrets import ALL, leaked_in

_SEEN = "_runner_mw_secret_watch"  # set on a record once checked (it passes two handlers)


class SecretWatch(logging.Handler):
    """Checks every record for test secrets; remembers only the leaks."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.checked = 0
        self.leaks: list[str] = []
        self.test = "(outside any test)"
        self._guard = threading.Lock()

    def secrets(self) -> tuple[str, ...]:
        extra: tuple[str, ...] = ()
        fixtures = sys.modules.get("mwfixtures")
        if fixtures is not None:
            extra = tuple(getattr(fixtures, n, "") for n in ("SERVICE_TOKEN", "ACCESS_TOKEN"))
        return (*ALL, *(s for s in extra if s))

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, _SEEN, False):
            return
        setattr(record, _SEEN, True)
        text = record_text(record)
        found = leaked_in(text, self.secrets())
        with self._guard:
            self.checked += 1
            if found and len(self.leaks) < 50:
                names = ", ".join(_name_of(s) for s in found)
                self.leaks.append(f"{self.test}: logger {record.name!r} {record.levelname}: "
                                  f"{names} in {text[:400]!r}")


def record_text(record: logging.LogRecord) -> str:
    """Everything of a record a handler could print."""
    parts = [str(record.msg)]
    try:
        parts.append(record.getMessage())
    except Exception:
        parts.append(repr(record.args))
    if record.args:
        parts.append(repr(record.args))
    if record.exc_text:
        parts.append(record.exc_text)
    if record.exc_info and record.exc_info[1] is not None:
        parts.append("".join(traceback.format_exception(*record.exc_info)))
    if record.stack_info:
        parts.append(record.stack_info)
    return "\n".join(parts)


def _name_of(secret: str) -> str:
    import testsecrets

    for name, value in vars(testsecrets).items():
        if value == secret and name.isupper() and name != "ALL":
            return f"testsecrets.{name}"
    return "a mwfixtures token"


WATCH = SecretWatch()
_levels: dict[str, int] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    for name in ("", "runner_mw"):
        logger = logging.getLogger(name)
        if WATCH not in logger.handlers:
            logger.addHandler(WATCH)
    for name, level in (("runner_mw", logging.DEBUG), ("runner_mw.devrunner", logging.WARNING)):
        logger = logging.getLogger(name)
        _levels[name] = logger.level
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Iterator[None]:
    WATCH.test = item.nodeid
    try:
        return (yield)
    finally:
        WATCH.test = f"after {item.nodeid}"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for name in ("", "runner_mw"):
        logging.getLogger(name).removeHandler(WATCH)
    for name, level in _levels.items():
        logging.getLogger(name).setLevel(level)
    if WATCH.leaks and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if WATCH.leaks:
        terminalreporter.write_sep("=", "SECRETS IN LOGS (tests/conftest.py): the run fails", red=True)
        for leak in WATCH.leaks:
            terminalreporter.write_line(leak)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("markexpr"):
        return  # the caller chose: -m slow, -m "not slow", ...
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def secret_watch() -> SecretWatch:
    """The session's watcher (installed by ``pytest_sessionstart`` for the whole run)."""
    return WATCH
