"""runner_mw.backends.wire: framing, keep-alive, limits and deadlines over real loopback sockets.

Each test scripts a raw server (``Scripted``): the replies it sends, byte for byte, one list
per connection. What the server receives and how many connections it accepted show what the
client sent and whether it kept a connection for the next request.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mwfixtures import wait_until
from standin import _RawServer, _read_request

from runner_mw.backends import wire
from runner_mw.errors import BadGateway, Overloaded, RunnerTimeout, RunnerUnreachable

Step = bytes | Callable[[socket.socket], None]
pytest_plugins = ["mwfixtures"]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


class Scripted(_RawServer):
    """Connection n plays ``script[n]``: each step answers one request (bytes to send, or a
    function of the socket); the connection closes when its steps run out."""

    def __init__(self, *script: Sequence[Step]) -> None:
        super().__init__()
        self.script = list(script)
        self.heads: list[bytes] = []

    def serve(self, conn: socket.socket) -> None:
        with self._lock:
            steps = self.script[self._accepted - 1] if self._accepted <= len(self.script) else []
        for step in steps:
            head = _read_request(conn)
            if head is None:
                return
            with self._lock:
                self.heads.append(head)
            if callable(step):
                step(conn)
            else:
                conn.sendall(step)


@contextmanager
def pool_for(server: Scripted, *, maxsize: int = 2, wait_s: float = 1.0) -> Iterator[wire.Pool]:
    pool = wire.Pool("127.0.0.1", server.port, tls=None, maxsize=maxsize, wait_s=wait_s, connect_s=2.0)
    try:
        yield pool
    finally:
        pool.close()


def get(pool: wire.Pool, method: str = "GET", *, body: bytes | None = None, read_s: float = 2.0,
        total_s: float | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    data = wire.encode_request(method, "/x", {"host": "runner"}, body)
    resp = wire.request(pool, method, data, read_s=read_s, total_s=total_s)
    try:
        return resp.status, resp.headers, resp.read_all(1 << 20)
    finally:
        resp.release()


# -------------------------------------------------------------------------- framing


class _LineByLine:
    """The reference: llhttp's own ``on_header`` callback, a call per header line."""

    def __init__(self) -> None:
        self.lines: list[tuple[bytes, bytes]] = []
        self.headers: list[tuple[str, str]] | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers is None:
            self.lines.append((name, value))

    def on_headers_complete(self) -> None:
        if self.headers is None and self.parser.get_status_code() >= 200:
            self.headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.lines]
        self.lines = []


_NAME = st.text("!#$%&'*+.^_`|~0123456789abcXYZ-", min_size=1, max_size=6)
_VALUE = st.text(" \taZ:,;=\"\x80\xff", max_size=8).map(lambda t: t.encode("latin-1"))
_LINE = st.tuples(_NAME, _VALUE).map(lambda nv: nv[0].encode() + b":" + nv[1])


@settings(max_examples=400 * (100 if os.environ.get("RUNNER_MW_FUZZ_LONG") == "1" else 1), deadline=None)
@given(st.sampled_from([b"", b"\r\n", b"\n", b"\r\n\r\n"]),
       st.lists(st.lists(_LINE, max_size=3), max_size=2), st.lists(_LINE, max_size=6),
       st.one_of(st.none(), st.tuples(st.integers(0, 6), st.binary(max_size=10))),
       st.lists(st.integers(1, 40), max_size=6))
def test_the_head_cut_from_the_bytes_has_the_lines_llhttp_calls_back_with(
        lead: bytes, interims: list[list[bytes]], lines: list[bytes],
        junk: tuple[int, bytes] | None, cuts: list[int]) -> None:
    # The same bytes, fed in the same pieces, to the reference and to wire's parse: both
    # refuse them, or both give the same header lines (names and values, in order).
    if junk is not None:  # a line of any bytes, somewhere: mostly refused, sometimes not
        lines.insert(junk[0], junk[1])
    head = lead
    for extra in interims:
        head += b"HTTP/1.1 103 Early Hints\r\n" + b"".join(x + b"\r\n" for x in extra) + b"\r\n"
    head += b"HTTP/1.1 200 OK\r\n" + b"".join(x + b"\r\n" for x in lines) + b"content-length: 0\r\n\r\n"
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(head[at:at + cut])
        at += cut
    pieces.append(head[at:])
    reference = _LineByLine()
    reference.parser = httptools.HttpResponseParser(reference)  # type: ignore[attr-defined]
    parse = wire._Parse()
    try:
        for piece in pieces:
            reference.parser.feed_data(piece)  # type: ignore[attr-defined]
    except httptools.HttpParserError:
        with pytest.raises(BadGateway):
            for piece in pieces:
                parse.feed(piece)
        return
    for piece in pieces:
        parse.feed(piece)
    assert parse.head_done
    assert parse.headers == reference.headers



@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3;ext=1\r\nllo\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
], ids=["content-length", "chunked", "chunked-trailer", "100-continue", "103-early-hints"])
def test_framed_replies_are_read_whole_and_the_connection_is_kept(reply: bytes) -> None:
    with Scripted([reply, OK]) as server, pool_for(server) as pool:
        status, headers, body = get(pool)
        assert (status, body) == (200, b"hello")
        names = [n.lower() for n, _ in headers]
        assert "link" not in names and "x-trailer" not in names  # interim and trailer headers dropped
        assert get(pool)[2] == b"hi"
        assert server.connections == 1


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\n\r\nhello",  # framed by the end of the connection
], ids=["connection-close", "http-1.0", "until-close"])
def test_replies_that_end_the_connection_are_read_then_not_reused(reply: bytes) -> None:
    with Scripted([reply], [OK]) as server, pool_for(server) as pool:
        assert get(pool)[::2] == (200, b"hello")
        assert get(pool)[2] == b"hi"
        assert server.connections == 2


def test_a_bodiless_status_is_read_whatever_its_content_length_and_not_reused() -> None:
    with Scripted([b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", OK], [OK]) as server, \
            pool_for(server) as pool:
        assert get(pool)[::2] == (304, b"")
        assert get(pool)[2] == b"hi"
        assert server.connections == 2  # see the late-bytes test below


def test_head_reply_is_the_head_alone_and_not_reused() -> None:
    with Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", OK], [OK]) as server, \
            pool_for(server) as pool:
        status, headers, body = get(pool, "HEAD")
        assert (status, body, dict(headers)["Content-Length"]) == (200, b"", "5")
        assert get(pool)[2] == b"hi"
        assert server.connections == 2


@pytest.mark.parametrize(("method", "reply"), [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n"),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
], ids=["head", "304", "204"])
def test_bytes_sent_after_a_bodiless_reply_once_the_next_request_came_are_not_its_reply(
        method: str, reply: bytes) -> None:
    # The stray bytes come only when the next request does (as a runner's second write does
    # when Nagle holds it back until that request's ACK): no idle check can see them first.
    def late(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil" + OK)

    with Scripted([reply, late], [OK]) as server, pool_for(server) as pool:
        assert get(pool, method)[::2] == (200 if method == "HEAD" else int(reply[9:12]), b"")
        assert get(pool)[2] == b"hi"
        assert server.connections == 2


def test_a_head_reply_followed_by_bytes_is_not_reused() -> None:
    with Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"], [OK]) as server, \
            pool_for(server) as pool:
        assert get(pool, "HEAD")[::2] == (200, b"")
        assert get(pool)[2] == b"hi"  # not "hello" read as the next reply
        assert server.connections == 2


MALFORMED = {
    "cl-and-te": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"2\r\nhi\r\n0\r\n\r\n"),
    "duplicate-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
    "cl-list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nhi",
    "cl-signed": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nhi",
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhi",
    "te-gzip-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    "te-chunked-twice": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nhi",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi",
    "nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nhi",
    "cr-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nhi",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nhi",
    "chunk-size-overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nhi",
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "http-2.0": b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    "status-600": b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\nhi",
    "switching-protocols": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                            b"Connection: upgrade\r\n\r\n"),
    "too-many-headers": b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 101 + b"Content-Length: 2\r\n\r\nhi",
    "head-too-long": b"HTTP/1.1 200 OK\r\n" + b"X-A: " + b"a" * 70_000 + b"\r\nContent-Length: 2\r\n\r\nhi",
    "data-after-reply": OK + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno",
    "cut-short-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhi",
    "cut-short-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    "closed-before-reply": b"",
    # A 1xx with a length: llhttp reads a body for 104-199, whose bytes (a fake head, a
    # chunk trailer) must never be taken for the real reply's head.
    "interim-body-fake-head": (b"HTTP/1.1 199 X\r\nContent-Length: 49\r\n\r\n"
                               b"HTTP/1.1 200 OK\r\nSet-Cookie: session=attacker\r\n\r\n"
                               b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"),
    "interim-chunked-trailer": (b"HTTP/1.1 150 X\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"0\r\nX-Trailer: injected\r\n\r\n"
                                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"),
    "interim-103-length": (b"HTTP/1.1 103 Early Hints\r\nContent-Length: 0\r\n\r\n" + OK),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_or_short_reply_is_a_bad_gateway_and_its_connection_is_dropped(name: str) -> None:
    with Scripted([MALFORMED[name]], [OK]) as server, pool_for(server) as pool:
        with pytest.raises(BadGateway):
            get(pool)
        assert get(pool)[2] == b"hi"
        assert server.connections == 2


def test_the_body_streams_in_bounded_pieces_and_not_all_at_once() -> None:
    size = 3 * 1024 * 1024
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"z" * size
    with Scripted([reply]) as server, pool_for(server) as pool:
        resp = wire.request(pool, "GET", wire.encode_request("GET", "/x", {"host": "h"}, None), read_s=2.0)
        try:
            pieces = list(resp.stream())
        finally:
            resp.release()
        assert sum(map(len, pieces)) == size
        # The first piece comes after about CHUNK bytes; then pieces of about STREAM_CHUNK.
        assert wire.CHUNK <= len(pieces[0]) <= 2 * wire.CHUNK
        assert max(map(len, pieces)) <= 2 * wire.STREAM_CHUNK
        assert len(pieces) >= size // (2 * wire.STREAM_CHUNK)


# -------------------------------------------------------------------------- what is sent


def test_finished_only_once_the_whole_body_was_handed_out() -> None:
    big = b"x" * (3 * wire.CHUNK)
    with Scripted([OK, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
                   b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"]) as server, pool_for(server) as pool:
        for method, body in (("GET", b"hi"), ("GET", big), ("HEAD", b"")):
            resp = wire.request(pool, method, wire.encode_request(method, "/x", {"host": "r"}, None),
                                read_s=2.0)
            try:
                pieces = resp.stream()
                got = next(pieces, b"")
                assert resp.finished() is (got == body)  # a small body comes in one piece
                got += b"".join(pieces)
                assert got == body and resp.finished()
            finally:
                resp.release()
        assert server.connections == 1


def test_the_request_goes_as_one_head_with_its_content_length() -> None:
    with Scripted([OK]) as server, pool_for(server) as pool:
        get(pool, "POST", body=b'{"a":1}')
        head = server.heads[0].decode()
        assert head.split("\r\n")[0] == "POST /x HTTP/1.1"
        assert "host: runner" in head and "content-length: 7" in head


@pytest.mark.parametrize(("headers", "target"), [
    ({"host": "h", "x-a": "1\r\nx-injected: 1"}, "/x"),
    ({"host": "h", "x-a": "1\nx"}, "/x"),
    ({"host": "h", "x-a": "a\x00"}, "/x"),
    ({"host": "h", "x a": "1"}, "/x"),
    ({"host": "h", "x:a": "1"}, "/x"),
    ({"host": "h", "": "1"}, "/x"),
    ({"host": "h", "x-a": "\u20ac"}, "/x"),  # not latin-1: cannot be sent as it is
    ({"host": "h"}, "/x HTTP/1.1\r\nx-injected: 1\r\n\r\nGET /y"),
    ({"host": "h"}, "/a b"),
])
def test_a_header_or_target_that_would_split_the_request_is_refused(headers: dict[str, str],
                                                                   target: str) -> None:
    with pytest.raises(ValueError):
        wire.encode_request("GET", target, headers, None)


# -------------------------------------------------------------------------- stale connections


def _close_without_reply(conn: socket.socket) -> None:
    conn.shutdown(socket.SHUT_RDWR)


def test_a_get_on_a_connection_the_runner_dropped_is_sent_again_once_on_a_new_one() -> None:
    with Scripted([OK, _close_without_reply], [OK]) as server, pool_for(server) as pool:
        assert get(pool)[2] == b"hi"
        assert get(pool)[2] == b"hi"
        assert (server.connections, len(server.heads)) == (2, 3)


def _endless(prefix: bytes, unit: bytes, sent: list[int]) -> Callable[[socket.socket], None]:
    def send(conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        try:
            conn.sendall(head + prefix)
            for _ in range(20_000):  # about 60 MB: far more than any bound; ends the test
                conn.sendall(unit * 64)
                sent[0] += len(unit) * 64
        except OSError:
            pass  # the gateway gave up: what is wanted
    return send


@pytest.mark.parametrize(("prefix", "unit"), [
    (b"2\r\nhi\r\n0\r\n", b"X-Trailer: aaaaaaaaaaaaaaaaaaaaaaaa\r\n"),  # trailers without end
    (b"2;", b"ext=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa;"),  # a chunk extension without end
])
def test_trailers_or_an_extension_without_end_are_cut(prefix: bytes, unit: bytes) -> None:
    # Bytes kept coming, so read_s never fired: gigabytes read for a 2-byte body, a thread,
    # a pool slot and a core held for as long as the runner liked.
    sent = [0]
    with Scripted([_endless(prefix, unit, sent)]) as server, pool_for(server) as pool:
        data = wire.encode_request("GET", "/x", {"host": "h"}, None)
        resp = wire.request(pool, "GET", data, read_s=5.0)
        received = 0
        with pytest.raises(BadGateway):
            for piece in resp.stream():
                received += len(piece)
        resp.release()
        assert received <= 2
        wait_until(lambda: not any(t.is_alive() for t in server._threads), what="the runner to stop")
        assert sent[0] < 16 << 20, sent  # cut after the bound (and what the kernel buffers), not at the end


def test_one_byte_chunks_are_framing_enough() -> None:
    body = b"".join(b"1\r\n" + bytes([65 + i % 26]) + b"\r\n" for i in range(50_000)) + b"0\r\n\r\n"
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    with Scripted([reply]) as server, pool_for(server) as pool:
        assert len(get(pool)[2]) == 50_000


TOO_LARGE = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class AnswersFromTheHead(_RawServer):
    """A body limit: 413 decided from the request head, the body never read; then the
    connection is closed (a reset: unread bytes) or left open, unread."""

    def __init__(self, *, keep_open: bool) -> None:
        super().__init__()
        self.keep_open = keep_open

    def serve(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        conn.sendall(TOO_LARGE)
        if self.keep_open:
            self._stop.wait(30)
        conn.close()


@pytest.mark.parametrize("keep_open", [False, True], ids=["reset", "left-unread"])
def test_a_reply_sent_before_the_body_was_read_is_the_reply(keep_open: bool) -> None:
    # The runner's 413 from the head alone: the gateway, still sending 12 MB, met a reset
    # (a 502) or a full window until its deadline (a 504) and never read the 413 it had.
    body = b"{" + b" " * (12 << 20) + b"}"
    with AnswersFromTheHead(keep_open=keep_open) as server, pool_for(server) as pool:
        status, _, _ = get(pool, "POST", body=body, read_s=1.0, total_s=1.0)
        assert status == 413
        assert pool._idle == []  # never reused


def test_the_retry_goes_on_a_new_connection_not_another_idle_one() -> None:
    # A runner restart drops every idle connection at once: the retry took the next idle
    # one, dropped too, and the asset was a 502 while the runner was up.
    with Scripted([OK, _close_without_reply], [OK, _close_without_reply], [OK]) as server, \
            pool_for(server) as pool:
        data = wire.encode_request("GET", "/x", {"host": "h"}, None)
        held = wire.request(pool, "GET", data, read_s=2.0)  # two connections in use at once
        assert get(pool)[2] == b"hi"
        assert held.read_all(10) == b"hi"
        held.release()
        assert server.connections == 2
        assert get(pool)[2] == b"hi"
        assert server.connections == 3


def test_a_post_on_a_connection_the_runner_dropped_is_never_sent_again() -> None:
    with Scripted([OK, _close_without_reply], [OK]) as server, pool_for(server) as pool:
        assert get(pool, "POST", body=b"{}")[2] == b"hi"
        with pytest.raises(BadGateway):
            get(pool, "POST", body=b"{}")
        assert (server.connections, len(server.heads)) == (1, 2)


def test_an_idle_connection_the_runner_closed_is_not_used() -> None:
    # The server closes right after its reply: the pool sees the EOF before sending on it.
    with Scripted([OK], [OK]) as server, pool_for(server) as pool:
        assert get(pool)[2] == b"hi"
        wait_until(lambda: not any(t.is_alive() for t in server._threads), what="server closed")
        assert get(pool, "POST", body=b"{}")[2] == b"hi"  # a POST would not be retried
        assert server.connections == 2


def test_tcp_info_tells_an_idle_connection_from_one_with_unread_bytes_or_closed() -> None:
    # Linux answers from TCP_INFO (no GIL release); elsewhere None sends the pool to poll().
    expect = (lambda v: v) if sys.platform == "linux" else (lambda v: None)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
        with client, peer:
            assert wire.tcp_idle(client, 0) is expect(True)
            peer.sendall(b"abc")
            wait_until(lambda: wire.tcp_idle(client, 0) is expect(False), what="bytes seen")
            assert client.recv(10) == b"abc"
            assert wire.tcp_idle(client, 3) is expect(True)
            peer.close()
            wait_until(lambda: wire.tcp_idle(client, 3) is expect(False), what="FIN seen")


# -------------------------------------------------------------------------- pool and deadlines


def test_a_full_pool_is_overloaded_after_the_wait_and_a_released_slot_is_reusable() -> None:
    with Scripted([OK, OK]) as server, pool_for(server, maxsize=1, wait_s=0.2) as pool:
        data = wire.encode_request("GET", "/x", {"host": "h"}, None)
        held = wire.request(pool, "GET", data, read_s=2.0)
        started = time.monotonic()
        with pytest.raises(Overloaded):
            wire.request(pool, "GET", data, read_s=2.0)
        assert time.monotonic() - started >= 0.15
        held.read_all(10)
        held.release()
        held.release()  # idempotent: the slot is not freed twice
        assert get(pool)[2] == b"hi"
        assert server.connections == 1
        conn, _ = pool.get()
        pool.put(conn, True)
        with pytest.raises(RuntimeError):  # a second put would let two threads share conn
            pool.put(conn, True)


def test_a_waiting_get_takes_the_slot_released_during_its_wait() -> None:
    with Scripted([OK, OK]) as server, pool_for(server, maxsize=1, wait_s=30.0) as pool:
        data = wire.encode_request("GET", "/x", {"host": "h"}, None)
        held = wire.request(pool, "GET", data, read_s=2.0)
        got: list[bytes] = []
        waiter = threading.Thread(target=lambda: got.append(get(pool)[2]))
        waiter.start()
        try:
            wait_until(lambda: pool._waiting == 1, what="a get() waiting for the only slot")
            assert not got
            held.read_all(10)
            held.release()
            waiter.join(10.0)  # well before wait_s: the release woke it
            assert got == [b"hi"]
        finally:
            held.release()
            waiter.join(30.0)
        assert server.connections == 1  # it got the released connection, not a new one


def test_many_threads_never_hold_more_connections_than_the_pool_size() -> None:
    busy = peak = 0
    lock = threading.Lock()

    def counted(conn: socket.socket) -> None:
        nonlocal busy, peak
        with lock:
            busy += 1
            peak = max(peak, busy)
        time.sleep(0.002)
        with lock:
            busy -= 1
        conn.sendall(OK)

    with Scripted(*[[counted] * 200] * 40) as server, pool_for(server, maxsize=2, wait_s=30.0) as pool:
        def work() -> list[bytes]:
            return [get(pool)[2] for _ in range(25)]

        with ThreadPoolExecutor(8) as workers:
            results = [f.result() for f in [workers.submit(work) for _ in range(8)]]
        assert results == [[b"hi"] * 25] * 8
        assert peak == 2  # the pool's bound, reached but never passed
        assert server.connections == 2  # kept alive: never more connections than slots
        assert pool._busy == 0 and pool._waiting == 0


def test_a_refused_connect_is_not_sent() -> None:
    with Scripted() as server:
        port = server.port
    pool = wire.Pool("127.0.0.1", port, tls=None, maxsize=1, wait_s=0.1, connect_s=1.0)
    with pytest.raises(wire.NotSent) as info:
        get(pool)
    assert isinstance(info.value, RunnerUnreachable)
    with pytest.raises(wire.NotSent):  # not Overloaded: the failed connect gave its slot back
        get(pool)


def _drip(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")  # the head at once
    for byte in b"0123456789":
        conn.sendall(bytes([byte]))
        time.sleep(0.1)


def test_total_s_bounds_a_dripping_reply_and_read_s_bounds_each_silence() -> None:
    with Scripted([_drip]) as server, pool_for(server) as pool:
        started = time.monotonic()
        with pytest.raises(RunnerTimeout):
            get(pool, read_s=1.0, total_s=0.5)
        assert time.monotonic() - started < 1.5
    with Scripted([_drip]) as server, pool_for(server) as pool:
        assert get(pool, read_s=0.5)[2] == b"0123456789"  # 1 s in all, each silence short: complete

    def silent(conn: socket.socket) -> None:
        time.sleep(1.5)

    with Scripted([silent]) as server, pool_for(server) as pool:
        started = time.monotonic()
        with pytest.raises(RunnerTimeout):
            get(pool, read_s=0.3)
        assert time.monotonic() - started < 1.2


def test_close_drops_idle_connections_and_busy_ones_when_they_come_back() -> None:
    with Scripted([OK, OK], [OK, OK]) as server, pool_for(server) as pool:
        get(pool)
        data = wire.encode_request("GET", "/x", {"host": "h"}, None)
        busy = wire.request(pool, "GET", data, read_s=2.0)
        pool.close()
        busy.read_all(10)
        busy.release()
        assert pool._idle == []


class _Request:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.done = True


@settings(max_examples=300 * (100 if os.environ.get("RUNNER_MW_FUZZ_LONG") == "1" else 1), deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=12), max_size=4),
       st.one_of(st.none(), st.binary(max_size=16)))
def test_an_encoded_request_is_refused_or_parses_back_to_exactly_what_was_given(
        extra: dict[str, str], body: bytes | None) -> None:
    headers = {"host": "runner", **extra}
    try:
        data = wire.encode_request("POST", "/v1/execute", headers, body)
    except ValueError:
        return
    # llhttp, strict, as a server would read it: one request, the same header lines, no more.
    got = _Request()
    httptools.HttpRequestParser(got).feed_data(data)
    assert got.done or body is None
    # Values compared without surrounding whitespace (RFC 9110's OWS, not part of a value):
    # llhttp drops it before a value but keeps a trailing HTAB.
    sent = [(n.decode("latin-1"), v.decode("latin-1").strip(" \t")) for n, v in got.headers]
    expected = [(n, v.strip(" \t")) for n, v in headers.items()]
    if body is not None:
        expected.append(("content-length", str(len(body))))
    assert sent == expected


# -------------------------------------------------------------------------- review findings


class _Later:
    """A step: the reply, then (once the client had it) stray bytes on the same connection."""

    def __init__(self, reply: bytes, stray: bytes) -> None:
        self.reply, self.stray = reply, stray
        self.sent = False

    def __call__(self, conn: socket.socket) -> None:
        conn.sendall(self.reply)
        time.sleep(0.05)
        conn.sendall(self.stray)
        self.sent = True


@pytest.mark.parametrize(("method", "reply"), [
    ("GET", OK),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\n"),
    ("GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
    ("HEAD", b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"),
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000),
], ids=["second-reply", "head-body-late", "304-body-late", "1xx", "chunked", "head-1xx", "204",
        "two-pieces"])
def test_bytes_that_arrive_after_a_reply_never_become_the_next_requests_reply(method: str,
                                                                              reply: bytes) -> None:
    late = _Later(reply, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    with Scripted([late, OK], [OK]) as server, pool_for(server) as pool:
        get(pool, method)
        wait_until(lambda: late.sent, what="stray bytes sent")
        time.sleep(0.05)  # let them arrive
        assert get(pool)[2] == b"hi"
        assert server.connections == 2


def test_a_connection_whose_reply_was_followed_by_junk_is_not_kept() -> None:
    # The body handed out in pieces, then its last chunk and a second reply in one segment:
    # the parse fails ("data after the reply") after the reply itself was complete.
    data = b"x" * (wire.CHUNK - 8)  # with its chunk line: exactly the first piece

    def step(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.1)
        conn.sendall(b"%x\r\n" % len(data) + data + b"\r\n")
        time.sleep(0.1)
        conn.sendall(b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")

    with Scripted([step, OK], [OK]) as server, pool_for(server) as pool:
        with pytest.raises(BadGateway):
            get(pool)
        assert get(pool)[2] == b"hi"
        assert server.connections == 2, "an out-of-step connection went back to the pool"


def test_a_late_head_does_not_shorten_the_silence_allowed_in_the_body() -> None:
    def late(conn: socket.socket) -> None:
        time.sleep(0.6)  # the head near the end of its read_s, in two reads
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        time.sleep(0.05)
        conn.sendall(b"Content-Length: 4\r\n\r\nab")
        time.sleep(0.6)  # a silence longer than what was left of the head's read_s
        conn.sendall(b"cd")

    with Scripted([late]) as server, pool_for(server) as pool:
        assert get(pool, read_s=1.0)[2] == b"abcd"


def test_total_s_bounds_sending_to_a_runner_that_reads_slowly() -> None:
    body = b"x" * (16 * 1024 * 1024)  # well over what loopback socket buffers hold

    def slow_reader(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and conn.recv(16 * 1024):
            time.sleep(0.01)  # steady progress: every send of the client moves a little

    with Scripted() as server, pool_for(server) as pool:
        server.serve = slow_reader  # type: ignore[method-assign]
        started = time.monotonic()
        with pytest.raises(RunnerTimeout):
            get(pool, "POST", body=body, read_s=1.0, total_s=1.0)
        assert time.monotonic() - started < 3.0


def _drip_head(conn: socket.socket) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 40 + b"\r\nContent-Length: 2\r\n\r\nhi"
    for i in range(len(head)):
        conn.sendall(head[i:i + 1])
        time.sleep(0.05)


def test_a_head_dripped_slower_than_read_s_in_all_is_a_timeout_even_for_assets() -> None:
    # Each silence is 0.05 s, far under read_s; the whole head would take ~4 s.
    with Scripted([_drip_head]) as server, pool_for(server) as pool:
        started = time.monotonic()
        with pytest.raises(RunnerTimeout):
            get(pool, read_s=0.8)  # an asset fetch: no total deadline, the head has one
        assert time.monotonic() - started < 2.0


def test_over_tls_stray_bytes_in_the_last_record_are_never_the_next_reply(
        self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    body = b"x" * wire.CHUNK

    served = {"n": 0}

    def serve(conn: socket.socket) -> None:
        served["n"] += 1
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            if served["n"] == 1:
                _read_request(tls)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                time.sleep(0.1)
                tls.sendall(body[:100])  # a record of its own: the reads end on the body's end
                # The body's last bytes and a stray reply in one TLS record: once decrypted, the
                # stray part waits inside the SSL object, where poll() does not see it.
                tls.sendall(body[100:] + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
            if _read_request(tls) is not None:
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")

    with Scripted() as server:
        server.serve = serve  # type: ignore[method-assign]
        pool = wire.Pool("127.0.0.1", server.port, tls=ssl.create_default_context(cafile=str(cert)),
                         maxsize=1, wait_s=1.0, connect_s=2.0)
        try:
            assert get(pool)[2] == body
            time.sleep(0.1)
            assert get(pool)[2] == b"hi"  # from a new connection, never "evil"
            assert served["n"] == 2
        finally:
            pool.close()


def test_over_tls_a_body_cut_without_close_notify_is_not_complete(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    def truncated(conn: socket.socket) -> None:
        tls = server_ctx.wrap_socket(conn, server_side=True)
        _read_request(tls)
        tls.sendall(b"HTTP/1.1 200 OK\r\n\r\npart-of-a-long-bo")  # framed by the close
        tls.shutdown(socket.SHUT_RDWR)  # drops the TLS layer first: a bare TCP close, no close_notify
        tls.close()

    with Scripted() as server:
        server.serve = truncated  # type: ignore[method-assign]
        pool = wire.Pool("127.0.0.1", server.port, tls=ssl.create_default_context(cafile=str(cert)),
                         maxsize=1, wait_s=1.0, connect_s=2.0)
        try:
            with pytest.raises(BadGateway):
                get(pool)
        finally:
            pool.close()


@pytest.mark.parametrize(("method", "target"), [
    ("GET", "/a?\x00"), ("GET", "/a?\x0bb"), ("GET", "/a?\tb"), ("GET", "/a?\x7f"), ("GET", "/a?\xe9"),
    ("GET", "a"), ("get", "/a"), ("GET /x HTTP/1.1\r\n", "/a"), ("", "/a"),
])
def test_request_lines_that_a_lenient_runner_might_read_otherwise_are_refused(method: str,
                                                                              target: str) -> None:
    with pytest.raises(ValueError):
        wire.encode_request(method, target, {"host": "h"}, None)


def test_over_tls_an_idle_connection_is_checked_where_select_has_no_poll(
        self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # eventlet's monkey-patching removes select.poll: every reuse of a TLS connection raised
    # AttributeError (and the connection was dropped unclosed). select.select answers instead.
    cert, key = self_signed
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    served = {"n": 0}

    def serve(conn: socket.socket) -> None:
        served["n"] += 1
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            while _read_request(tls) is not None:
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")

    monkeypatch.delattr(select, "poll")
    with Scripted() as server:
        server.serve = serve  # type: ignore[method-assign]
        pool = wire.Pool("127.0.0.1", server.port, tls=ssl.create_default_context(cafile=str(cert)),
                         maxsize=1, wait_s=1.0, connect_s=2.0)
        try:
            assert [get(pool)[2] for _ in range(3)] == [b"hi"] * 3
            assert served["n"] == 1  # one connection, reused
        finally:
            pool.close()


def test_a_put_from_a_finalizer_inside_get_does_not_wait_on_the_same_thread() -> None:
    # A body never closed by its server gives its connection back when it is collected; the
    # collector may run that on a thread inside get() (the slot wait allocates), which held
    # the pool's plain lock: put() waited on its own thread for good, and so did every request
    # after it (a review reproduced it with a cyclic body and a low collection threshold).
    with Scripted([OK, OK]) as server, pool_for(server) as pool:
        conn, _ = pool.get()
        done: list[bool] = []

        def reentered() -> None:
            with pool._lock:  # as inside get(), on this thread
                pool.put(conn, True)  # what the finalizer calls
                done.append(True)

        worker = threading.Thread(target=reentered, daemon=True)
        worker.start()
        worker.join(30)
        assert done == [True], "put() waited on a lock its own thread held"
        assert get(pool)[2] == b"hi"  # the slot and the connection are back
