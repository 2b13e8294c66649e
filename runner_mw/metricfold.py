"""Folding a dead gunicorn worker's prometheus value files into one file of each kind.

Use ``fold(folder, pid)`` in the master when a worker died (``metrics.worker_exited`` does),
and ``folder_lock(folder, exclusive=False)`` around a scrape's reading of the folder. Without
it, each worker that ever lived leaves its counter, histogram and max-gauge files, and every
scrape reads them all: with ``max_requests`` recycling, 990 files and a 57 ms scrape after an
hour. The folder is the workers' to write while the master may run as root: nothing here
follows a link, blocks on a FIFO, reads more than a file says it holds, or writes by mmap.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import stat
import struct
import tempfile
import time
from collections.abc import Iterator

log = logging.getLogger("runner_mw")

#: What a dead worker leaves (prometheus-client's file names) and how its values fold into
#: the ``<kind>_archive.db`` file, which the collector reads as one more process's.
_FOLDS = (("counter", float.__add__), ("histogram", float.__add__), ("gauge_max", max))
LOCK_NAME = ".fold.lock"  # a dotfile: not one of the *.db files a scrape reads


def fold(folder: str, pid: int) -> None:
    """Add dead worker ``pid``'s values into the archive files and remove its files."""
    with folder_lock(folder, exclusive=True) as locked:
        if not locked:  # a scrape held it for a whole second: its files stay, counted as they are
            log.warning("runner_mw: metrics of worker %d not folded (the folder stayed locked)", pid)
            return
        for stale in glob.glob(os.path.join(glob.escape(folder), ".fold-*.new")):
            with contextlib.suppress(OSError):  # a master killed while writing one
                os.unlink(stale)
        for kind, merge in _FOLDS:
            dead = os.path.join(folder, f"{kind}_{pid}.db")
            if not os.path.lexists(dead):
                continue
            archive = os.path.join(folder, f"{kind}_archive.db")
            values: dict[str, tuple[float, float]] = {}
            for path in (archive, dead):
                if not os.path.lexists(path):
                    continue
                for key, value, stamp in _read_values(path):
                    old = values.get(key)
                    if old is not None:
                        value, stamp = merge(old[0], value), max(old[1], stamp)
                    values[key] = (value, stamp)
            _replace_values(folder, archive, values)
            # A master killed between the swap and this counts that worker twice: a one-time
            # step, which rate() takes like a restart.
            os.unlink(dead)


# The value files' format (prometheus-client's MmapedDict): the used length (int32) and 4
# bytes of padding, then per value the key's length (int32), the key in UTF-8 padded with
# spaces to a multiple of 8 with that int, the value and its timestamp (two doubles).
_INT = struct.Struct("i")
MAX_VALUE_FILE = 64 << 20  # far beyond a worker's few hundred series
_TWO_DOUBLES = struct.Struct("dd")


def _read_values(path: str) -> list[tuple[str, float, float]]:
    """A value file's (key, value, timestamp) entries. Read through no symlink: the folder
    is the workers' to write, and a link planted there must not make the master (root,
    with gunicorn's user/group) read another file."""
    # O_NONBLOCK: a FIFO planted there would block the open (the master stops reaping).
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        with os.fdopen(os.dup(fd), "rb") as fh:
            head = fh.read(8)
            used = _INT.unpack_from(head, 0)[0] if len(head) == 8 else 0
            if used <= 8:  # made, not yet sized or written (a worker killed then): no values
                return []
            if used > MAX_VALUE_FILE:  # the used length, not the file's (sparse, any size)
                raise ValueError(f"{path}: not a value file")
            data = head + fh.read(used - 8)
    finally:
        os.close(fd)
    if len(data) < used:
        raise ValueError(f"{path}: cut short")
    entries, pos = [], 8
    while pos < used:
        size = _INT.unpack_from(data, pos)[0]
        start, pos = pos + 4, pos + 4 + size + (8 - (size + 4) % 8)
        if size < 0 or pos + 16 > used:
            raise ValueError(f"{path}: cut short")
        value, stamp = _TWO_DOUBLES.unpack_from(data, pos)
        entries.append((data[start:start + size].decode("utf-8"), value, stamp))
        pos += 16
    return entries


def _replace_values(folder: str, path: str, values: dict[str, tuple[float, float]]) -> None:
    """Make ``path`` a value file holding ``values``, whole or not at all, readable by the
    workers (their user may differ; the master's umask may be 027). Plain writes to a new
    file of our own (O_EXCL: never through a planted link), then a rename: no mmap, whose
    write on a full tmpfs is SIGBUS (the master gone), where this is ENOSPC."""
    body = bytearray()
    for key, (value, stamp) in values.items():
        encoded = key.encode("utf-8")
        body += _INT.pack(len(encoded)) + encoded + b" " * (8 - (len(encoded) + 4) % 8)
        body += _TWO_DOUBLES.pack(value, stamp)
    data = _INT.pack(8 + len(body)) + bytes(4) + bytes(body)
    fd, fresh = tempfile.mkstemp(dir=folder, prefix=".fold-", suffix=".new")  # not *.db: never read
    try:
        os.fchmod(fd, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)
        fd = -1
        os.replace(fresh, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(fresh)
        raise


@contextlib.contextmanager
def folder_lock(folder: str, *, exclusive: bool, wait_s: float = 1.0) -> Iterator[bool]:
    """Scrapes (shared) against the master folding a dead worker's files (exclusive): a
    scrape must see its values either in its files or in the archive, never in both or
    neither. Yields whether the lock is held (False: the folder cannot be locked, or the
    wait ran out; a scrape goes on without it)."""
    try:
        fd = os.open(os.path.join(folder, LOCK_NAME),
                     os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError:  # (a link planted there among them: never followed)
        yield False
        return
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):  # a FIFO or a device planted there: not a lock
        os.close(fd)
        yield False
        return
    if info.st_uid == os.geteuid():
        with contextlib.suppress(OSError):  # made by the master: the workers must open it too
            os.fchmod(fd, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.005)
        yield True
    finally:
        os.close(fd)  # (closing releases the lock)
