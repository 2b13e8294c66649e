"""runner_mw.responses: request ids."""

from __future__ import annotations

import os
import re

import pytest

from runner_mw import pid
from runner_mw.responses import request_id


def test_new_request_ids_are_32_hex_digits_and_unique() -> None:
    ids = [request_id({}) for _ in range(20_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_worker_makes_ids_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fork is seen as a new pid: what runner_mw.pid's fork hook records in a child
    # (forking here would warn in a threaded pytest on 3.12+; tests/test_pid.py forks).
    parent = request_id({})
    monkeypatch.setattr(pid, "_pid", os.getpid() + 1)
    child = request_id({})
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child[:16] != parent[:16]  # another prefix: the two counters cannot collide
    assert int(child[16:], 16) == 0


def test_a_sane_client_id_is_kept_and_anything_else_replaced() -> None:
    assert request_id({"HTTP_X_REQUEST_ID": "client.id-42_A"}) == "client.id-42_A"
    for bad in ("", "a b", "x" * 129, "id\r\nx: 1"):
        assert request_id({"HTTP_X_REQUEST_ID": bad}) != bad
