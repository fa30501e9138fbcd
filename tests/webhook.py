"""A real webhook receiver on loopback: the far side of driftloop's notifications, for tests."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TRICKLE = -1  # next_answer's status for a trickled answer
TRICKLE_BYTES = 300
TRICKLE_EVERY_S = 0.1


@dataclass
class Receiver:
    """Answers POSTs with the scripted statuses (then 200); `hang` requests get no answer until released,
    and `trickle` requests a 200 whose body comes a byte every TRICKLE_EVERY_S, for TRICKLE_BYTES bytes.

    `bodies` and `keys` hold every POST received, answered or not; `kinds()` only the delivered ones.
    """

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    hang: int = 0
    trickle: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    answers: list[int | None] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def attempts(self) -> int:
        return len(self.bodies)

    def kinds(self) -> list[str]:
        """The `kind` of each notification answered with a 2xx, in arrival order."""
        with self.lock:
            pairs = list(zip(self.bodies, self.answers, strict=True))
        return [body["kind"] for body, status in pairs if status is not None and status < 300]

    def next_answer(self, body: dict[str, Any], key: str) -> int | None:
        with self.lock:
            if self.trickle:
                self.trickle -= 1
                status = TRICKLE
            elif self.hang:
                self.hang -= 1
                status = None
            else:
                status = self.statuses.pop(0) if self.statuses else 200
            self.bodies.append(body)
            self.keys.append(key)
            self.answers.append(status)
            return status


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status = self.server.receiver.next_answer(body, self.headers.get("Idempotency-Key", ""))
        if status is None:
            self.server.receiver.release.wait(10)
            self.close_connection = True
            return
        if status == TRICKLE:  # every byte well within a read timeout, the whole answer far beyond it
            self.send_response(200)
            self.send_header("Content-Length", str(TRICKLE_BYTES))
            self.end_headers()
            for _ in range(TRICKLE_BYTES):
                if self.server.receiver.release.wait(TRICKLE_EVERY_S):
                    break
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:  # the client gave up on it
                    break
            self.close_connection = True
            return
        text = b"ok" if status < 300 else b"boom"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins handler threads

    def __init__(self, receiver: Receiver) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.receiver = receiver


@contextmanager
def running_receiver(**script: Any) -> Iterator[Receiver]:
    """A receiver listening on a free loopback port until the block ends; `script` sets statuses/hang."""
    receiver = Receiver(**script)
    server = _Server(receiver)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver")
    thread.start()
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()
        thread.join()
