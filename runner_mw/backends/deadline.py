"""A hard deadline for blocking socket calls: one watchdog thread per process.

Use ``WATCHDOG.watch(deadline, sock)`` around a call that must end by ``deadline``
(time.monotonic) however the peer behaves. Socket timeouts bound each ``recv``,
not their sum: a runner that drips one byte a second never trips a 30 s read
timeout. At the deadline the watchdog shuts the socket down, so the blocked
call returns at once (EOF) and the caller reports a timeout.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time


class Watchdog:
    """Shuts sockets down at their deadlines (started lazily, again after a fork)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._cancelled: set[int] = set()
        self._fired: set[int] = set()
        self._ids = itertools.count()
        self._pid = 0

    def watch(self, deadline: float, sock: socket.socket) -> int:
        """Arm the deadline for ``sock``; pass the returned token to ``cancel``."""
        token = next(self._ids)
        with self._cond:
            if self._pid != os.getpid():
                self._start()
            wake = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, token, sock))
            if wake:  # only an earlier deadline changes how long the thread sleeps
                self._cond.notify()
        return token

    def cancel(self, token: int) -> bool:
        """Disarm ``token``; True when its deadline had already fired (the socket is dead)."""
        with self._cond:
            if token in self._fired:
                self._fired.discard(token)
                return True
            self._cancelled.add(token)
            return False

    def _start(self) -> None:
        # A fork copies the heap but not the thread: start over in this process.
        self._heap.clear()
        self._cancelled.clear()
        self._fired.clear()
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="runner_mw-deadline", daemon=True).start()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] in self._cancelled:
                    _, token, _ = heapq.heappop(self._heap)
                    self._cancelled.discard(token)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token, sock = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                self._fired.add(token)
                with contextlib.suppress(OSError):  # already closed: nothing left to stop
                    sock.shutdown(socket.SHUT_RDWR)


WATCHDOG = Watchdog()
