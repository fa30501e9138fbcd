"""A retrain run's row: the single-flight claim, the heartbeat, failing it, and recovering stale ones.

At most one `running` retrain_run row exists (a unique index the database enforces), whichever process
started it; whatever does the run's work renews its heartbeat, and the scheduler's leader fails a run whose
heartbeat went stale.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.db import error_line, utcnow
from core.metrics import Metrics
from core.schema import ModelStatus, ModelVersion, RetrainRun, RunStatus, Trigger
from retrain import RETRAIN_LOGGER

log = logging.getLogger(RETRAIN_LOGGER)


class RunInProgress(Exception):
    """Another retrain run holds the single-flight slot."""

    def __init__(self, run_id: int | None) -> None:
        super().__init__(f"retrain run {run_id} is already running")
        self.run_id = run_id


class NoChampion(Exception):
    """A retrain run needs a champion to train from and to gate against, and there is none."""

    def __init__(self) -> None:
        super().__init__("no champion to retrain against: run `driftloop bootstrap` (or promote a version)")


def start_run(
    sessions: sessionmaker[Session],
    *,
    trigger: str,
    reason: str = "",
    report_id: int | None = None,
    now: datetime,
) -> int:
    """Insert the `running` row and return its id; RunInProgress if one is running (any process)."""
    trigger = Trigger(trigger).value
    champion = select(ModelVersion.version).where(ModelVersion.status == ModelStatus.champion)
    row: dict[str, Any] = {
        "trigger": trigger,
        "status": RunStatus.running.value,
        "reason": reason,
        "report_id": report_id,
        "champion_version": champion.scalar_subquery(),  # read and insert in one statement
        "metrics": {},
        "steps": {},
        "pid": os.getpid(),
        "started_at": now,
        "heartbeat_at": now,
    }
    for _ in range(3):  # the running run may finish between our insert and our look-up: try again
        try:
            with sessions.begin() as session:
                inserted = session.execute(insert(RetrainRun).values(**row).returning(RetrainRun.id))
                return int(inserted.scalar_one())
        except IntegrityError:
            with sessions() as session:
                running = session.scalar(select(RetrainRun.id).where(RetrainRun.status == RunStatus.running))
            if running is not None:
                raise RunInProgress(running) from None
    raise RunInProgress(None)


def recover_stale(
    sessions: sessionmaker[Session], *, now: datetime, stale_after_s: float, max_run_s: float
) -> list[int]:
    """Mark failed every `running` run whose process died or that outlived any allowed run time.

    Dead: its heartbeat (or start, before the first beat) is older than `stale_after_s` — the process doing
    a run renews it (see `Heartbeat`) wherever it runs, so a run an API replica started is left alone while
    that replica's child lives. Outlived: started more than `max_run_s` ago — a hung child whose parent,
    the one enforcing the timeout, died. One UPDATE … RETURNING, so a beat that lands meanwhile wins.
    """
    alive_at = func.coalesce(RetrainRun.heartbeat_at, RetrainRun.started_at)
    dead = alive_at < now - timedelta(seconds=stale_after_s)
    outlived = RetrainRun.started_at < now - timedelta(seconds=max_run_s)
    with sessions.begin() as session:
        failed = session.execute(
            update(RetrainRun)
            .where(RetrainRun.status == RunStatus.running, dead | outlived)
            .values(
                status=RunStatus.failed,
                error=case(
                    (dead, f"no heartbeat for over {stale_after_s:g} s: its process died"),
                    else_=f"still running after {max_run_s:g} s, past any timeout: its process hung",
                ),
                finished_at=now,
            )
            .returning(RetrainRun.id)
        )
        return sorted(failed.scalars())


class Heartbeat:
    """Renews a run's heartbeat at once and then every `interval_s` from a daemon thread, while the `with`
    block runs.

    `on_lost` is called (from that thread) when two beats in a row find the run no longer `running`: another
    process ended it, as the scheduler leader does a run that outlived any timeout once its launcher, the one
    enforcing the timeout, is gone. Its work can no longer be recorded, so the child stops rather than train
    on for nothing. One such beat may follow the run's own finish before the `with` block ends; two cannot.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        run_id: int,
        *,
        interval_s: float,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._sessions, self._run_id, self._interval_s = sessions, run_id, interval_s
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"retrain-heartbeat-{run_id}", daemon=True)
        self._failing = False  # the last beat failed; logged once, when it began
        self._lost_beats = 0  # beats in a row that found the run no longer running

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._beat()

    def _beat(self) -> None:
        try:
            with self._sessions.begin() as session:
                renewed = session.execute(
                    update(RetrainRun)
                    .where(RetrainRun.id == self._run_id, RetrainRun.status == RunStatus.running)
                    .values(heartbeat_at=utcnow())
                ).rowcount  # type: ignore[attr-defined]
        except Exception as exc:  # the database may be briefly away; the next beat tries again
            if not self._failing:  # once per outage: a traceback every beat buried the run's own log
                log.warning(
                    "retrain run %s: heartbeat failed (%s); retrying every %g s, logged again when it beats",
                    self._run_id, error_line(exc), self._interval_s,
                )  # fmt: skip
            self._failing = True
        else:
            if self._failing:
                log.info("retrain run %s: heartbeat renewed again", self._run_id)
            self._failing = False
            self._lost_beats = 0 if renewed else self._lost_beats + 1
            if self._lost_beats == 2 and self._on_lost is not None and not self._stop.is_set():
                self._on_lost()


def started_since(sessions: sessionmaker[Session], *, trigger: str, since: datetime) -> bool:
    """Whether a run with this trigger started after `since`, in any process."""
    with sessions() as session:
        found = session.scalar(
            select(RetrainRun.id)
            .where(RetrainRun.trigger == Trigger(trigger).value, RetrainRun.started_at > since)
            .limit(1)
        )
    return found is not None


def fail_run(sessions: sessionmaker[Session], run_id: int, *, error: str, now: datetime) -> bool:
    """Mark the run failed if it is still running; False when it had already finished."""
    with sessions.begin() as session:
        result = session.execute(
            update(RetrainRun)
            .where(RetrainRun.id == run_id, RetrainRun.status == RunStatus.running)
            .values(status=RunStatus.failed, error=error, finished_at=now)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]


def observe_run(metrics: Metrics, sessions: sessionmaker[Session], run_id: int) -> None:
    """Count a finished run in the Prometheus metrics (and clear the running gauge)."""
    with sessions() as session:
        run = session.get(RetrainRun, run_id)
    metrics.retrain_running.set(0)
    if run is not None:
        count_run(metrics, run)


def count_run(metrics: Metrics, run: RetrainRun) -> None:
    """Count a finished run in driftloop_retrain_runs_total: by its launcher, or by the scheduler leader
    that announces it when the launcher is gone (else no process counts it, and RetrainFailed never fires)."""
    if run.status == RunStatus.running:
        return
    metrics.retrain_runs.labels(trigger=run.trigger, status=run.status).inc()
    metrics.retrain_last_finished.set((run.finished_at or utcnow()).timestamp())
