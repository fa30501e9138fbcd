"""The readiness check's look at the database, bounded in time: a hung database is named, not waited on."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine, text

_POLL_S = 0.01
# Under the readiness probe's own timeout (3 s in deploy/k8s), so /ready answers before the kubelet gives up.
TIMEOUT_S = 1.0


class DatabaseProbe:
    """`SELECT 1` on a thread of its own, waited for at most `timeout_s`.

    A server that accepts connections but never replies (frozen, a stalled disk, a network path that drops
    packets) would otherwise hold /ready, and the thread it runs on, until TCP gives up, which can take
    minutes: every replica would fail its readiness probe at once and stop serving predictions, which the
    spool keeps going through a database outage. At most one check is in flight; while it hangs, later
    calls report how long it has waited instead of starting another. The wait is asynchronous: requests
    hung on the database can hold every thread of the pool sync routes share, and /ready needs none.
    """

    def __init__(
        self, engine: Engine, *, timeout_s: float = TIMEOUT_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._engine = engine
        self._timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight: tuple[threading.Thread, float, list[str | None]] | None = None

    async def problem(self) -> str | None:
        """None when the database answered; else what is wrong with it, in one line."""
        with self._lock:
            if self._inflight is None or not self._inflight[0].is_alive():
                outcome: list[str | None] = []
                thread = threading.Thread(
                    target=self._check, args=(outcome,), name="ready-probe", daemon=True
                )
                thread.start()
                self._inflight = (thread, self._clock(), outcome)
            thread, started, outcome = self._inflight
        deadline = self._clock() + self._timeout_s
        while thread.is_alive() and self._clock() < deadline:
            await asyncio.sleep(_POLL_S)
        if thread.is_alive():
            return (
                f"database not answering: SELECT 1 has waited {self._clock() - started:.1f} s; predictions "
                "go to the spool if it stays so, labels and model operations wait or are refused"
            )
        return outcome[0] if outcome else None

    def _check(self, outcome: list[str | None]) -> None:
        try:
            with self._engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            outcome.append(
                f"database unreachable: {exc.__class__.__name__}; predictions go to the spool and are "
                "replayed when it answers, labels and model operations are refused"
            )
        else:
            outcome.append(None)
