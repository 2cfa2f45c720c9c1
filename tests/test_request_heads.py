"""Slow and oversized request heads are cut by `serai serve` itself, with no proxy in front
(docs/security.md, "Nothing leaks, nothing floods"): a client sending headers a byte at a time
is answered 408 and disconnected after `header_timeout_s`, one sending a megabyte of headers
gets 431 once it passes `max_header_bytes`, and other clients are served all the while.

A real `serai serve` (no embedded model, a 1 s header timeout) on an ephemeral port, driven by
raw sockets.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import LiveServer, start_server, stop_server

HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("heads")
    served = start_server(root / "serai-data", extra_env={
        "SERAI_EMBEDDED": "false", "SERAI_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "SERAI_PROBE_INTERVAL_S": "0"})
    yield served
    stop_server(served)
    shutil.rmtree(root, ignore_errors=True)


def _connect(server: LiveServer) -> socket.socket:
    address = urlsplit(server.base_url)
    assert address.hostname is not None and address.port is not None
    return socket.create_connection((address.hostname, address.port), timeout=5)


def _read_until_closed(sock: socket.socket, *, within_s: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(within_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def _trickle(server: LiveServer, start: bytes) -> tuple[bytes, float]:
    """Send `start`, then one more byte of a header every 0.1 s, never ending the head; what the
    server answered and the seconds until it closed the connection."""
    began = time.monotonic()
    with _connect(server) as sock:
        sock.sendall(start)
        sock.settimeout(0.1)
        received = b""
        while time.monotonic() - began < 4 * HEADER_TIMEOUT_S + 5:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b"x")
                except OSError:
                    break
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - began


def _served_while(server: LiveServer, slow: Future[tuple[bytes, float]]) -> int:
    """Other clients' requests, one after another until `slow` is done (one at least): each
    must be served. Returns how many were."""
    served = 0
    with httpx.Client(base_url=server.base_url, timeout=5,
                      headers={"authorization": f"Bearer {server.admin_key}"}) as other:
        while not served or not slow.done():
            answer = other.get("/v1/models")
            assert answer.status_code == 200, answer.text
            served += 1
            time.sleep(0.05)
    return served


def _answer(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def _alongside(server: LiveServer, client: Callable[[], tuple[bytes, float]]
               ) -> tuple[bytes, float, int]:
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client)
        served = _served_while(server, slow)
        received, seconds = slow.result()
    return received, seconds, served


def test_a_head_sent_byte_by_byte_is_cut_after_the_timeout(server: LiveServer) -> None:
    received, seconds, served = _alongside(server, lambda: _trickle(
        server, b"GET /v1/models HTTP/1.1\r\nhost: serai\r\nx-slow: "))
    assert HEADER_TIMEOUT_S <= seconds < HEADER_TIMEOUT_S + 2.5
    status, body = _answer(received)
    assert status == 408 and body["error"]["code"] == "header_timeout"  # type: ignore[index]
    assert served >= 3  # others were answered while it trickled

    # A connection that never sends a byte is closed too, without an answer.
    with _connect(server) as idle:
        began = time.monotonic()
        assert _read_until_closed(idle) == b""
        assert HEADER_TIMEOUT_S <= time.monotonic() - began < HEADER_TIMEOUT_S + 2.5


def test_the_clock_restarts_for_each_request_of_a_kept_alive_connection(
        server: LiveServer) -> None:
    """The timeout bounds each head, not the connection: requests whose heads arrive in time
    keep one connection for longer than the timeout."""
    with httpx.Client(base_url=server.base_url, timeout=5,
                      headers={"authorization": f"Bearer {server.admin_key}"}) as client:
        began = time.monotonic()
        while time.monotonic() - began < 2.5 * HEADER_TIMEOUT_S:
            assert client.get("/v1/models").status_code == 200
            time.sleep(0.3)
        # One connection all along (httpx keeps it): it was never cut between requests.
        assert client.get("/health").status_code == 200


def _oversized(server: LiveServer, path: str) -> tuple[bytes, float]:
    """A request line for `path` and then a megabyte of headers, without their end."""
    began = time.monotonic()
    with _connect(server) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nhost: serai\r\n".encode())
        try:
            for n in range(128):  # 128 headers of 8 KiB: a megabyte
                sock.sendall(f"x-padding-{n}: ".encode() + b"x" * 8192 + b"\r\n")
        except OSError:
            pass  # the server stopped reading: what it answered is read below
        received = _read_until_closed(sock)
    return received, time.monotonic() - began


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_megabyte_of_headers_is_refused_at_the_limit(server: LiveServer, path: str) -> None:
    received, seconds, served = _alongside(server, lambda: _oversized(server, path))
    status, body = _answer(received)
    assert status == 431 and seconds < 3
    error: dict[str, object] = body["error"]  # type: ignore[assignment]
    if path == "/v1/messages":  # in the client's own error format
        assert body["type"] == "error" and error["type"] == "invalid_request_error"
    else:
        assert error["code"] == "headers_too_large"
    assert "SERAI_MAX_HEADER_BYTES" in str(error["message"])
    assert served >= 1
