"""runner_mw.pid: the cached process id follows forks."""

from __future__ import annotations

import os
import warnings

from runner_mw import pid


def test_the_id_is_this_process():
    assert pid.current() == os.getpid()


def test_a_forked_child_sees_its_own_id_and_the_parent_keeps_its_own():
    read, write = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns about forking a process with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe and leaves
        try:
            os.write(write, str(pid.current()).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        seen = int(os.read(read, 64))
    finally:
        os.close(read)
        os.waitpid(child, 0)
    assert seen == child
    assert pid.current() == os.getpid() != child
