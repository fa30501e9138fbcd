"""The loop: scheduled monitor runs, breach alerts and automatic retraining, under a DB-held lease."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.db import SQLITE_BUSY_TIMEOUT_S, Clock, error_line, unreachable, utcnow
from core.lease import current_holder, release, try_acquire
from core.metrics import Metrics
from core.registry import Registry
from core.schema import DriftReport, RetrainRun
from core.settings import Settings
from core.spec import FeatureSpec
from monitor import LOOP_LOGGER
from monitor.notify import (
    ATTEMPT_BOUND,
    WebhookNotifier,
    announce_finished_runs,
    breach_key,
    enqueue,
    enqueue_retrain_outcome,
    format_breach,
)
from monitor.verdict import Monitor, MonitorOutcome, Verdict, log_outcome
from retrain.process import RunHandle, launch
from retrain.runs import NoChampion, RunInProgress, count_run, recover_stale, started_since

log = logging.getLogger(LOOP_LOGGER)
LEASE_NAME = "driftloop.scheduler"
# Held by the process doing a monitor run, across processes; left by a process that died mid-run, it is taken
# over once expired. Longer than any run: Evidently samples the window to DRIFTLOOP_EVIDENTLY_MAX_ROWS.
MONITOR_LEASE = "driftloop.monitor"
MONITOR_LEASE_TTL_S = 600.0
DELIVERY_INTERVAL_S = 2.0
# A run's process beats every lease TTL / 3; it is taken for dead after this many TTLs without a beat (nine
# beats: a database failover of tens of seconds must not fail a healthy run), or once it has run this long
# past the retrain timeout (a hung child whose parent, which enforces the timeout, died).
HEARTBEATS_MISSED = 3
RUN_GRACE_S = 300
# The leader announces runs nobody announced (their launcher exited first) if they ended this recently.
ANNOUNCE_HORIZON = timedelta(days=1)
ANNOUNCE_POLL_S = 0.5  # how soon a waiting announcer notices stop()


def schedule_check_s(period_s: int) -> float:
    """How often the leader looks whether a scheduled retrain is due: a tenth of the period, at least every
    second and at most every minute, so a run comes at most that late. The cadence is kept in the database,
    so a worker restart or a standby taking over neither resets it nor adds a run."""
    return min(max(period_s / 10, 1.0), 60.0)


class MonitorBusy(Exception):
    """A monitor run is already going, in this process or another on the database (an API replica's
    POST /monitor/run, the worker's scheduled run, `driftloop monitor`): a second over the same window would
    only double the work (Evidently's seconds of CPU, beside the request path), count one breach twice and,
    not seeing the other's report, open a second breach episode with an alert of its own."""


@dataclass(slots=True)
class Loop:
    """Monitor + policy + alerts + retrain launching. `start()` schedules it; methods also run on demand."""

    settings: Settings
    spec: FeatureSpec
    sessions: sessionmaker[Session]
    registry: Registry
    metrics: Metrics
    clock: Clock = utcnow
    holder_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid4().hex[:6]}")
    leader: bool = False
    _standby: bool = False  # the lease is another process's, and this one has said so in its log
    # Runs a retrain and returns its run id; None: a child OS process via `launch_retrain`. The backtest
    # passes one that runs in-process on its simulated clock.
    launcher: Callable[..., int] | None = None
    # The Evidently page of each report, and pruning old ones (DRIFTLOOP_REPORT_HTML_KEEP); the backtest
    # skips both.
    write_html: bool = True
    # Nobody scrapes this process's metrics (a CLI command): a run it launched is left to the scheduler
    # leader to announce and count, while one holds the lease, so RetrainFailed sees it.
    unscraped: bool = False
    _scheduler: BackgroundScheduler | None = None
    _monitor: Monitor = field(init=False)  # measures, decides and stores each run's report
    _notifier: WebhookNotifier | None = None
    _watchers: list[threading.Thread] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _monitoring: threading.Lock = field(default_factory=threading.Lock)  # one monitor run at a time
    # Scheduled jobs whose last attempt found the database unreachable: logged once per outage, not per try.
    _unreachable: set[str] = field(default_factory=set)
    # Why the last check found a scheduled retrain held: said once, not at each minute's check.
    _schedule_held: str | None = None

    def __post_init__(self) -> None:
        self._monitor = Monitor(
            settings=self.settings, spec=self.spec, sessions=self.sessions, registry=self.registry,
            metrics=self.metrics, write_html=self.write_html,
        )  # fmt: skip

    # --- scheduling --------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        self._stopping.clear()
        self.metrics.monitor_interval.set(s.monitor_interval_s)
        self.metrics.drift_share_threshold.set(s.drift_share_threshold)
        self.metrics.drift_weighted_threshold.set(s.weighted_drift_threshold)
        scheduler = BackgroundScheduler(timezone=UTC)
        common: dict[str, Any] = {"max_instances": 1, "coalesce": True, "replace_existing": True}
        now = datetime.now(UTC)
        scheduler.add_job(self.renew_lease, "interval", seconds=s.lease_ttl_s / 3, id="lease.renew",
                          next_run_time=now, **common)  # fmt: skip
        scheduler.add_job(
            self._scheduled_monitor, "interval", seconds=s.monitor_interval_s, id="monitor.run", **common
        )
        scheduler.add_job(
            self.deliver, "interval", seconds=DELIVERY_INTERVAL_S, id="notify.deliver", **common
        )
        if s.scheduled_retrain_s is not None:
            scheduler.add_job(
                self.scheduled_retrain, "interval", seconds=schedule_check_s(s.scheduled_retrain_s),
                id="retrain.schedule", **common,
            )  # fmt: skip
        scheduler.start()
        self._scheduler = scheduler

    def stop(self) -> None:
        """Stop the scheduler and let each finished run's announcer finish; runs still going are left to
        the leader's sweep (`announce_finished_runs`). Call it before disposing of the database engine."""
        self._stopping.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        for watcher in self._watchers:
            # Its outbox write may wait out another writer's lock, then its delivery one webhook attempt.
            attempt_s = ATTEMPT_BOUND * self.settings.webhook_timeout_s
            watcher.join(timeout=SQLITE_BUSY_TIMEOUT_S + attempt_s + 5)
            if watcher.is_alive():
                log.warning("%s still delivering at stop; the outbox keeps its message", watcher.name)
        self._watchers.clear()
        if self.leader:
            release(self.sessions, name=LEASE_NAME, holder=self.holder_id)
            self.leader = False

    def renew_lease(self) -> bool:
        """Take or keep the scheduler lease; while held, fail retrain runs whose process died."""
        try:
            held = try_acquire(
                self.sessions,
                name=LEASE_NAME,
                holder=self.holder_id,
                ttl_s=self.settings.lease_ttl_s,
                now=self.clock(),
            )
        except Exception as exc:
            if not self._database_down("scheduler lease", exc, every_s=self.settings.lease_ttl_s / 3):
                log.exception("could not renew the scheduler lease")
            held = False
        else:
            self._database_up("scheduler lease")
        if held and not self.leader:
            log.info("scheduler lease taken by %s", self.holder_id)
        if held:
            self._standby = False
            self._recover_stale_runs()
            self._announce_finished_runs()
        elif self.leader:
            log.warning("scheduler lease lost; this process idles")
        elif not self._standby and "scheduler lease" not in self._unreachable:
            self._log_standby()
        self.leader = held
        return held

    def _log_standby(self) -> None:
        """Say once, when this process finds the lease held by another, whose it is and that it waits."""
        try:
            lease = current_holder(self.sessions, name=LEASE_NAME)
        except Exception:
            return  # the next renewal tries again
        self._standby = True
        held_by = (
            f"held by {lease.holder} until {lease.expires_at:%H:%M:%S} UTC" if lease else "held by another"
        )
        log.info(
            "scheduler lease %s; this process stands by and takes over if it is not renewed (checked every "
            "%g s)", held_by, self.settings.lease_ttl_s / 3,
        )  # fmt: skip

    def _recover_stale_runs(self) -> None:
        """Fail runs whose process died (no heartbeat) or hung (past any timeout), so the slot frees, and
        announce them: their launcher is gone or past its timeout, so nobody else will."""
        try:
            s = self.settings
            stale = recover_stale(
                self.sessions, now=self.clock(), stale_after_s=HEARTBEATS_MISSED * s.lease_ttl_s,
                max_run_s=s.retrain_timeout_s + RUN_GRACE_S,
            )  # fmt: skip
        except Exception:
            log.exception("could not check for stale retrain runs")
            return
        for run_id in stale:
            log.warning("retrain run %s marked failed: its process died or hung (see its error)", run_id)
            try:
                with self.sessions.begin() as session:
                    row = enqueue_retrain_outcome(session, run_id, now=self.clock(), metrics=self.metrics)
            except Exception:  # the sweep below announces (and counts) it later
                log.exception("could not announce the failure of retrain run %s", run_id)
            else:
                if row is not None:
                    self._count_runs([run_id])

    def _announce_finished_runs(self) -> None:
        """Announce runs that ended a lease TTL ago or more and are still unannounced: a launcher that is
        alive announces its run within a second or two of its end, so these are runs whose launcher exited."""
        try:
            announced = announce_finished_runs(
                self.sessions, now=self.clock(), horizon=ANNOUNCE_HORIZON,
                grace=timedelta(seconds=self.settings.lease_ttl_s), metrics=self.metrics,
            )  # fmt: skip
        except Exception:
            log.exception("could not announce finished retrain runs")
            return
        if announced:
            log.info("announced retrain run(s) %s, whose launcher did not", announced)
            self._count_runs(announced)

    def _count_runs(self, run_ids: list[int]) -> None:
        """Count runs this process announced in driftloop_retrain_runs_total. A run's outcome is enqueued
        once, by whichever process gets there first (its launcher, or the leader failing or sweeping it),
        so counted here it is counted once: a launcher's watcher counting too counted twice a run the
        leader failed while its child lived on through a database outage."""
        try:
            with self.sessions() as session:
                for run_id in run_ids:
                    run = session.get(RetrainRun, run_id)
                    if run is not None:
                        count_run(self.metrics, run)
        except Exception:
            log.exception("could not count retrain run(s) %s", run_ids)

    def scheduled_retrain(self) -> int | None:
        """The periodic retrain (DRIFTLOOP_SCHEDULED_RETRAIN_S), by the leader only, once that long has passed
        since the last scheduled run started, whichever process started it; its run id, or None."""
        every = self.settings.scheduled_retrain_s
        if not self.leader or every is None:
            return None
        try:
            # Due once a whole period has passed since the last scheduled run started, whoever started it:
            # never early, and late by at most a check (a tenth of the period, up to a minute).
            since = self.clock() - timedelta(seconds=every)
            due = not started_since(self.sessions, trigger="schedule", since=since)
            self._database_up("scheduled retrain")
            if due:
                reason = f"scheduled retrain (every {every} s)"
                run_id = self.launch_retrain(trigger="schedule", reason=reason).run_id
                self._schedule_held = None
                return run_id
        except RunInProgress as exc:
            self._say_schedule_held(logging.INFO, f"scheduled retrain waits: run {exc.run_id} is in progress")
        except NoChampion as exc:
            self._say_schedule_held(logging.WARNING, f"scheduled retrain skipped: {exc}")
        except Exception as exc:
            if not self._database_down("scheduled retrain", exc, every_s=schedule_check_s(every)):
                log.exception("scheduled retrain could not start")
        return None

    def _say_schedule_held(self, level: int, message: str) -> None:
        if message != self._schedule_held:
            log.log(level, "%s", message)
        self._schedule_held = message

    def _scheduled_monitor(self) -> None:
        if not self.leader:
            return
        try:
            if self._ran_lately():
                self._database_up("monitor run")
                return
            self.run_monitor()
            self._database_up("monitor run")
        except MonitorBusy as exc:
            log.info("scheduled monitor run skipped: %s", exc)
        except Exception as exc:
            if not self._database_down("monitor run", exc, every_s=self.settings.monitor_interval_s):
                log.exception("monitor run failed")

    def _ran_lately(self) -> bool:
        """A report younger than half the interval: a leader that just took over (its timer started with its
        process) or an operator ran one moments ago. A run over nearly the same window would count as a
        second breach in a row, and so halve the wait the policy's hysteresis asks for."""
        with self.sessions() as session:
            last = session.scalar(select(func.max(DriftReport.created_at)))
        if last is None:
            return False
        age = (self.clock() - last).total_seconds()
        if not 0 <= age < self.settings.monitor_interval_s / 2:  # below 0: a clock ahead of ours wrote it
            return False
        log.info("scheduled monitor run skipped: report made %.0f s ago, within half the interval", age)
        return True

    # --- the monitor run ---------------------------------------------------------------
    def run_monitor(self, now: datetime | None = None) -> MonitorOutcome:
        """MonitorBusy, without waiting, while another run is going in this process or holds the database's
        monitor lease."""
        if not self._monitoring.acquire(blocking=False):
            raise MonitorBusy(
                "a monitor run is already in progress in this process; at most one runs at a time"
            )
        started = time.perf_counter()
        leased = False
        try:
            at = now or self.clock()
            leased = try_acquire(
                self.sessions, name=MONITOR_LEASE, holder=self.holder_id, ttl_s=MONITOR_LEASE_TTL_S, now=at
            )
            if not leased:
                raise MonitorBusy(self._monitor_elsewhere())
            outcome = self._run_monitor(at)
        except MonitorBusy:
            raise
        except Exception:
            self.metrics.monitor_runs.labels(outcome="error").inc()
            raise
        finally:
            if leased:  # a run refused (MonitorBusy) or failed before its lease is no run to time
                self._release_monitor_lease()
                self.metrics.monitor_seconds.observe(time.perf_counter() - started)
            self._monitoring.release()
        self.metrics.monitor_runs.labels(outcome=outcome.verdict).inc()
        self.metrics.monitor_last_run.set(time.time())
        log_outcome(outcome)
        return outcome

    def _monitor_elsewhere(self) -> str:
        lease = current_holder(self.sessions, name=MONITOR_LEASE)
        where = (
            f" in {lease.holder} (its lease expires {lease.expires_at:%Y-%m-%d %H:%M:%S} UTC)"
            if lease
            else ""
        )
        return f"a monitor run is already in progress{where}; at most one runs at a time"

    def _release_monitor_lease(self) -> None:
        """Let the next run go at once; a failure only leaves the lease to expire (MONITOR_LEASE_TTL_S)."""
        try:
            release(self.sessions, name=MONITOR_LEASE, holder=self.holder_id)
        except Exception as exc:
            log.warning(
                "could not release the monitor lease (%s); it expires in %g s", exc, MONITOR_LEASE_TTL_S
            )

    def _run_monitor(self, now: datetime) -> MonitorOutcome:
        champion = self.registry.champion()
        if champion is None:
            return MonitorOutcome("insufficient", None, None, None, notes=("no champion model yet",))
        verdict = self._monitor.judge(champion, now)
        decision = verdict.decision
        if decision.breach:
            self._alert_breach(verdict, now)
        notes: list[str] = []
        run_id = None
        if decision.retrain and decision.trigger:
            try:
                run_id = self._launch(
                    trigger=decision.trigger, reason="; ".join(decision.reasons), report_id=verdict.report_id
                )
            except RunInProgress as exc:
                notes.append(f"retrain run {exc.run_id} already running")
        self.deliver()
        return MonitorOutcome(
            decision.verdict, verdict.report_id, decision, verdict.result,
            retrain_run_id=run_id, notes=tuple(notes), accuracy=verdict.accuracy,
        )  # fmt: skip

    def _alert_breach(self, verdict: Verdict, now: datetime) -> None:
        """The breach's alert, one per run of breaches (its key is the run's first report)."""
        version = verdict.champion.version
        with self.sessions.begin() as session:
            enqueue(
                session, kind="drift_breach",
                dedup_key=breach_key(
                    champion_version=version,
                    streak_start_report_id=verdict.history.streak_start_report_id or verdict.report_id,
                ),
                payload=format_breach(
                    decision=verdict.decision, champion_version=version, report_id=verdict.report_id,
                    obs=verdict.observation,
                ),
                now=now, metrics=self.metrics,
            )  # fmt: skip

    # --- retraining and alerts ---------------------------------------------------------
    def _launch(self, *, trigger: str, reason: str, report_id: int | None) -> int:
        if self.launcher is not None:
            return self.launcher(trigger=trigger, reason=reason, report_id=report_id)
        return self.launch_retrain(trigger=trigger, reason=reason, report_id=report_id).run_id

    def launch_retrain(self, *, trigger: str, reason: str = "", report_id: int | None = None) -> RunHandle:
        """Start a run in a child process; its outcome is announced when it ends.

        Raises NoChampion (a run could only fail) or RunInProgress, and then nothing has started.
        """
        if self.registry.champion() is None:
            raise NoChampion()
        handle = launch(
            settings=self.settings, trigger=trigger, reason=reason, report_id=report_id,
            sessions=self.sessions, metrics=self.metrics, clock=self.clock, spec_sha256=self.spec.sha256,
            count=False,  # counted when announced (_announce), by this process or the leader
        )  # fmt: skip
        watcher = threading.Thread(
            target=self._announce, args=(handle,), name=f"retrain-announce-{handle.run_id}", daemon=True
        )
        watcher.start()
        self._watchers = [w for w in self._watchers if w.is_alive()] + [watcher]
        return handle

    def _announce(self, handle: RunHandle) -> None:
        """Wait for the run to end, then enqueue and deliver its outcome; give up at stop()."""
        deadline = time.monotonic() + self.settings.retrain_timeout_s + 60
        while (status := handle.poll()) is None:
            if self._stopping.is_set() or time.monotonic() > deadline:
                # Look once more: a run that ended between the poll above and stop() is stop()'s to wait for.
                if (status := handle.poll()) is not None:
                    break
                log.info("retrain run %s still running; the scheduler leader announces it", handle.run_id)
                return
            handle.wait(ANNOUNCE_POLL_S)
        if self.unscraped and (leader := self._leader_elsewhere()):
            log.info(
                "retrain run %s ended (%s); the scheduler leader %s announces it",
                handle.run_id,
                status,
                leader,
            )
            return
        try:
            with self.sessions.begin() as session:
                row = enqueue_retrain_outcome(session, handle.run_id, now=self.clock(), metrics=self.metrics)
            if row is not None:
                self._count_runs([handle.run_id])
            self.deliver()
        except Exception:
            log.exception("could not announce the outcome (%s) of retrain run %s", status, handle.run_id)

    def _leader_elsewhere(self) -> str | None:
        """The scheduler leader's holder id while another process holds the lease, else None (and None when
        the database cannot say: the run is then announced here rather than perhaps by nobody)."""
        try:
            lease = current_holder(self.sessions, name=LEASE_NAME)
        except Exception:
            log.exception("could not read the scheduler lease")
            return None
        if lease is None or lease.holder == self.holder_id or lease.expires_at <= self.clock():
            return None
        return lease.holder

    def deliver(self) -> None:
        if self._notifier is None:
            s = self.settings
            self._notifier = WebhookNotifier(
                self.sessions, url=s.webhook_url, timeout_s=s.webhook_timeout_s,
                max_attempts=s.webhook_max_attempts, backoff_s=s.webhook_backoff_s,
                metrics=self.metrics, clock=self.clock,
            )  # fmt: skip
        try:
            self._notifier.deliver_due()
        except Exception as exc:
            if not self._database_down("notification delivery", exc, every_s=DELIVERY_INTERVAL_S):
                log.exception("notification delivery failed")
        else:
            self._database_up("notification delivery")

    def _database_down(self, job: str, exc: Exception, *, every_s: float) -> bool:
        """True when `exc` says the database is unreachable; logged as one line at the first failure of
        `job` in an outage, not as a traceback every few seconds on every worker until it ends."""
        if not unreachable(exc):
            return False
        if job not in self._unreachable:
            self._unreachable.add(job)
            log.warning(
                "%s: database unavailable (%s); retrying every %g s, logged again when it answers",
                job, error_line(exc), every_s,
            )  # fmt: skip
        return True

    def _database_up(self, job: str) -> None:
        if job in self._unreachable:
            self._unreachable.discard(job)
            log.info("%s: database reachable again", job)
