"""Canonical paths: one decision for routing and for the upstream URL.

Use ``canonical_tail`` on every request the middleware owns, before anything is
sent upstream. Servers percent-decode ``PATH_INFO``, so encoded dots and slashes
are only visible in the raw request URI (``RAW_URI`` in gunicorn and werkzeug,
``REQUEST_URI`` in waitress): the raw form is checked when the server gives it,
the decoded form always, and the upstream path is re-encoded strictly from the
decoded segments. Anything ambiguous is refused (400), never "cleaned up", and so
is a target too long to be an asset's (``MAX_PATH``, ``MAX_SEGMENTS``, ``MAX_QUERY``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote_to_bytes

# Encodings that only ever serve to smuggle a separator, a dot or a control
# character past a check: %2e . %2f / %5c \ %25 % (double encoding) %3b ;
# and %00-%1f / %7f.
_BAD_ESCAPE = re.compile(r"%(2e|2f|5c|25|3b|[01][0-9a-f]|7f)", re.IGNORECASE)
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9a-fA-F]{2})")
# Characters refused anywhere in a path, raw or decoded: backslash, ';' and every control
# character (NUL, CR, LF, TAB...). A space is a file name's (``my%20file.png``): it is
# re-encoded as %20 upstream, like any other character outside the strict set.
_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f\\;]")
# What a segment may hold after strict re-encoding (RFC 3986 pchar minus ';').
_SAFE = "!$&'()*+,=:@-._~"
_NOTHING_TO_ENCODE = re.compile(r"[A-Za-z0-9!$&'()*+,=:@._~/-]*")


#: The longest request target a gateway route takes (an extension's asset paths are short).
MAX_PATH = 2048
MAX_SEGMENTS = 128
MAX_QUERY = 4096


class InvalidPath(ValueError):
    """The path was refused; the message says why (for logs, never for clients)."""


def raw_path(environ: Mapping[str, Any]) -> str | None:
    """The raw path (no query) as the client sent it, when the server tells us."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not raw:
        return None
    if raw.startswith(("http://", "https://")):  # absolute-form request target
        slash = raw.find("/", raw.find("//") + 2)
        raw = raw[slash:] if slash >= 0 else "/"
    if "?" in raw or "#" in raw:
        raw = raw.split("?", 1)[0].split("#", 1)[0]
    return raw


def canonical_tail(environ: Mapping[str, Any], path_info: str, skip: int) -> list[str]:
    """Check the request path and return its decoded segments after the first ``skip``.

    ``path_info`` is the decoded ``PATH_INFO`` (latin-1 per PEP 3333). Raises
    ``InvalidPath``. The returned segments are safe to re-encode with ``encode``.
    """
    if (len(path_info) > MAX_PATH or path_info.count("/") > MAX_SEGMENTS
            or len(environ.get("QUERY_STRING", "")) > MAX_QUERY):
        # Each segment is checked in Python: a 64 KB target of "/" cost 38 ms, a 64 KB query
        # re-encoded 28 ms, before any access check (werkzeug and waitress take that much).
        raise InvalidPath("request target too long")
    if has_bad_char(path_info):
        raise InvalidPath("forbidden character in path")
    decoded = path_info.split("/")[1:]
    raw = raw_path(environ)
    if raw is not None and len(raw) > 3 * MAX_PATH:  # every character percent-encoded, at most
        raise InvalidPath("request target too long")
    if raw is not None:
        # Both escape patterns start with '%'.
        if "%" in raw and (_BAD_ESCAPE.search(raw) or _MALFORMED_ESCAPE.search(raw)):
            raise InvalidPath("encoded separator, dot, percent or control character")
        if (raw != path_info and has_bad_char(raw)) or " " in raw:
            # A space arrives percent-encoded; a literal one in the request target means a
            # server that split nothing where it should have: refused.
            raise InvalidPath("forbidden character in raw path")
        # The common case, decided without splitting: nothing percent-encoded and PATH_INFO
        # ("/..." so the match starts on a segment boundary) is the raw path or its tail.
        if "%" not in raw and path_info[:1] == "/" and raw.endswith(path_info):
            prefix = raw[:len(raw) - len(path_info)]
        else:
            raw_segments = raw.split("/")[1:]
            # PATH_INFO is the tail of the raw path (SCRIPT_NAME may come first); since no
            # encoded slash got this far, segments map one to one.
            if len(raw_segments) < len(decoded):
                raise InvalidPath("raw path and PATH_INFO disagree")
            cut = len(raw_segments) - len(decoded)
            for enc, dec in zip(raw_segments[cut:], decoded, strict=True):
                if unquote_to_bytes(enc).decode("latin-1") != dec:
                    raise InvalidPath("raw path and PATH_INFO disagree")
            prefix = "".join("/" + seg for seg in raw_segments[:cut])
        # What comes before is SCRIPT_NAME, exactly: a server that read "//v1/execute" or
        # "/x/../v1/execute" as PATH_INFO "/v1/execute" must not make it this route (an edge
        # proxy's rule for exactly /v1/execute would not have seen it so).
        if prefix and not _same_path(prefix, environ.get("SCRIPT_NAME", "")):
            raise InvalidPath("raw path and SCRIPT_NAME disagree")
    segments = decoded[skip:]
    if path_info.isascii() and "/." not in path_info and "//" not in path_info:
        return segments  # no segment starts with a dot or is empty (but a last one), ASCII is UTF-8
    for i, seg in enumerate(segments):
        if seg in (".", ".."):
            raise InvalidPath("dot segment")
        if seg == "" and i != len(segments) - 1:
            raise InvalidPath("empty segment")
        if seg.isascii():
            continue  # ASCII is UTF-8
        try:
            # PEP 3333 hands us bytes as latin-1 text; the URL itself must be UTF-8.
            seg.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            raise InvalidPath("path is not UTF-8") from None
    return segments


def _same_path(raw: str, script_name: str) -> bool:
    """Whether the raw path's start is ``SCRIPT_NAME``: as it is (gunicorn passes a mount
    point as matched in the raw target, ``/my%20app``) or decoded (PEP 3333: bytes as latin-1)."""
    return raw == script_name or _decoded(raw) == _decoded(script_name)


def _decoded(text: str) -> str:
    return unquote_to_bytes(text.encode("latin-1", "replace")).decode("latin-1")


def has_bad_char(text: str) -> bool:
    """Whether ``text`` has a character refused anywhere in a path (``_BAD_CHAR``: backslash,
    ``;``, a control character): for printable ASCII (nearly every path) two substring
    tests, ten times faster than the regex; the regex for the rest."""
    if text.isascii() and text.isprintable():
        return "\\" in text or ";" in text
    return _BAD_CHAR.search(text) is not None


def encode(segments: list[str]) -> str:
    """Re-encode decoded segments strictly (``/`` joined, no leading slash)."""
    joined = "/".join(segments)
    if _NOTHING_TO_ENCODE.fullmatch(joined) and joined.count("/") == len(segments) - 1:
        return joined  # the common case: quote() would return every segment unchanged
    return "/".join(quote(seg.encode("latin-1"), safe=_SAFE) for seg in segments)
