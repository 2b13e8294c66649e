"""This process's id without a syscall per call: ``pid.current()``.

Use it on the hot path where code must notice that it now runs in a forked child (the
connection pool, metrics, request ids). ``os.getpid()`` is a syscall (glibc stopped
caching it) and a proxied request asked four times. The value is renewed in the child
by ``os.register_at_fork``, which runs for every fork made through Python: ``os.fork``,
multiprocessing, gunicorn's workers.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def current() -> int:
    """``os.getpid()``, as of the last fork."""
    return _pid
