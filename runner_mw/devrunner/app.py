"""The devrunner's WSGI app: the extension runner's HTTP contract, with an echo for an extension.

Use it when a developer or a test needs something that answers like the reference runner
(``ee/runner`` in Nine-Minds/alga-psa) on ``/v1/execute``, ``/ext-ui/...``, ``/healthz``, ``/`` and
``/warmup``: same status codes, rejection texts, headers, path rules and execute envelope. It runs
no WebAssembly: ``/v1/execute`` answers with a JSON echo of the request it was given. It checks no
credential and trusts every tenant, so it is a development tool, never a deployment.

Where it differs from the reference on purpose (a stand-in has no registry or bundle store): an
unknown extension or hash is a 404 (the reference answers 500/502 after a failed bundle download),
``tenants=`` stands in for the registry's install check, and ``/ext-ui/{ext}/{hash}/`` serves
``index.html`` (axum's catch-all does not match an empty tail, so the reference answers 404).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from runner_mw.devrunner import checks

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

SAMPLE_BUNDLES = Path(__file__).resolve().parent / "bundles"
SAMPLE_EXTENSION_ID = "com.example.hello"
# sha256("runner_mw devrunner sample bundle: com.example.hello v1"): a fixed name for the sample
# bundle, not a digest of its files (the stand-in verifies no archive).
SAMPLE_CONTENT_HASH = "sha256:7912f3afebe71b81845ce1d6e806be3f9e8399c76b9bf5c6946c200e6f1ad6ce"

# axum's DefaultBodyLimit, which the reference runner keeps for its JSON extractor.
MAX_JSON_BODY = 2 * 1024 * 1024
# The reference sets this on every response (a tower layer); the gateway must strip it.
IMMUTABLE = "public, max-age=31536000, immutable"
# Same allow-list and mime_guess answers as the reference (util/path_sanitize.rs, util/mime.rs).
CONTENT_TYPES = {
    "html": "text/html", "js": "text/javascript", "css": "text/css", "json": "application/json",
    "map": "application/json", "svg": "image/svg+xml", "png": "image/png", "jpg": "image/jpeg",
    "jpeg": "image/jpeg", "webp": "image/webp", "woff": "font/woff", "woff2": "font/woff2",
}
# Scripts and styles only from the bundle itself: the sample page has nothing inline. No
# frame-ancestors: the page exists to be framed by the host app.
HTML_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'"
)
IDEMPOTENCY_ENTRIES = 1024  # the reference's map is unbounded; a dev tool should not grow forever

Headers = list[tuple[str, str]]
Reply = tuple[int, Headers, bytes]


class _Reject(Exception):
    """A finished reply raised from deep inside a handler (the way axum's extractors reject)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply[0])
        self.reply = reply


def _text(status: int, message: str) -> Reply:
    return status, [("Content-Type", "text/plain; charset=utf-8")], message.encode()


def _json(status: int, body: bytes) -> Reply:
    return status, [("Content-Type", "application/json")], body


def _visible(value: str) -> str:
    # axum's HeaderValue::to_str fails on anything but visible ASCII and the runner then uses "".
    return value if all(c == "\t" or " " <= c <= "~" for c in value) else ""


class DevRunnerApp:
    """The runner contract as a WSGI callable; build it with ``make_app``."""

    def __init__(
        self,
        bundles: Path,
        *,
        name: str | None = None,
        tenants: Collection[str] | None = None,
        max_file_bytes: int | None = None,
    ) -> None:
        self.bundles = bundles
        self.name = name
        self.tenants = None if tenants is None else frozenset(tenants)
        self.max_file_bytes = max_file_bytes
        self._lock = threading.Lock()
        self._replies: OrderedDict[str, bytes] = OrderedDict()
        # The reference remembers the last tenant seen per (extension, hash) so that subresources
        # requested without ?tenant= (app.js, style.css) still resolve: mirrored here.
        self._tenant_hints: dict[tuple[str, str], str] = {}
        self._etags: dict[tuple[str, int, int], str] = {}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            status, headers, body = self._route(environ)
        except _Reject as rejected:
            status, headers, body = rejected.reply
        except checks.Unprocessable as exc:
            problem = f"Failed to deserialize the JSON body into the target type: {exc}"
            status, headers, body = _text(422, problem)
        headers = [*headers, ("Cache-Control", IMMUTABLE)]
        if status != 304:
            headers.append(("Content-Length", str(len(body))))
        if environ["REQUEST_METHOD"] == "HEAD":
            body = b""  # the length stays that of the GET body, as axum answers HEAD
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [body]

    def _route(self, environ: WSGIEnvironment) -> Reply:
        method = environ["REQUEST_METHOD"]
        path = _raw_path(environ)  # axum routes on the undecoded path
        if path == "/v1/execute":
            return _allow(method, "POST") or self._execute(environ)
        if path == "/healthz":
            return _allow(method, "GET", "HEAD") or self._healthz()
        if path == "/":
            return _allow(method, "GET", "HEAD") or self._root(environ)
        if path == "/warmup":
            return _allow(method, "POST") or self._warmup(environ)
        if path.startswith("/ext-ui/"):
            parts = path[len("/ext-ui/"):].split("/", 2)
            if len(parts) == 3 and parts[0] and parts[1]:
                return _allow(method, "GET", "HEAD") or self._asset(environ, *parts)
        return 404, [], b""

    # -- /v1/execute ---------------------------------------------------------------------------

    def _execute(self, environ: WSGIEnvironment) -> Reply:
        request = checks.check_execute(_json_body(environ))
        tenant = _visible(environ.get("HTTP_X_ALGA_TENANT", ""))
        extension = _visible(environ.get("HTTP_X_ALGA_EXTENSION", ""))
        if not tenant or not extension:
            return _json(200, checks.reply(400, error="missing_routing_headers"))
        key = _visible(environ.get("HTTP_X_IDEMPOTENCY_KEY", ""))
        if key:
            with self._lock:
                cached = self._replies.get(key)
            if cached is not None:
                return _json(200, cached)
        http: dict[str, Any] = request["http"]
        text: str | None = None
        if http.get("body_b64") is not None:
            try:
                text = base64.b64decode(http["body_b64"], validate=True).decode("utf-8", "replace")
            except binascii.Error:
                # The guest would fail on it: the runner reports that in-band, uncached.
                return _json(200, checks.reply(500, error="execute_failed: body_b64 is not base64"))
        path = http["path"] + ("?" + urlencode(http["query"]) if http.get("query") else "")
        request_id = request["context"].get("request_id") or environ.get("HTTP_X_REQUEST_ID")
        echo: dict[str, Any] = {
            "tenant": tenant, "extension": extension, "method": http["method"], "path": path,
            "body": text, "request_id": request_id,
        }
        if self.name is not None:
            echo["runner"] = self.name
        body = json.dumps(echo, separators=(",", ":")).encode()
        reply = checks.reply(
            200, headers={"content-type": "application/json"}, body_b64=base64.b64encode(body).decode()
        )
        if key:
            with self._lock:
                self._replies[key] = reply
                while len(self._replies) > IDEMPOTENCY_ENTRIES:
                    self._replies.popitem(last=False)
        return _json(200, reply)

    # -- small endpoints -----------------------------------------------------------------------

    def _healthz(self) -> Reply:
        store = "ok" if self.bundles.is_dir() else "bundle_store_unreachable"
        body = {"cache_writable": True, "bundle_store": store, "ext_cache_max_bytes": None}
        return _json(200, json.dumps(body, separators=(",", ":")).encode())

    def _root(self, environ: WSGIEnvironment) -> Reply:
        # The reference resolves the extension from Host through its registry; with no registry
        # the only sensible answer is the one bundle there is, for a developer's browser.
        found = sorted(self.bundles.glob("*/*/ui/index.html")) if self.bundles.is_dir() else []
        if len(found) != 1:
            return 404, [], b""
        ext, hex_ = found[0].parts[-4], found[0].parts[-3]
        tenant = _query(environ).get("tenant") or "dev"
        location = f"/ext-ui/{ext}/sha256:{hex_}/index.html?{urlencode({'tenant': tenant})}"
        return 307, [("Location", location)], b""

    def _warmup(self, environ: WSGIEnvironment) -> Reply:
        checks.check_warmup(_json_body(environ))
        return _text(400, "warmup unsupported without tenant + extension context")

    # -- /ext-ui/{extensionId}/{contentHash}/{path...} -----------------------------------------

    def _asset(self, environ: WSGIEnvironment, raw_ext: str, raw_hash: str, raw_tail: str) -> Reply:
        try:
            ext, content_hash, tail = (unquote(p, errors="strict") for p in (raw_ext, raw_hash, raw_tail))
        except UnicodeDecodeError:
            return _text(400, "Invalid URL: Cannot parse percent-encoded path as UTF-8")
        nosniff = ("X-Content-Type-Options", "nosniff")
        hex_ = content_hash.removeprefix("sha256:").lower()
        if hex_ == content_hash or not hex_ or any(c not in "0123456789abcdef" for c in hex_):
            return _text(400, "invalid content hash")
        query = _query(environ)
        tenant = query["tenant"] if "tenant" in query else _visible(environ.get("HTTP_X_TENANT_ID", ""))
        with self._lock:
            if tenant:
                self._tenant_hints[(ext, hex_)] = tenant
            else:
                tenant = self._tenant_hints.get((ext, hex_), "")
        ui_root = self.bundles / ext / hex_ / "ui"
        if (
            not tenant
            or (self.tenants is not None and tenant not in self.tenants)
            or not checks.safe_extension_id(ext)
            or not (ui_root / "index.html").is_file()
        ):
            return 404, [nosniff], b""
        parts = checks.sanitize(tail)
        if parts is None:
            return _text(400, "invalid path")
        file = ui_root.joinpath(*parts)
        if not parts or not file.is_file() or not file.resolve().is_relative_to(ui_root.resolve()):
            file = ui_root / "index.html"  # SPA fallback, as the reference
        try:
            stat = file.stat()
            if self.max_file_bytes is not None and stat.st_size > self.max_file_bytes:
                return _text(413, "asset too large")
            data = file.read_bytes()
        except OSError:
            return 404, [nosniff], b""
        etag = self._etag(file, stat.st_mtime_ns, data)
        headers: Headers = [("ETag", etag), nosniff]
        inm = environ.get("HTTP_IF_NONE_MATCH")
        if inm is not None and any(t.strip() in ("*", etag) for t in inm.split(",")):
            return 304, headers, b""
        suffix = file.suffix[1:].lower()
        headers.append(("Content-Type", CONTENT_TYPES.get(suffix, "application/octet-stream")))
        if suffix == "html":
            headers.append(("Content-Security-Policy", HTML_CSP))
        return 200, headers, data

    def _etag(self, file: Path, mtime_ns: int, data: bytes) -> str:
        # The reference tags each file with its own SHA-256 (util/etag.rs), not the bundle hash.
        key = (str(file), mtime_ns, len(data))
        with self._lock:
            etag = self._etags.get(key)
        if etag is None:
            etag = f'"sha256-{hashlib.sha256(data).hexdigest()}"'
            with self._lock:
                if len(self._etags) > 4096:
                    self._etags.clear()
                self._etags[key] = etag
        return etag


def make_app(
    bundles: Path | str | None = None,
    *,
    name: str | None = None,
    tenants: Collection[str] | None = None,
    max_file_bytes: int | None = None,
) -> DevRunnerApp:
    """Build the devrunner WSGI app.

    ``bundles`` is a folder laid out as ``{extensionId}/{sha256 hex}/ui/...`` (default: the
    shipped sample). ``name``, when given, is added to every execute echo as ``"runner"`` (to tell
    two devrunners apart). ``tenants`` limits which tenants may load UI assets (default: any
    non-empty tenant, as if every install existed). ``max_file_bytes`` mirrors the reference's
    ``EXT_MAX_FILE_BYTES`` cap (413 above it).
    """
    root = Path(bundles) if bundles is not None else SAMPLE_BUNDLES
    return DevRunnerApp(root, name=name, tenants=tenants, max_file_bytes=max_file_bytes)


def _allow(method: str, *allowed: str) -> Reply | None:
    if method in allowed:
        return None
    return 405, [("Allow", ",".join(allowed))], b""


def _raw_path(environ: WSGIEnvironment) -> str:
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        # The request-target may be in absolute form; only its path decides.
        return urlsplit(raw).path if "://" in raw.split("?", 1)[0] else raw.split("?", 1)[0]
    return quote(environ.get("PATH_INFO", "").encode("latin-1"), safe="/:@!$&'()*+,;=~")


def _query(environ: WSGIEnvironment) -> dict[str, str]:
    pairs = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    return {k: v[0] for k, v in pairs.items()}


def _json_body(environ: WSGIEnvironment) -> Any:
    """The body as JSON, or the reply axum's ``Json`` extractor gives, in the same order."""
    mime = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
    kind, _, sub = mime.partition("/")
    if kind != "application" or not (sub == "json" or sub.endswith("+json")):
        raise _Reject(_text(415, "Expected request with `Content-Type: application/json`"))
    too_large = _text(413, "Failed to buffer the request body: length limit exceeded")
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH", "")
    if length.strip():
        size = int(length)
        if size > MAX_JSON_BODY:
            raise _Reject(too_large)  # decided from the header, before reading a byte
        chunks, got = [], 0
        while got < size:
            chunk = stream.read(min(65536, size - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        body = b"".join(chunks)
    elif environ.get("wsgi.input_terminated"):
        body = stream.read(MAX_JSON_BODY + 1)
        if len(body) > MAX_JSON_BODY:
            raise _Reject(too_large)
    else:
        body = b""
    try:
        return json.loads(body, parse_constant=checks.no_constants)
    except ValueError as exc:
        raise _Reject(_text(400, f"Failed to parse the request body as JSON: {exc}")) from None
