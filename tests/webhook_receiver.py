"""A real webhook receiver on 127.0.0.1 for the tests: it records each request (headers, body)
and answers from a script of statuses (the last one repeats); `hold` makes it keep a request
open (no answer) until released, as a target that hangs does."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    def __init__(self, statuses: list[int] | None = None, *, location: str | None = None):
        self.statuses = list(statuses or [200])
        self.location = location  # sent with 3xx answers
        self.requests: list[Received] = []
        self.arrived = threading.Condition()
        self.hold_first = threading.Event()  # set: the first request is held open until release()
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.arrived:
                    receiver.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    n = len(receiver.requests)
                    receiver.arrived.notify_all()
                if n == 1 and receiver.hold_first.is_set():
                    receiver.released.wait(60)
                    return
                status = receiver.statuses[min(n - 1, len(receiver.statuses) - 1)]
                self.send_response(status)
                if receiver.location and 300 <= status < 400:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def wait(self, n: int, timeout: float = 30.0) -> list[Received]:
        """The first `n` requests, once they have arrived."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.requests) >= n, timeout):
                raise AssertionError(f"{len(self.requests)} of {n} webhook requests arrived in {timeout}s")
            return self.requests[:n]

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
