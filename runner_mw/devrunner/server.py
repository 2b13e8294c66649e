"""Serve the devrunner (or any WSGI app) over HTTP/1.1 with keep-alive: ``python -m runner_mw.devrunner``.

Use ``main``/``serve`` to run the development stand-in runner on 127.0.0.1:8085 (the local Docker
convention for the real runner), and ``make_server`` when a test needs a WSGI app on a real socket
that keeps connections alive the way the reference runner (hyper) does. werkzeug's development
server closes every connection after one response, which would hide a gateway's pool-reuse bugs;
this one does not. It is a small threaded server for development and tests, not for production.

Unlike a strict WSGI server it passes an app's hop-by-hop headers through (so a stand-in can send
``Connection``/``Keep-Alive`` to exercise a gateway). An app header ``Transfer-Encoding: chunked``
asks for chunked framing; without ``Content-Length`` an HTTP/1.1 response is chunked anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import signal
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes, urlsplit

from runner_mw.devrunner.app import SAMPLE_BUNDLES, make_app

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

log = logging.getLogger("runner_mw.devrunner")

# environ key holding the request headers as received: (name, value) pairs, duplicates kept.
HEADER_LIST_KEY = "runner_mw.devrunner.header_list"
DRAIN_LIMIT = 64 * 1024 * 1024  # unread request body discarded to keep a connection; above: close
IDLE_TIMEOUT = 120.0  # seconds a kept-alive connection may sit idle (or a read may stall)


class ClientGone(ConnectionError):
    """The client closed before its request body was complete."""


class BadBody(ValueError):
    """The request body's chunked framing is broken."""


class _Body:
    """``wsgi.input`` for one request: ends where the body ends, whatever its framing."""

    def __init__(self, rfile: io.BufferedIOBase, length: int, chunked: bool) -> None:
        self._rfile = rfile
        self._left = length  # bytes left in the body, or in the current chunk
        self._chunked = chunked
        self._done = not chunked and length == 0

    def read(self, size: int = -1) -> bytes:
        out: list[bytes] = []
        want = size if size is not None and size >= 0 else None
        while not self._done and (want is None or want > 0):
            if self._chunked and self._left == 0 and not self._next_chunk():
                break
            n = self._left if want is None else min(want, self._left)
            data = self._rfile.read(n)
            if len(data) < n:
                raise ClientGone("request body cut short")
            out.append(data)
            self._left -= n
            if want is not None:
                want -= n
            if self._chunked and self._left == 0:
                self._rfile.readline(66)  # the CRLF after a chunk's data
            elif not self._chunked and self._left == 0:
                self._done = True
        return b"".join(out)

    def _next_chunk(self) -> bool:
        line = self._rfile.readline(1026)
        if not line:
            raise ClientGone("request body cut short")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadBody("bad chunk size") from None
        if size == 0:
            while self._rfile.readline(8194) not in (b"\r\n", b"\n", b""):
                pass  # trailers, ignored
            self._done = True
            return False
        self._left = size
        return True

    def readline(self, size: int = -1) -> bytes:
        line = bytearray()  # byte by byte: apps rarely read a body by lines
        while (size < 0 or len(line) < size) and not line.endswith(b"\n"):
            byte = self.read(1)
            if not byte:
                break
            line += byte
        return bytes(line)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Any:
        return iter(self.readline, b"")

    def drain(self, limit: int) -> bool:
        """Discard the unread rest of the body; False if more than ``limit`` bytes were left."""
        total = 0
        while not self._done:
            chunk = self.read(65536)
            total += len(chunk)
            if total > limit:
                return False
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "runner_mw-devrunner"
    timeout = IDLE_TIMEOUT
    # Head and body go out in separate writes: with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms a response on Linux).
    disable_nagle_algorithm = True
    server: DevServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        self.server.untrack(self.connection)
        super().finish()

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def handle_one_request(self) -> None:
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if self.parse_request():
                self._run_wsgi()
        except OSError:  # reset, timeout, or our own shutdown on stop
            self.close_connection = True

    def _run_wsgi(self) -> None:
        chunked = "transfer-encoding" in self.headers
        lengths = self.headers.get_all("Content-Length") or []
        if chunked:
            if self.headers["Transfer-Encoding"].strip().lower() != "chunked":
                self.send_error(501, "Unsupported Transfer-Encoding")
                return
            self.close_connection |= bool(lengths)  # both framings: never reuse (smuggling)
        elif len(set(lengths)) > 1 or (lengths and not lengths[0].strip().isdigit()):
            self.send_error(400, "Bad Content-Length")
            return
        length = int(lengths[0]) if lengths and not chunked else 0
        body = _Body(self.rfile, length, chunked)
        environ = self._environ(body, None if chunked or not lengths else length)
        out = _Output(self)
        try:
            result = self.server.app(environ, out.start_response)
            try:
                for data in result:
                    out.write(data)
                out.finish()
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except (ClientGone, OSError):
            self.close_connection = True
            return
        except BadBody:
            out.fail(400, "bad request body")
            return
        except Exception:
            log.exception("devrunner: the WSGI app failed")
            out.fail(500, "internal error")
            return
        try:
            if not self.close_connection and not body.drain(DRAIN_LIMIT):
                self.close_connection = True
        except (ClientGone, BadBody):
            self.close_connection = True

    def _environ(self, body: _Body, length: int | None) -> dict[str, Any]:
        raw = self.path
        target = raw
        if "://" in raw.split("?", 1)[0]:  # absolute-form request-target
            parts = urlsplit(raw)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        path, _, query = target.partition("?")
        host, port = self.server.server_address[:2]
        environ: dict[str, Any] = {
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "", "QUERY_STRING": query,
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "RAW_URI": raw, "REQUEST_URI": raw, "SERVER_NAME": str(host), "SERVER_PORT": str(port),
            "SERVER_PROTOCOL": self.request_version,
            "REMOTE_ADDR": self.client_address[0], "REMOTE_PORT": str(self.client_address[1]),
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": body,
            "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
            "wsgi.run_once": False, "wsgi.input_terminated": True,
            HEADER_LIST_KEY: list(self.headers.items()),
        }
        if length is not None:
            environ["CONTENT_LENGTH"] = str(length)
        for name, value in self.headers.items():
            if "_" in name:
                continue  # X_Foo would alias X-Foo in the environ: drop it, as gunicorn does
            key = name.upper().replace("-", "_")
            if key == "CONTENT_LENGTH":
                continue
            if key != "CONTENT_TYPE":
                key = "HTTP_" + key
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        return environ


class _Output:
    """``start_response``/``write`` of one response, choosing its framing."""

    def __init__(self, handler: _Handler) -> None:
        self.h = handler
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.sent = False
        self.chunked = False
        self.bodyless = False
        self.length: int | None = None
        self.written = 0

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if exc_info is not None:
            try:
                if self.sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called twice")
        self.status, self.headers = status, list(headers)
        return self.write

    def _send_head(self) -> None:
        assert self.status is not None, "write() before start_response()"
        h = self.h
        code = int(self.status[:3])
        h.send_response(code, self.status[4:])
        names = set()
        for name, value in self.headers:
            names.add(name.lower())
            if name.lower() == "transfer-encoding" and "chunked" in value.lower():
                self.chunked = True
            h.send_header(name, value)
        self.bodyless = h.command == "HEAD" or code < 200 or code in (204, 304)
        if self.bodyless:
            self.chunked = False
        elif "content-length" in names:
            self.length = int(dict((k.lower(), v) for k, v in self.headers)["content-length"])
        elif not self.chunked and h.request_version == "HTTP/1.1":
            self.chunked = True
            h.send_header("Transfer-Encoding", "chunked")
        elif not self.chunked:
            h.close_connection = True  # HTTP/1.0: the end of the body is the end of the connection
        h.end_headers()
        self.sent = True

    def write(self, data: bytes) -> None:
        if not self.sent:
            self._send_head()
        if not data or self.bodyless:
            return
        if self.chunked:
            self.h.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.h.wfile.write(data)
        self.written += len(data)

    def finish(self) -> None:
        if not self.sent:
            self._send_head()
        if self.chunked:
            self.h.wfile.write(b"0\r\n\r\n")
        if self.length is not None and self.written != self.length:
            self.h.close_connection = True  # the client cannot find the next response otherwise

    def fail(self, code: int, message: str) -> None:
        self.h.close_connection = True
        if self.sent:
            return
        body = message.encode()
        try:
            self.h.send_response(code)
            self.h.send_header("Content-Type", "text/plain; charset=utf-8")
            self.h.send_header("Content-Length", str(len(body)))
            self.h.send_header("Connection", "close")
            self.h.end_headers()
            self.h.wfile.write(body)
        except OSError:
            pass


class DevServer(ThreadingHTTPServer):
    """A threaded HTTP/1.1 keep-alive server for one WSGI app. Build it with ``make_server``."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], app: WSGIApplication) -> None:
        self.app = app
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a sandboxed machine.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{host if isinstance(host, str) else host.decode()}:{self.port}"

    def track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns[conn] = threading.current_thread()

    def untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.pop(conn, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("devrunner: connection from %s failed", client_address, exc_info=True)

    def start(self, poll_interval: float = 0.01) -> DevServer:
        """Serve from a daemon thread (for tests); ``stop`` ends it."""
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": poll_interval}, name="devrunner", daemon=True
        )
        self._thread.start()
        return self

    def close_connections(self, timeout: float = 5.0) -> None:
        """Cut every open connection (idle keep-alive ones included) and wait for their threads."""
        with self._conns_lock:
            conns = list(self._conns.items())
            for conn, _ in conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading or writing
        for _, thread in conns:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def stop(self) -> None:
        """Stop accepting, cut open connections and close the listening socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.close_connections()
        self.server_close()


def make_server(host: str, port: int, app: WSGIApplication) -> DevServer:
    """Bind ``app`` to ``host:port`` (0 picks a free port; see ``.port``/``.url``)."""
    return DevServer((host, port), app)


def serve(host: str = "127.0.0.1", port: int = 8085, bundles: Path | str | None = None) -> None:
    """Run the devrunner until SIGINT or SIGTERM (handled from the main thread only)."""
    root = Path(bundles) if bundles is not None else SAMPLE_BUNDLES
    server = make_server(host, port, make_app(root))

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever, which runs in this very thread: ask from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, stop)
    # Printed once the handlers are in: whoever waits for this line may signal right away.
    print(f"devrunner listening on {server.url} (bundles: {root})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close_connections()
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    """``python -m runner_mw.devrunner [--host H] [--port P] [--bundles DIR]``; 0 on a clean stop."""
    parser = argparse.ArgumentParser(
        prog="python -m runner_mw.devrunner",
        description="Development stand-in for the extension runner: speaks its HTTP contract, "
        "serves UI bundles, and echoes execute requests (it runs no WebAssembly).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8085,
                        help="port, 0 for any free one (default: %(default)s)")
    parser.add_argument("--bundles", type=Path, default=SAMPLE_BUNDLES,
                        help="folder of {extensionId}/{sha256 hex}/ui/ bundles (default: the sample)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number")
    if not args.bundles.is_dir():
        parser.error(f"--bundles {args.bundles} is not a folder")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        serve(args.host, args.port, args.bundles)
    except OSError as exc:
        print(f"devrunner: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
