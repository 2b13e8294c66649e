"""Read a YAML document into plain data plus the line of every key.

Use this (through ``runner_mw.loader``) rather than ``yaml.safe_load`` when errors
must point at ``FILE:LINE``. It only ever builds plain scalars, lists and dicts
(safe loading), refuses anchors and aliases (no alias bombs), refuses duplicate
keys instead of silently keeping the last one, and calls ``on_scalar`` for each
scalar value so that interpolation can know the key path and the scalar's style.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from runner_mw.errors import ConfigIssue

Path = tuple[str | int, ...]
#: Called with (key path, raw text, plain style?) for every string scalar value;
#: returns the final value (or raises ``ValueError`` with a message).
ScalarHook = Callable[[Path, str, bool], Any]


def dotted(path: Path) -> str:
    """``("backends", "docker", "url")`` -> ``backends.docker.url``; list items as ``[0]``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


#: Deeper nesting is refused: a config is a few levels deep, and PyYAML's composer (and the
#: builder below) recurse once per level, so a 1 KB file of brackets would be a RecursionError.
MAX_DEPTH = 32


class _NoAliasLoader(yaml.SafeLoader):
    """A SafeLoader that refuses anchors, aliases and nesting deeper than ``MAX_DEPTH``."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.MarkedYAMLError(
                None, None, "aliases (*name) are not allowed in runner_mw config", event.start_mark
            )
        event = self.peek_event()  # type: ignore[no-untyped-call]
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise yaml.MarkedYAMLError(
                None, None, "anchors (&name) are not allowed in runner_mw config", event.start_mark
            )
        if self._depth >= MAX_DEPTH:
            raise yaml.MarkedYAMLError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# Messages that never hold the value's text: shown as they are for a secret too.
_VALUE_FREE = ("environment variable ", "duplicate key ")


class _Builder:
    def __init__(self, file: str, on_scalar: ScalarHook | None, secret_keys: frozenset[str]) -> None:
        self.secret_keys = secret_keys
        self.file = file
        self.on_scalar = on_scalar
        self.lines: dict[Path, int] = {}
        self.issues: list[ConfigIssue] = []
        self._constructor = yaml.SafeLoader("")

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self._key(key_node, path)
                if key is None:
                    continue
                child = (*path, key)
                line = key_node.start_mark.line + 1
                if key in out:
                    self._issue(line, child, f"duplicate key '{key}' (first at line "
                                f"{self.lines.get(child, '?')})")
                    continue
                self.lines[child] = line
                out[key] = self.build(value_node, child)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.ScalarNode):
            self._issue(node.start_mark.line + 1, path, "unsupported YAML node")
            return None
        assert isinstance(node, yaml.ScalarNode)
        try:
            value = _construct(self._constructor, node)
        except ValueError as exc:
            self._issue(node.start_mark.line + 1, path, str(exc))
            return None
        if isinstance(value, str) and self.on_scalar is not None:
            try:
                return self.on_scalar(path, value, node.style is None)
            except ValueError as exc:
                self._issue(node.start_mark.line + 1, path, str(exc))
                return value
        return value

    def _key(self, node: yaml.Node, path: Path) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self._issue(node.start_mark.line + 1, path, "keys must be plain strings")
            return None
        if node.tag == "tag:yaml.org,2002:merge":
            self._issue(node.start_mark.line + 1, path, "merge keys (<<) are not allowed in runner_mw config")
            return None
        try:
            key = _construct(self._constructor, node)
        except ValueError as exc:
            self._issue(node.start_mark.line + 1, path, str(exc))
            return None
        if not isinstance(key, str):
            # 'on: 1' or '1: x': YAML reads a bool or an int; the config only has string keys.
            self._issue(node.start_mark.line + 1, path, f"key {node.value!r} must be a string")
            return None
        return key

    def _issue(self, line: int, path: Path, message: str) -> None:
        if any(part in self.secret_keys for part in path) and not message.startswith(_VALUE_FREE):
            # Tag and ${...} errors quote the raw text: never for a secret (logs, terminals).
            message = "the value (not shown: a secret) cannot be read: check its YAML tag and ${...} syntax"
        self.issues.append(ConfigIssue(self.file, line, dotted(path), message))


def load_yaml(
    text: str, file: str, on_scalar: ScalarHook | None = None,
    secret_keys: frozenset[str] = frozenset(),
) -> tuple[Any, dict[Path, int], list[ConfigIssue]]:
    """Parse one YAML document: returns (data, line of each key path, issues found).

    An issue under a key in ``secret_keys`` never quotes the value's text.

    A syntax error is returned as a single issue with line and column; ``data``
    is then ``None``.
    """
    loader = None
    try:
        loader = _NoAliasLoader(text)
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        column = f"column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        return None, {}, [ConfigIssue(file, line, "", f"YAML syntax error: {column}{problem}")]
    except yaml.reader.ReaderError as exc:  # a control character or bad encoding
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        return None, {}, [ConfigIssue(file, line, "", f"YAML syntax error: column {column}: "
                                      f"unacceptable character {exc.character!r}")]
    except yaml.YAMLError as exc:
        return None, {}, [ConfigIssue(file, None, "", f"YAML error: {exc}")]
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        return None, {}, []
    builder = _Builder(file, on_scalar, secret_keys)
    data = builder.build(root, ())
    return data, builder.lines, builder.issues


def _construct(constructor: yaml.SafeLoader, node: yaml.Node) -> Any:
    """Build one scalar; an unknown or failing tag (``!custom``, ``!!int abc``) is a ValueError."""
    try:
        return constructor.construct_object(node, deep=True)
    except Exception as exc:  # PyYAML's constructors raise all sorts (KeyError for !!bool x, ...)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"cannot read value {node.value!r} ({node.tag}): {problem}") from None
