"""The fold of a dead worker's value files: the format prometheus-client reads, done whole or
not at all, and nothing a worker plants in the folder followed, blocked on or read whole.
(Under gunicorn, with real workers: ``tests/test_metrics.py``.)"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import struct
import threading
from pathlib import Path

import pytest
from mwfixtures import T

from runner_mw import metricfold


def _value_file(path: Path, values: dict[str, float]) -> None:
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    target = MmapedDict(str(path))
    for name, number in values.items():
        target.write_value(mmap_key("runner_mw_requests_total", "runner_mw_requests_total", ["route"],
                                    [name], "Requests"), number, 0.0)
    target.close()


def _values(path: Path) -> dict[str, float]:
    from prometheus_client.mmap_dict import MmapedDict

    return {json.loads(key)[2]["route"]: number
            for key, number, _, _ in MmapedDict.read_all_values_from_file(str(path))}


def test_a_fold_that_cannot_get_space_changes_nothing(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # On a full tmpfs the master's write to an mmap page was SIGBUS: the master gone. Plain
    # writes get ENOSPC, an OSError, and the fold is undone.
    _value_file(tmp_path / "counter_archive.db", {"asset": 2.0})
    _value_file(tmp_path / "counter_4242.db", {"asset": 3.0, "execute": 1.0})

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch, pytest.raises(OSError):
        patch.setattr(os, "write", full)
        metricfold.fold(str(tmp_path), 4242)
    assert _values(tmp_path / "counter_archive.db") == {"asset": 2.0}
    assert _values(tmp_path / "counter_4242.db") == {"asset": 3.0, "execute": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fold.lock", "counter_4242.db",
                                                          "counter_archive.db"]
    metricfold.fold(str(tmp_path), 4242)
    assert _values(tmp_path / "counter_archive.db") == {"asset": 5.0, "execute": 1.0}
    assert not (tmp_path / "counter_4242.db").exists()


def test_the_folded_files_are_readable_by_workers_of_another_user(tmp_path: Path) -> None:
    # A master started as root with gunicorn's user/group and a umask of 027 made the archive
    # 0640 root: every worker's scrape then failed (PermissionError) once a worker had died.
    _value_file(tmp_path / "counter_77.db", {"asset": 1.0})
    old = os.umask(0o027)
    try:
        metricfold.fold(str(tmp_path), 77)
    finally:
        os.umask(old)
    for name in ("counter_archive.db", metricfold.LOCK_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert _values(tmp_path / "counter_archive.db") == {"asset": 1.0}  # prometheus-client reads it


def test_the_fold_follows_no_link_planted_in_the_workers_folder(tmp_path: Path) -> None:
    # The folder is the workers' to write; the master (root under gunicorn's user/group)
    # truncated and chmodded 0644 whatever a planted link named.
    private = tmp_path / "private"
    private.write_bytes(b"secret")
    private.chmod(0o600)
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_archive.db").symlink_to(private)
    _value_file(folder / "counter_88.db", {"asset": 1.0})
    with pytest.raises(OSError):
        metricfold.fold(str(folder), 88)
    (folder / "counter_archive.db").unlink()
    (folder / metricfold.LOCK_NAME).unlink()
    (folder / metricfold.LOCK_NAME).symlink_to(private)
    metricfold.fold(str(folder), 88)  # not locked: not folded
    assert (folder / "counter_88.db").exists()
    assert private.read_bytes() == b"secret" and private.stat().st_mode & 0o777 == 0o600
    assert not [p for p in folder.iterdir() if p.name.endswith(".new")]


def test_what_a_worker_plants_cannot_stall_or_swell_the_master(tmp_path: Path) -> None:
    # A FIFO blocked the master's open (it stops reaping); a sparse 1 GiB file was read
    # whole (1 GB of RSS); a file made but never sized stopped the fold for good; a crash's
    # temporary file stayed.
    folder = tmp_path / "m"
    folder.mkdir()
    os.mkfifo(folder / "counter_archive.db")
    _value_file(folder / "counter_5.db", {"asset": 1.0})
    done = threading.Event()

    def fold() -> None:
        with contextlib.suppress(OSError):
            metricfold.fold(str(folder), 5)
        done.set()

    threading.Thread(target=fold, daemon=True).start()
    assert done.wait(T), "the fold blocked on a FIFO"
    (folder / "counter_archive.db").unlink()
    (folder / metricfold.LOCK_NAME).unlink()
    os.mkfifo(folder / metricfold.LOCK_NAME)
    done.clear()
    threading.Thread(target=fold, daemon=True).start()
    assert done.wait(T), "the lock blocked on a FIFO"
    (folder / metricfold.LOCK_NAME).unlink()

    sparse = folder / "counter_6.db"
    _value_file(sparse, {"asset": 4.0})  # one real value, then 1 GiB with nothing on disk
    with sparse.open("r+b") as fh:
        fh.truncate(1 << 30)
    (folder / "histogram_6.db").write_bytes(bytes(1 << 16))  # made, never sized: no values
    (folder / ".fold-x.new").write_bytes(b"left by a crash")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    metricfold.fold(str(folder), 6)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 * 1024  # not 1 GiB read
    assert sorted(p.name for p in folder.iterdir()) == [
        ".fold.lock", "counter_5.db", "counter_archive.db", "histogram_archive.db"]
    assert _values(folder / "counter_archive.db") == {"asset": 4.0}
    huge = folder / "counter_7.db"
    huge.write_bytes(struct.pack("i", metricfold.MAX_VALUE_FILE + 8) + bytes(4))
    with pytest.raises(ValueError):
        metricfold.fold(str(folder), 7)
