"""What the reload tests share (in-process in test_reload, under gunicorn in test_gunicorn):
configs naming their stand-in runner, and ``Traffic``, client load that counts failures."""

from __future__ import annotations

import base64
import json
import threading

import requests
from mwfixtures import wait_until
from standin import StandinRunner

from runner_mw.devrunner import SAMPLE_CONTENT_HASH, SAMPLE_EXTENSION_ID

T = 60.0  # seconds: deadlines are generous, a busy 2-core machine must not flake
ASSET = f"/runner/ext-ui/{SAMPLE_EXTENSION_ID}/{SAMPLE_CONTENT_HASH}/index.html?tenant=t1"
ENVELOPE = {
    "context": {"tenant_id": "t1", "extension_id": SAMPLE_EXTENSION_ID, "content_hash": SAMPLE_CONTENT_HASH},
    "http": {"method": "GET", "path": "/hello"},
}
CLOSE = {"Connection": "close"}  # a new connection per request: the kernel spreads them over workers
BROKEN = "version: 1\nbackend: a\nbackends:\n  a:\n    kind: docker\n    url: htp://x\n"


def config_text(runner: StandinRunner, *, read_ms: int = 30000) -> str:
    """A config whose active backend is named after the stand-in (so status shows which)."""
    return (f"version: 1\nbackend: {runner.name}\nbackends:\n  {runner.name}:\n"
            f"    kind: docker\n    url: {runner.url}\ntimeouts:\n  connect_ms: 2000\n  read_ms: {read_ms}\n")


class Traffic:
    """Client threads sending asset GETs and execute POSTs until stopped; counts what they saw.

    One thread per entry of ``keep_alive``: True keeps its connection (under gthread, pinned
    to one worker), False opens a new connection per request (spread over the workers).
    """

    def __init__(self, base: str, keep_alive: tuple[bool, ...] = (True,)) -> None:
        self.base = base
        self.ok = 0
        self.failures: list[str] = []
        self.runners: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(keep,), name="traffic", daemon=True)
                         for keep in keep_alive]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(T)

    def wait_for(self, count: int) -> None:
        start = self.ok
        wait_until(lambda: self.ok >= start + count or self.failures, timeout=T, what="client traffic")

    def _run(self, keep_alive: bool) -> None:
        headers = {} if keep_alive else CLOSE
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    self._one(session, headers)
                except Exception as exc:  # a failed request is what the tests count
                    with self._lock:
                        self.failures.append(repr(exc))

    def _one(self, session: requests.Session, headers: dict[str, str]) -> None:
        with session.get(self.base + ASSET, headers=headers, timeout=30) as resp:
            if resp.status_code != 200 or b"<html" not in resp.content.lower():
                raise AssertionError(f"asset {resp.status_code} {resp.content[:200]!r}")
            asset_runner = resp.headers["x-standin"]
        with session.post(self.base + "/v1/execute", json=ENVELOPE, headers=headers, timeout=30) as resp:
            if resp.status_code != 200:
                raise AssertionError(f"execute {resp.status_code} {resp.content[:200]!r}")
            echo = json.loads(base64.b64decode(resp.json()["body_b64"]))
        with self._lock:
            self.runners |= {asset_runner, echo["runner"]}
            self.ok += 2
