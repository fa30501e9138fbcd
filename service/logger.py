"""The prediction logger: every answered prediction reaches prediction_log, batched off the request path.

`submit` only enqueues; one writer thread inserts batches (one executemany, one transaction). When the
database fails, the batch goes to the disk spool and later batches follow it there; every
`replay_interval_s` the writer tries the database again by replaying the oldest segment. Inserts are
idempotent (ON CONFLICT DO NOTHING), so a commit whose acknowledgement was lost, or a crash between
commit and segment removal, never duplicates a row. A full queue spills the row to the spool instead of
blocking or dropping it. A database write that has not returned for `stall_s` (a server that accepts
connections but does not reply gives no error for minutes) does not keep the queue in memory meanwhile: a
watchdog thread moves it to the spool every flush interval once the call has hung `stall_s`, so a process
killed then loses the batch the writer holds and at most `stall_s` of answers.

Counters: each submitted row is counted once as `logged` (inserted directly) or `spooled`; a spooled
row is later counted `replayed` once it is confirmed in the database. `dropped` counts rows the spool
could not store, torn spool lines, and rows the database refuses (kept in the spool's rejected/ folder).

The rows and their idempotent inserts are in service.logtable; the spool hand-off, the replay and the
database's outage state in service.handoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from core.metrics import Metrics
from service.handoff import SpoolHandoff
from service.logtable import LogRow, LogTable, params, to_doc
from service.spool import Spool

log = logging.getLogger("driftloop.logger")

# A database call running this long is taken as hung: the queue goes to the spool meanwhile. Well above a
# healthy batch insert (milliseconds), so a slow moment only costs a replay.
STALL_S = 5.0


class PredictionLogger:
    """Batched, loss-free writer of prediction_log rows; see the module docstring for the contract.

    Ids of spooled rows stay in memory (about 120 bytes each) until replayed, so `is_pending` can
    answer for them during an outage.
    """

    def __init__(
        self,
        engine_or_sessions: Engine | sessionmaker[Session],
        spool: Spool,
        metrics: Metrics,
        *,
        queue_size: int,
        batch_size: int,
        flush_interval_s: float,
        replay_interval_s: float,
        stall_s: float = STALL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` (monotonic seconds) times the database retries, the batch-fill deadline and stalls."""
        self._table = LogTable(engine_or_sessions, clock=clock)
        self._spool = spool
        # A deque, not queue.Queue: append is one atomic C call and wakes nobody. The writer wakes on its
        # flush interval or when a full batch is waiting, not once per row (that GIL ping-pong cost ~12 %).
        self._queue: deque[LogRow] = deque()
        self._queue_size = queue_size
        self._wake = threading.Event()
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: set[str] = set()  # submitted, not yet in the database
        self._enqueued = 0  # rows put on the queue; incremented in queue order, under _cond
        self._settled = 0  # queued rows the writer has put in the database or on the spool
        self._closed = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stall_s = stall_s
        self._inflight: list[LogRow] = []
        self._last_spill_warning = float("-inf")
        self._logged = metrics.logger_rows.labels(outcome="logged")
        self._handoff = SpoolHandoff(
            spool, self._table, metrics, replay_interval_s=replay_interval_s, clock=clock, finish=self._finish
        )
        metrics.logger_queue_depth.set_function(self.__len__)
        metrics.logger_spool_rows.set_function(spool.pending_rows)

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def spooled_pending(self) -> int:
        return self._spool.pending_rows()

    @property
    def losing_rows(self) -> bool:
        """The database was unreachable and the last spool write failed: answered rows are being dropped.
        Clears when a batch reaches the database or the spool again."""
        return self._handoff.degraded and self._handoff.failing

    def start(self) -> None:
        """Start the writer; it first replays any segments a previous process left on the spool."""
        if self._thread is not None:
            raise RuntimeError("PredictionLogger.start() called twice")
        self._spool.claim()  # raises SpoolInUse, naming the holder, if another process owns the directory
        if left := self._spool.pending_rows():
            log.info("prediction log: %d rows on the spool at %s from an earlier run; replaying", left,
                     self._spool.directory)  # fmt: skip
        self._thread = threading.Thread(target=self._run, name="prediction-logger", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="prediction-logger-watchdog", daemon=True)
        self._watchdog.start()

    def submit(self, row: LogRow) -> None:
        """Enqueue a row; never blocks on the database. A full queue spills it to the spool (slow, rare)."""
        with self._cond:
            self._pending.add(row.id)
            if not self._closed and len(self._queue) < self._queue_size:
                self._queue.append(row)
                self._enqueued += 1
                if len(self._queue) >= self._batch_size:
                    self._wake.set()
                return
        now = self._clock()
        if now - self._last_spill_warning > 10:
            self._last_spill_warning = now
            log.warning("prediction log queue full (%d rows): spilling to the spool", self._queue_size)
        self._finish(0, self._handoff.to_spool([to_doc(params(row))]))

    def flush(self, timeout: float) -> bool:
        """Wait until every row submitted before this call is in the database or on the spool."""
        with self._cond:
            target = self._enqueued
            return self._cond.wait_for(lambda: self._settled >= target, timeout)

    def is_pending(self, prediction_id: str) -> bool:
        """Submitted to this logger but not yet in the database (queued, being written, or spooled)."""
        with self._cond:
            return prediction_id in self._pending

    def wait_written(self, ids: Iterable[str], timeout: float) -> set[str]:
        """The `ids` still pending after waiting up to `timeout` s; an id never submitted is not pending."""
        wanted = set(ids)
        self._wake.set()  # someone is waiting: write the queue now, not at the end of the flush interval
        with self._cond:
            self._cond.wait_for(lambda: not wanted & self._pending, timeout)
            return wanted & self._pending

    def stop(self, timeout: float = 30) -> None:
        """Drain: when this returns, every submitted row is in the database or on the spool."""
        self._stopping.set()
        self._wake.set()
        if self._thread is None:
            self._run()  # never started: drain in the caller
        else:
            # A writer hung on the database would spend the orchestrator's whole grace period here: give up
            # on it as soon as its call counts as hung.
            deadline = time.monotonic() + timeout  # real time, as join's: an injected clock may stand still
            while self._thread.is_alive() and time.monotonic() < deadline and not self._stalled():
                self._thread.join(min(self._flush_interval_s, max(0.0, deadline - time.monotonic())))
            if self._thread.is_alive():
                log.error(
                    "prediction logger did not drain (%s); spooling what it holds",
                    "a database write hung" if self._stalled() else f"within {timeout:.1f} s",
                )
                self._handoff.settle_on_spool(self._inflight)
        if self._watchdog is not None:
            self._watchdog.join(timeout)
        with self._cond:
            self._closed = True  # from here on, submit() spills straight to the spool
        self._handoff.settle_on_spool(_drain(self._queue))
        if left := self._spool.pending_rows():
            # Only a process started on this directory replays them: a replica whose disk goes with it
            # (a deleted pod's emptyDir) loses them.
            log.warning(
                "prediction log: stopped with %d rows on the spool at %s, not in the database; a process "
                "started with this DRIFTLOOP_SPOOL_DIR replays them", left, self._spool.directory,
            )  # fmt: skip
        self._spool.release()

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                stopping = self._stopping.is_set()
                progressed = False
                if not stopping and self._handoff.db_due() and self._spool.pending_rows() > 0:
                    progressed = self._handoff.replay_one()
                batch = self._take(0 if stopping or progressed else self._idle_wait())
                if batch:
                    self._write(batch)
                    self._inflight = []
                elif stopping:
                    return
            except Exception:  # never let the writer die; count what it held instead of losing it silently
                lost, self._inflight = self._inflight, []
                self._handoff.dropped.inc(len(lost))
                self._finish(len(lost), [str(getattr(r, "id", "")) for r in lost])
                log.exception("prediction logger: unexpected error; DROPPED %d rows", len(lost))
                self._stopping.wait(self._flush_interval_s)

    def _stalled(self) -> bool:
        since = self._table.call_since
        return since is not None and self._clock() - since >= self._stall_s

    def _watch(self) -> None:
        """While a database call hangs, move the queue to the spool every flush interval."""
        warned_for: float | None = None
        while not self._stopping.wait(self._flush_interval_s):
            since = self._table.call_since
            if since is None or not self._stalled():
                continue
            if warned_for != since:
                warned_for = since
                log.warning(
                    "prediction log: a database write has not returned for %.0f s; spooling the queue to %s "
                    "meanwhile", self._clock() - since, self._spool.directory,
                )  # fmt: skip
            try:
                self._handoff.settle_on_spool(_drain(self._queue))
            except Exception:  # never let the watchdog die; the writer still holds the queue's rows
                log.exception("prediction logger watchdog: unexpected error")

    def _idle_wait(self) -> float:
        if self._handoff.degraded and self._spool.pending_rows() > 0:
            return max(0.0, min(self._flush_interval_s, self._handoff.next_db_attempt - self._clock()))
        return self._flush_interval_s

    def _take(self, wait: float) -> list[LogRow]:
        """Up to batch_size rows, after waiting at most `wait` s for a full batch to build up."""
        if wait > 0 and len(self._queue) < self._batch_size and not self._stopping.is_set():
            self._wake.wait(wait)
        self._wake.clear()
        batch: list[LogRow] = []
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.popleft())
            except IndexError:
                break
        self._inflight = batch
        return batch

    def _write(self, batch: list[LogRow]) -> None:
        rows = [params(r) for r in batch]
        if self._handoff.db_due():
            try:
                refused = self._table.insert_or_isolate(rows)
            except Exception as exc:
                self._handoff.degrade(exc)
            else:
                self._handoff.recovered()
                self._handoff.reject(refused)
                self._logged.inc(len(rows) - len(refused))
                self._finish(len(batch), [r["id"] for r in rows])
                return
        self._handoff.settle_on_spool(batch)

    # --- bookkeeping ------------------------------------------------------------------

    def _finish(self, settled: int, gone: list[str]) -> None:
        """`settled` queued rows are written or spooled; ids in `gone` are in the database or lost."""
        with self._cond:
            self._settled += settled
            self._pending.difference_update(gone)
            self._cond.notify_all()


def _drain(q: deque[LogRow]) -> list[LogRow]:
    rows = []
    while True:
        try:
            rows.append(q.popleft())
        except IndexError:
            return rows
