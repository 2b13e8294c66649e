"""runner_mw.yaml_source: safe YAML with the line of every key, no aliases, no duplicate keys."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from runner_mw.errors import ConfigIssue
from runner_mw.yaml_source import dotted, load_yaml

NESTED = """\
# a comment on line 1
top:
  child:
    leaf: 1
  items:
    - first
    - name: second
      value: 2
  flow: [a, b]
other: x
"""


def test_lines_of_nested_keys_and_list_items() -> None:
    data, lines, issues = load_yaml(NESTED, "f.yaml")
    assert issues == []
    assert data == {"top": {"child": {"leaf": 1}, "items": ["first", {"name": "second", "value": 2}],
                            "flow": ["a", "b"]}, "other": "x"}
    assert lines[()] == 2
    assert lines[("top",)] == 2
    assert lines[("top", "child")] == 3
    assert lines[("top", "child", "leaf")] == 4
    assert lines[("top", "items")] == 5
    assert lines[("top", "items", 0)] == 6
    assert lines[("top", "items", 1)] == 7
    assert lines[("top", "items", 1, "name")] == 7
    assert lines[("top", "items", 1, "value")] == 8
    assert lines[("top", "flow", 0)] == 9
    assert lines[("top", "flow", 1)] == 9
    assert lines[("other",)] == 10


def test_key_line_is_the_key_not_the_value() -> None:
    _, lines, _ = load_yaml("a:\n\n  b: 1\nc:\n  - 1\n", "f.yaml")
    assert lines[("a",)] == 1  # the value starts on line 3
    assert lines[("a", "b")] == 3
    assert lines[("c",)] == 4
    assert lines[("c", 0)] == 5


def test_dotted() -> None:
    assert dotted(()) == ""
    assert dotted(("backends", "docker", "url")) == "backends.docker.url"
    assert dotted(("access", "tokens", 0)) == "access.tokens[0]"
    assert dotted(("a", 0, 1, "b")) == "a[0][1].b"


def test_duplicate_keys_are_an_error_at_the_duplicate() -> None:
    text = "a: 1\nb:\n  c: 1\n  d: 2\n  c: 3\na: 4\n"
    data, _, issues = load_yaml(text, "f.yaml")
    assert issues == [
        ConfigIssue("f.yaml", 5, "b.c", "duplicate key 'c' (first at line 3)"),
        ConfigIssue("f.yaml", 6, "a", "duplicate key 'a' (first at line 1)"),
    ]
    assert data["a"] == 1  # the first one is kept, never silently the last
    assert data["b"]["c"] == 1


def test_duplicate_keys_in_flow_mappings_and_list_items() -> None:
    _, _, issues = load_yaml("l:\n  - {x: 1, x: 2}\n", "f.yaml")
    assert issues == [ConfigIssue("f.yaml", 2, "l[0].x", "duplicate key 'x' (first at line 2)")]


def test_same_key_in_different_mappings_is_fine() -> None:
    _, _, issues = load_yaml("a: {x: 1}\nb: {x: 2}\n", "f.yaml")
    assert issues == []


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("1: x\n", "1"),
        ("on: x\n", "on"),  # YAML 1.1 (SafeLoader) reads on/off/yes/no as booleans
        ("yes: x\n", "yes"),
        ("off: x\n", "off"),
        ("true: x\n", "true"),
        ("~: x\n", "~"),
        ("null: x\n", "null"),
        ("1.5: x\n", "1.5"),
    ],
)
def test_keys_that_are_not_strings_are_refused(text: str, key: str) -> None:
    data, _, issues = load_yaml(text, "f.yaml")
    assert data == {}
    assert issues == [ConfigIssue("f.yaml", 1, "", f"key {key!r} must be a string")]


def test_non_string_key_nested_names_the_parent_path() -> None:
    _, _, issues = load_yaml("a:\n  b:\n    on: 1\n", "f.yaml")
    assert issues == [ConfigIssue("f.yaml", 3, "a.b", "key 'on' must be a string")]


def test_quoted_look_alike_keys_are_strings() -> None:
    data, _, issues = load_yaml("'on': 1\n\"1\": 2\n'null': 3\n", "f.yaml")
    assert issues == []
    assert data == {"on": 1, "1": 2, "null": 3}


def test_complex_keys_are_refused() -> None:
    _, _, issues = load_yaml("a:\n  ? [x, y]\n  : 1\n", "f.yaml")
    assert issues == [ConfigIssue("f.yaml", 2, "a", "keys must be plain strings")]


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("a: &x 1\nb: 2\n", 1, "anchors (&name) are not allowed"),
        ("a: 1\nb: &x\n  c: 1\n", 2, "anchors (&name) are not allowed"),
        ("a: 1\nb: *x\n", 2, "aliases (*name) are not allowed"),
        ("base: &base {x: 1}\nc:\n  <<: *base\n", 1, "anchors (&name) are not allowed"),
        ("a:\n  - 1\n  - &i 2\n  - *i\n", 3, "anchors (&name) are not allowed"),
        ("c:\n  <<: *base\n", 2, "aliases (*name) are not allowed"),
        ("&root {a: 1}\n", 1, "anchors (&name) are not allowed"),
    ],
)
def test_anchors_and_aliases_are_refused(text: str, line: int, what: str) -> None:
    data, lines, issues = load_yaml(text, "f.yaml")
    assert data is None
    assert lines == {}
    [issue] = issues
    assert (issue.file, issue.line, issue.path) == ("f.yaml", line, "")
    assert issue.message.startswith("YAML syntax error: column ")
    assert what in issue.message


def test_inline_merge_key_is_refused_as_an_issue() -> None:
    _, _, issues = load_yaml("a: 1\nb:\n  <<: {c: 1}\n  d: 2\n", "f.yaml")
    assert issues
    assert issues[0].line == 3
    assert "<<" in issues[0].message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("a: 1\nb: !!python/object:os.system echo\n", id="python-tag"),
        pytest.param("a: 1\nb: !custom x\n", id="local-tag"),
        pytest.param("a: 1\nb: !!int abc\n", id="bad-int"),
    ],
)
def test_unconstructible_tags_are_issues(text: str) -> None:
    _, _, issues = load_yaml(text, "f.yaml")
    assert [i.line for i in issues] == [2]


def test_control_characters_are_an_issue() -> None:
    data, _, issues = load_yaml("a: 1\nb: \x07\n", "f.yaml")
    assert data is None
    assert len(issues) == 1
    assert "unacceptable character" in issues[0].message


def test_tags_on_collections_are_ignored_never_constructed() -> None:
    """Only plain dicts and lists are built: a python tag on a sequence runs nothing."""
    data, _, issues = load_yaml("a: !!python/object/apply:os.system ['exit 3']\n", "f.yaml")
    assert (data, issues) == ({"a": ["exit 3"]}, [])
    data, _, issues = load_yaml("a: !!set {x, y}\n", "f.yaml")
    assert (data, issues) == ({"a": {"x": None, "y": None}}, [])


def test_standard_safe_tags_are_plain_data() -> None:
    data, _, issues = load_yaml("a: !!str 1\nb: 2024-01-02\nc: !!float 1\n", "f.yaml")
    assert issues == []
    assert data == {"a": "1", "b": datetime.date(2024, 1, 2), "c": 1.0}


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("a: [1, 2\n", 2, "expected ',' or ']'"),
        ("a: 1\n  b: 2\n", 2, "mapping values are not allowed here"),
        ("a: 'open\n", 2, "found unexpected end of stream"),
        ("a: 1\n\tb: 2\n", 2, "found character '\\t' that cannot start any token"),
        ("a: 1\n---\nb: 2\n", 2, "but found another document"),
    ],
)
def test_syntax_errors_give_line_and_column(text: str, line: int, problem: str) -> None:
    data, _, issues = load_yaml(text, "f.yaml")
    assert data is None
    [issue] = issues
    assert issue.line == line
    assert issue.path == ""
    assert issue.message.startswith("YAML syntax error: column ")
    assert problem in issue.message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "   \n", "~\n", "null\n"])
def test_empty_documents(text: str) -> None:
    data, _, issues = load_yaml(text, "f.yaml")
    assert (data, issues) == (None, [])


def test_scalar_hook_gets_path_text_and_plainness() -> None:
    calls: list[tuple[Any, ...]] = []

    def hook(path: Any, text: str, plain: bool) -> Any:
        calls.append((path, text, plain))
        return text.upper()

    text = "a: plain\nb: 'single'\nc: \"double\"\nd: |\n  block\ne: [x]\nf: 3\ng: true\n"
    data, _, issues = load_yaml(text, "f.yaml", hook)
    assert issues == []
    assert calls == [
        (("a",), "plain", True),
        (("b",), "single", False),
        (("c",), "double", False),
        (("d",), "block\n", False),
        (("e", 0), "x", True),
    ]
    assert data == {"a": "PLAIN", "b": "SINGLE", "c": "DOUBLE", "d": "BLOCK\n", "e": ["X"], "f": 3, "g": True}


def test_scalar_hook_value_error_becomes_an_issue_at_the_value() -> None:
    def hook(path: Any, text: str, plain: bool) -> Any:
        if text == "bad":
            raise ValueError("nope")
        return text

    data, _, issues = load_yaml("a: ok\nb:\n  - fine\n  - bad\nc:\n  bad\n", "f.yaml", hook)
    assert issues == [ConfigIssue("f.yaml", 4, "b[1]", "nope"), ConfigIssue("f.yaml", 6, "c", "nope")]
    assert data == {"a": "ok", "b": ["fine", "bad"], "c": "bad"}


def test_keys_are_not_passed_to_the_hook() -> None:
    seen: list[str] = []
    load_yaml("${KEY}: ${VALUE}\n", "f.yaml", lambda p, t, plain: seen.append(t) or t)
    assert seen == ["${VALUE}"]
