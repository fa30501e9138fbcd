"""A bounded HTTP/1.1 keep-alive load generator for loopback targets (asyncio streams, no client library).

Bounded in both count and time; it stops by itself. Used by bench/serve.py and by the burst tests.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np


@dataclass(slots=True)
class LoadResult:
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    seconds: float = 0.0
    stop_requested: bool = False  # set from another thread to end the load early

    def stop(self) -> None:
        self.stop_requested = True

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def failed(self) -> int:
        return self.sent - self.ok

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else float("nan")

    def prediction_ids(self) -> list[str]:
        return [json.loads(b)["prediction_id"] for b in self.bodies]


def _request(host: str, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return status, body


async def _worker(
    url: str,
    payloads: Sequence[bytes],
    result: LoadResult,
    budget: list[int],
    deadline: float,
    keep_bodies: bool,
) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    writer: asyncio.StreamWriter | None = None
    try:
        while budget[0] > 0 and time.perf_counter() < deadline and not result.stop_requested:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError as exc:  # the server is gone (shut down): this connection stops
                    result.errors.append(f"connect: {exc.__class__.__name__}")
                    return
            budget[0] -= 1
            payload = payloads[budget[0] % len(payloads)]
            start = time.perf_counter()
            result.sent += 1
            try:
                writer.write(_request(host, parts.path or "/", payload))
                await writer.drain()
                status, body = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                result.errors.append(f"{exc.__class__.__name__}: {exc}")
                writer.close()
                writer = None
                continue
            result.latencies_s.append(time.perf_counter() - start)
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if keep_bodies and status == 200:
                result.bodies.append(body)
    finally:
        if writer is not None:
            writer.close()


async def run_load_async(
    url: str,
    payloads: Sequence[bytes],
    *,
    total: int,
    concurrency: int = 16,
    max_seconds: float = 60.0,
    keep_bodies: bool = False,
    result: LoadResult | None = None,
) -> LoadResult:
    """`result` may be passed in to watch progress from another thread while the load runs."""
    result = result if result is not None else LoadResult()
    budget = [total]
    start = time.perf_counter()
    deadline = start + max_seconds
    await asyncio.gather(
        *(_worker(url, payloads, result, budget, deadline, keep_bodies) for _ in range(concurrency))
    )
    result.seconds = time.perf_counter() - start
    return result


def run_load(url: str, payloads: Sequence[bytes], **kwargs: Any) -> LoadResult:
    """Send at most `total` requests, for at most `max_seconds`, over `concurrency` keep-alive connections."""
    return asyncio.run(run_load_async(url, payloads, **kwargs))


def json_payloads(rows: Sequence[dict[str, Any]], encode: Callable[[Any], str] = json.dumps) -> list[bytes]:
    return [encode(row).encode() for row in rows]
