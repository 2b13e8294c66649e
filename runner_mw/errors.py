"""The exceptions runner_mw raises, and nothing else.

Use these to tell a bad config file from a failing runner::

    RunnerMWError
    ├── ConfigError            the YAML (or mapping) is invalid; carries every ConfigIssue
    └── UpstreamError          a call to the runner failed; each maps to one client status
        ├── RunnerUnreachable  refused, DNS, connect timeout         -> 502 runner_unreachable
        ├── RunnerTimeout      no answer within the read deadline    -> 504 runner_timeout
        ├── BadGateway         garbage, reset, transport status >= 400 -> 502 bad_gateway
        ├── UpstreamTooLarge   the runner refused the body's size    -> 413 payload_too_large
        └── Overloaded         the backend's pool stayed full        -> 503 overloaded

Socket and parser exceptions are mapped to these in one place, the backend
transport (``runner_mw.backends.wire`` and ``http``), so nothing else needs to
know which HTTP client is in use.
"""

from __future__ import annotations

from dataclasses import dataclass


class RunnerMWError(Exception):
    """Base class of every error runner_mw raises on purpose."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file: where it is and what was expected."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.path or '(top level)'}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "path": self.path, "message": self.message}


class ConfigError(RunnerMWError):
    """The configuration is invalid. ``issues`` lists every problem found, in file order."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = sorted(issues, key=lambda i: (i.file, i.line or 0, i.path))
        super().__init__("\n".join(str(i) for i in self.issues))


class UpstreamError(RunnerMWError):
    """A call to the runner failed. ``status`` and ``code`` are what the client sees."""

    status = 502
    code = "bad_gateway"


class RunnerUnreachable(UpstreamError):
    """The runner could not be reached (refused, DNS, connect timeout): nothing was sent."""

    code = "runner_unreachable"


class RunnerTimeout(UpstreamError):
    """The runner did not answer within the read deadline."""

    status = 504
    code = "runner_timeout"


class BadGateway(UpstreamError):
    """The runner answered something that is not a valid reply, or broke the connection."""


class UpstreamTooLarge(UpstreamError):
    """The runner refused the request body as too large."""

    status = 413
    code = "payload_too_large"


class Overloaded(UpstreamError):
    """Every connection of the backend's bounded pool stayed busy: shed load."""

    status = 503
    code = "overloaded"
