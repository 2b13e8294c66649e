"""``bound_sends``: a write deadline on the client's socket, on real loopback sockets."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from mwfixtures import wait_until

from runner_mw.clientsock import _watchdog, bound_sends


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(server side, client side) of one loopback TCP connection; the client never reads."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # full sooner
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    with server, client:
        yield server, client


def send_timeout(sock: socket.socket) -> float:
    sec, usec = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16))
    return sec + usec / 1e6


def test_a_write_the_client_does_not_take_fails_after_the_deadline(
        pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    deadline = bound_sends({"gunicorn.socket": server, "SERVER_PROTOCOL": "HTTP/1.1"}, 0.3)
    assert deadline is not None
    assert send_timeout(server) == pytest.approx(0.3)
    started = time.monotonic()
    with pytest.raises(BlockingIOError):  # what a blocking socket's send says on SO_SNDTIMEO
        for _ in range(10_000):  # 640 MB: far beyond any socket buffer
            server.sendall(b"x" * 65536)
    assert time.monotonic() - started < 30
    deadline()
    assert send_timeout(server) == 0  # back to gunicorn's "never": the connection may serve more


def test_the_previous_setting_is_what_comes_back(pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 7, 0))
    deadline = bound_sends({"gunicorn.socket": server, "SERVER_PROTOCOL": "HTTP/1.0"}, 2.5)
    assert deadline is not None and send_timeout(server) == pytest.approx(2.5)
    deadline()
    assert send_timeout(server) == 7


def test_nothing_is_touched_where_the_socket_is_not_one_requests_own(
        pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    assert bound_sends({"SERVER_PROTOCOL": "HTTP/1.1"}, 1) is None  # not gunicorn
    assert bound_sends({"gunicorn.socket": object(), "SERVER_PROTOCOL": "HTTP/1.1"}, 1) is None
    # HTTP/2 multiplexes every stream over one socket: a deadline there is every stream's.
    assert bound_sends({"gunicorn.socket": server, "SERVER_PROTOCOL": "HTTP/2.0"}, 1) is None
    assert send_timeout(server) == 0


def test_a_socket_already_closed_is_left_alone() -> None:
    sock = socket.socket()
    sock.close()
    assert bound_sends({"gunicorn.socket": sock, "SERVER_PROTOCOL": "HTTP/1.1"}, 1) is None


def test_restoring_after_the_client_is_gone_does_not_raise(
        pair: tuple[socket.socket, socket.socket]) -> None:
    server, _ = pair
    deadline = bound_sends({"gunicorn.socket": server, "SERVER_PROTOCOL": "HTTP/1.1"}, 1)
    assert deadline is not None
    server.close()  # gunicorn closes a connection whose write failed before the body's close()
    deadline()


def fill(sock: socket.socket) -> None:
    """Write until the kernel takes nothing more (the peer does not read)."""
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"x" * 65536)
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)


@pytest.fixture
def watched(pair: tuple[socket.socket, socket.socket]) -> tuple[socket.socket, Callable[[], None]]:
    """The server side watched with a 0.3 s deadline, its send buffer full; and the stop."""
    server, _ = pair
    stop = _watchdog.watch(server, 0.3)
    assert stop is not None
    fill(server)
    return server, stop


def test_the_watchdog_shuts_down_a_socket_whose_client_takes_nothing(
        watched: tuple[socket.socket, Callable[[], None]]) -> None:
    # What bound_sends uses under TLS (where SO_SNDTIMEO cannot end a blocking SSL write).
    server, stop = watched
    started = time.monotonic()
    with pytest.raises(OSError):  # EPIPE once shut down: the blocked write fails
        for _ in range(10_000):
            server.sendall(b"x" * 65536)
    assert time.monotonic() - started < 30
    stop()


def test_the_watchdog_leaves_a_socket_alone_once_its_body_ended(
        watched: tuple[socket.socket, Callable[[], None]]) -> None:
    server, stop = watched
    stop()  # the body ended: the connection may serve the next request
    time.sleep(1.0)
    info = server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    assert info[0] == 1  # TCP_ESTABLISHED: never shut down (that would be FIN_WAIT1)


def test_the_watchdog_thread_ends_with_its_last_socket_and_the_next_starts_one(
        pair: tuple[socket.socket, socket.socket]) -> None:
    # No thread waits on a Condition while nothing is watched (an unpatched Condition made at
    # import fails under eventlet): the thread ends, and the next watch starts another.
    def running() -> bool:
        return any(t.name == "runner_mw-send-deadline" and t.is_alive() for t in threading.enumerate())

    server, _ = pair
    stop = _watchdog.watch(server, 0.3)
    assert stop is not None and running()
    stop()
    wait_until(lambda: not running(), what="the watchdog thread to end")
    again = _watchdog.watch(server, 0.3)
    assert again is not None and running()
    again()


def test_a_restore_from_a_finalizer_inside_watch_does_not_wait_on_the_same_thread(
        pair: tuple[socket.socket, socket.socket]) -> None:
    # restore() runs from a streamed body's __del__, which the collector may run on a thread
    # inside watch() (it allocates under the lock): with a plain lock, that thread waited on
    # itself, and every later watch() and restore() of the process after it.
    server, _ = pair
    stop = _watchdog.watch(server, 0.3)
    assert stop is not None
    done: list[bool] = []

    def reentered() -> None:
        with _watchdog._lock:  # as inside watch(), on this thread
            stop()
            done.append(True)

    worker = threading.Thread(target=reentered, daemon=True)
    worker.start()
    worker.join(30)
    assert done == [True], "restore() waited on a lock its own thread held"
