"""runner_mw.envelope: what an execute envelope must look like before it is sent."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner_mw.devrunner.checks import check_execute
from runner_mw.envelope import envelope_problem, prepare

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


# -- never looser than the runner's model -----------------------------------------------------------

_VALUES = st.one_of(st.none(), st.booleans(), st.sampled_from([-1, 0, 5, 2**64 - 1, 2**64]),
                    st.sampled_from(["s", "", {}, {"k": "v"}, {"k": 1}, [], ["a"], [1]]))
_FIELDS = {
    "context": ["config", "install_id", "version_id", "request_id"],
    "http": ["query", "headers", "body_b64"],
    "limits": ["timeout_ms", "memory_mb", "fuel"],
    "secret_envelope": ["ciphertext_b64", "version", "algorithm", "expires_at", "key_path", "mount"],
    "user": ["user_id", "user_email", "user_name", "user_type", "client_name", "client_id",
             "additional_fields"],
}
_FULL_USER = {"user_id": "u", "user_email": "e", "user_name": "n", "user_type": "t"}


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    env = copy.deepcopy(GOOD)
    for top in ("limits", "secret_envelope", "user", "providers"):
        choice = draw(st.sampled_from(["absent", "null", "value", "object"]))
        if choice == "null":
            env[top] = None
        elif choice == "value":
            env[top] = copy.deepcopy(draw(_VALUES))  # (sampled objects are shared)
        elif choice == "object" and top != "providers":
            env[top] = {"ciphertext_b64": "c"} if top == "secret_envelope" else (
                dict(_FULL_USER) if top == "user" else {})
        elif choice == "object":
            env[top] = draw(st.sampled_from([[], ["a", "b"], ["a", 1], None]))
    for part, fields in _FIELDS.items():
        if not isinstance(env.get(part), dict):
            continue
        for field in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
            if draw(st.booleans()):
                env[part].pop(field, None)
            else:
                env[part][field] = copy.deepcopy(draw(_VALUES))
    return env


@settings(max_examples=3000, deadline=None, database=None)
@given(envelopes())
def test_what_the_gateway_accepts_the_runners_model_accepts(env: dict[str, Any]) -> None:
    # The runner answers 422 to a shape its serde model refuses, which the gateway can only
    # report as 502: every such shape must be the gateway's 400 instead (with a detail).
    problem = envelope_problem(env)
    if problem is not None:
        return
    sent = prepare(copy.deepcopy(env), "rid", 30000)  # what the gateway sends
    check_execute(sent)  # raises Unprocessable where the runner would answer 422


@pytest.mark.parametrize(("change", "detail"), [
    ({"providers": None}, "providers must be a list of strings"),
    ({"context": {**GOOD["context"], "config": None}}, "context.config must be an object of strings"),
    ({"http": {**GOOD["http"], "query": None}}, "http.query must be an object of strings"),
    ({"user": {}}, "user.user_id must be a string"),
    ({"secret_envelope": {}}, "secret_envelope.ciphertext_b64 must be a string"),
    ({"limits": {"fuel": 2**64}}, "limits.fuel must be an integer from 0 to 2^64-1"),
])
def test_shapes_the_runner_would_refuse_are_400s_with_a_detail(change: dict[str, Any], detail: str) -> None:
    assert envelope_problem({**copy.deepcopy(GOOD), **change}) == detail


@pytest.mark.parametrize(("change", "path"), [
    ({"context": "x"}, ("context",)),
    ({"context": {**GOOD["context"], "tenant_id": 7}}, ("context", "tenant_id")),
    ({"context": {**GOOD["context"], "config": {"a": "b", "n": 1}}}, ("context", "config", "n")),
    ({"context": {**GOOD["context"], "config": ["a"]}}, ("context", "config")),
    ({"http": {**GOOD["http"], "headers": {"x": None}}}, ("http", "headers", "x")),
    ({"providers": ["a", 2]}, ("providers", 1)),
    ({"limits": {"fuel": -1}}, ("limits", "fuel")),
    ({"user": {"user_id": 5}}, ("user", "user_id")),
    ({"user": {"user_id": "u", "user_email": "e", "user_name": "n", "user_type": "t",
               "additional_fields": {"k": 1}}}, ("user", "additional_fields", "k")),
])
def test_a_problem_names_the_value_at_fault(change: dict[str, Any], path: tuple[Any, ...]) -> None:
    # Where the value is, so that a hook's mistake can be told from the client's.
    problem = envelope_problem({**copy.deepcopy(GOOD), **change})
    assert problem is not None and problem.path == path
