"""The gateway's log lines: redaction of secrets, and a JSON-lines format.

Use ``setup_logging(config)`` (the middleware calls it): it adds a redacting
filter to runner_mw's loggers, and a stderr handler (text or JSON lines, per
``logging.format``) only when the host has configured no logging at all, so a
host app's own logging setup is never overridden. Every secret the gateway
knows (tokens, service tokens), and anything shaped like a bearer token, cookie
or service-token header, is replaced by ``***`` in every record.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner_mw.config import Config

LOGGERS = ("runner_mw", "runner_mw.access", "runner_mw.reload")
_SHAPES = re.compile(
    r"(?i)(bearer\s+)[^\s,;\"']+"
    r"|((?:cookie|set-cookie|authorization|x-runner-service-token)\s*[:=]\s*)[^\r\n]+"
)


class Redactor(logging.Filter):
    """Replaces known secrets and secret-shaped text in a record's final message."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def remember(self, secrets: set[str]) -> None:
        with self._lock:
            # Keep old ones too: a log line about the previous config may still come.
            self._secrets = self._secrets | {s for s in secrets if s and len(s) >= 4}

    def redact(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, "***")
        return _SHAPES.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Exception text may quote a value; keep the type and the redacted text only.
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            doc["exception"] = record.exc_text
        elif record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


REDACTOR = Redactor()
_handler: logging.Handler | None = None


def secrets_of(config: Config) -> set[str]:
    found = set(config.access.tokens)
    found |= {b.service_token for b in config.backends.values() if b.service_token}
    return found


def setup_logging(config: Config) -> None:
    """Redact this config's secrets; give runner_mw a handler if the host has none."""
    global _handler
    REDACTOR.remember(secrets_of(config))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if REDACTOR not in logger.filters:
            logger.addFilter(REDACTOR)
    root = logging.getLogger()
    top = logging.getLogger("runner_mw")
    if _handler is None and not root.handlers and not top.handlers:
        _handler = logging.StreamHandler()
        top.addHandler(_handler)
        if top.level == logging.NOTSET:
            top.setLevel(logging.INFO)
    if _handler is not None:
        _handler.setFormatter(JsonFormatter() if config.log_format == "json"
                              else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
