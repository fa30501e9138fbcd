"""The prediction logger's spool hand-off: rows the database cannot take go to the spool (counted), rows it
refuses are kept in the spool's rejected/ folder, and while the database is unavailable it is tried again
every `replay_interval_s` by replaying the oldest segment."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from core.db import error_line
from core.metrics import Metrics
from service.logtable import LogRow, LogTable, Row, from_doc, params, to_doc
from service.spool import Spool

log = logging.getLogger("driftloop.logger")


class SpoolHandoff:
    """The logger's side of the spool, and of the database's outages; `finish` is the logger's bookkeeping
    (settled queued rows, ids no longer pending)."""

    def __init__(
        self,
        spool: Spool,
        table: LogTable,
        metrics: Metrics,
        *,
        replay_interval_s: float,
        clock: Callable[[], float],
        finish: Callable[[int, list[str]], None],
    ) -> None:
        self._spool = spool
        self._table = table
        self._replay_interval_s = replay_interval_s
        self._clock = clock
        self._finish = finish
        self.next_db_attempt = float("-inf")
        self.degraded = False
        self.failing = False  # the last spool write failed: rows are being dropped
        self._spooled = metrics.logger_rows.labels(outcome="spooled")
        self._replayed = metrics.logger_rows.labels(outcome="replayed")
        self.dropped = metrics.logger_rows.labels(outcome="dropped")

    def replay_one(self) -> bool:
        """Replay the oldest segment in one transaction; True when it is gone from the spool."""
        segments = self._spool.segments()
        if not segments:
            return False
        segment = segments[0]
        try:
            docs = self._spool.read(segment)
        except OSError as exc:
            log.error("spool segment %s unreadable: %s", segment, exc)
            self.next_db_attempt = self._clock() + self._replay_interval_s
            return False
        rows: list[Row] = []
        refused: list[tuple[Any, Exception]] = []
        for doc in docs:
            try:
                rows.append(from_doc(doc))
            except (KeyError, TypeError, ValueError) as exc:
                refused.append((doc, exc))
        try:
            refused += self._table.insert_or_isolate(rows)
        except Exception as exc:
            self.degrade(exc)
            return False
        self.recovered()
        self.reject(refused)
        torn = self._spool.rows(segment) - len(docs)  # lines that never became rows; read() logged them
        self._spool.remove(segment)
        self._replayed.inc(len(docs) - len(refused))
        self.dropped.inc(max(0, torn))
        self._finish(0, [str(d.get("id")) for d in docs])
        return True

    def db_due(self) -> bool:
        return self._clock() >= self.next_db_attempt

    def degrade(self, exc: Exception) -> None:
        self.next_db_attempt = self._clock() + self._replay_interval_s
        if not self.degraded:
            self.degraded = True
            log.warning(
                "prediction log: database unavailable (%s); spooling to %s, retrying every %g s",
                error_line(exc),
                self._spool.directory,
                self._replay_interval_s,
            )

    def recovered(self) -> None:
        if self.degraded:
            self.degraded = False
            self.next_db_attempt = float("-inf")
            log.info("prediction log: database reachable; %d rows to replay", self._spool.pending_rows())

    def settle_on_spool(self, batch: list[LogRow]) -> None:
        self._finish(len(batch), self.to_spool([to_doc(params(r)) for r in batch]))

    def to_spool(self, docs: list[Row]) -> list[str]:
        """Store rows on the spool; returns the ids that could not be kept (counted dropped)."""
        if not docs:
            return []
        try:
            self._spool.append(docs)
        except (TypeError, ValueError) as exc:  # a row that is not JSON: keep the others
            if len(docs) > 1:
                return [pid for doc in docs for pid in self.to_spool([doc])]
            self.reject([(docs[0], exc)])
            return [str(docs[0].get("id"))]
        except Exception as exc:
            self.failing = True
            self.dropped.inc(len(docs))
            log.error("prediction log: DROPPED %d rows, the spool write failed: %s", len(docs), exc)
            return [str(d.get("id")) for d in docs]
        self.failing = False
        self._spooled.inc(len(docs))
        return []

    def reject(self, refused: list[tuple[Any, Exception]]) -> None:
        if not refused:
            return
        self.dropped.inc(len(refused))
        reason = f"{refused[0][1].__class__.__name__}: {refused[0][1]}"
        try:
            kept = str(self._spool.reject([row for row, _ in refused], reason))
        except Exception as exc:
            kept = f"nowhere ({exc})"
        log.error("prediction log: database refused %d rows, kept in %s: %s", len(refused), kept, reason)
