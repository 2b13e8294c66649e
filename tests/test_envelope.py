"""runner_mw.envelope: what an execute envelope must look like before it is sent."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from runner_mw.envelope import envelope_problem

GOOD: dict[str, Any] = {
    "context": {"tenant_id": "tenant-1", "extension_id": "com.example.x",
                "content_hash": "sha256:" + "ab" * 32, "config": {"a": "b"}},
    "http": {"method": "GET", "path": "/", "query": {"q": "1"}, "headers": {"accept": "*/*"}},
}


def with_context(**changes: Any) -> dict[str, Any]:
    env = copy.deepcopy(GOOD)
    env["context"].update(changes)
    return env


def test_a_good_envelope_has_no_problem() -> None:
    assert envelope_problem(GOOD) is None


@pytest.mark.parametrize("value", ["t", "x" * 256, "!~", "a.b-c_d:e/f"])
def test_ids_of_1_to_256_visible_ascii_characters_are_fine(value: str) -> None:
    assert envelope_problem(with_context(tenant_id=value, extension_id=value)) is None


@pytest.mark.parametrize("value", ["x" * 257, "a b", "a\tb", "a\x7fb", "a\x00", "caf\u00e9", "\u3000",
                                   "a\r\nX-Injected: 1"])
@pytest.mark.parametrize("key", ["tenant_id", "extension_id"])
def test_ids_that_cannot_travel_as_a_header_are_refused(key: str, value: str) -> None:
    problem = envelope_problem(with_context(**{key: value}))
    assert problem == f"context.{key} must be 1-256 visible ASCII characters"


@pytest.mark.parametrize(("where", "value"), [
    ("config", {"a": 1}), ("config", {"a": None}), ("config", ["a"]),
    ("query", {"q": ["1"]}), ("headers", {"h": {"x": "y"}}),
])
def test_maps_of_strings_must_hold_only_strings(where: str, value: Any) -> None:
    env = copy.deepcopy(GOOD)
    if where == "config":
        env["context"]["config"] = value
    else:
        env["http"][where] = value
    assert envelope_problem(env) is not None
