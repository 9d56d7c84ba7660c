"""Stand-ins for the Hugging Face hub on 127.0.0.1, for the probe `lathe.model_source` makes before
it accepts a hub id (tests never reach the real hub): one that answers, one that refuses
connections, one that accepts them and never answers."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

import pytest


class StubHub:
    """An HTTP server that answers every request 200 and counts them."""

    def __init__(self) -> None:
        hub = self
        self.requests: list[tuple[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                hub.requests.append((self.command, self.path))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _answer

            def log_message(self, *args) -> None:  # noqa: ANN002 - quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ClosedPort:
    """A port bound and not listening: every connection is refused (and no one else gets the port)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


class SilentHub:
    """A port that accepts connections (the kernel's backlog) and never answers a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


Hub = TypeVar("Hub", StubHub, ClosedPort, SilentHub)


@contextmanager
def as_hf_endpoint(monkeypatch: pytest.MonkeyPatch, hub: Hub) -> Iterator[Hub]:
    """`hub` as HF_ENDPOINT (processes started meanwhile inherit it) for the block; closed after."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    try:
        yield hub
    finally:
        hub.close()
