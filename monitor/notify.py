"""Notifications: an outbox table written in the caller's transaction, delivered to a webhook with retries.

Outbox row statuses: pending → delivered | failed | skipped.
- `enqueue` is idempotent per dedup_key: a key seen before, in any status, writes nothing.
- `WebhookNotifier.deliver_due` POSTs due rows. With no webhook URL configured, due rows are marked
  "skipped" rather than left pending: the outbox must not grow without bound on installs that only
  watch the dashboards, and configuring a URL later should not replay a backlog of stale alerts.
- Two processes may deliver at once: a row is claimed by a conditional UPDATE on the attempt count it
  was seen with, so one worker wins. Delivery is at-least-once: a worker that dies after the POST but
  before recording it leaves the row to be retried once its claim lapses. Receivers can drop repeats by
  the Idempotency-Key header (the dedup_key).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import Clock, utcnow
from core.metrics import Metrics
from core.schema import Notification, RetrainRun, RunStatus
from monitor import LOOP_LOGGER
from monitor.policy import Decision, Observation

PENDING, DELIVERED, FAILED, SKIPPED = "pending", "delivered", "failed", "skipped"  # row statuses
RETRIED, SUPPRESSED = "retried", "suppressed"  # metric outcomes that are not statuses
NO_WEBHOOK = "no webhook configured"
log = logging.getLogger(LOOP_LOGGER)


def enqueue(
    session: Session,
    *,
    kind: str,
    dedup_key: str,
    payload: dict[str, Any],
    now: datetime,
    metrics: Metrics | None = None,
) -> Notification | None:
    """Add a pending outbox row in the caller's transaction; None (suppressed) if the key exists already."""
    if session.get_bind().dialect.name == "postgresql":
        # Serialises concurrent enqueues of one key until the caller commits.
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_id(dedup_key)})
    row: Notification | None = None
    if not _key_taken(session, dedup_key):
        row = Notification(
            created_at=now,
            kind=kind,
            dedup_key=dedup_key,
            payload=payload,
            status=PENDING,
            attempts=0,
            next_attempt_at=now,
        )
        session.add(row)
        session.flush()
        # SQLite reads outside the write lock: a writer that committed the same key in between wins.
        if _key_taken(session, dedup_key, before_id=row.id):
            session.delete(row)
            session.flush()
            row = None
    if row is None and metrics is not None:
        metrics.notifications.labels(kind=kind, outcome=SUPPRESSED).inc()
    return row


def _key_taken(session: Session, key: str, *, before_id: int | None = None) -> bool:
    query = select(Notification.id).where(Notification.dedup_key == key)
    if before_id is not None:
        query = query.where(Notification.id < before_id)
    return session.scalar(query.limit(1)) is not None


def _lock_id(key: str) -> int:
    digest = hashlib.sha256(b"driftloop.notify:" + key.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    delivered: int = 0
    retried: int = 0  # attempts that failed and were scheduled again
    failed: int = 0  # rows that used up their attempts
    skipped: int = 0  # rows dropped because no webhook is configured
    pending: int = 0  # rows still pending after this pass (including those scheduled for later)


@dataclass(frozen=True, slots=True)
class _Claimed:
    id: int
    kind: str
    dedup_key: str
    payload: dict[str, Any]
    created_at: datetime
    attempts: int  # including the one this claim is for


class WebhookNotifier:
    """Delivers due outbox rows to one webhook URL. Call `deliver_due` from a scheduler job."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        url: str | None,
        timeout_s: float,
        max_attempts: int,
        backoff_s: float,
        metrics: Metrics | None = None,
        clock: Clock = utcnow,
        batch_size: int = 100,
    ) -> None:
        self._sessions = sessions
        self._url = url
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._metrics = metrics
        self._clock = clock
        self._batch_size = batch_size
        # A claim lapses after this long, so a row whose worker died mid-POST is retried.
        self._claim_ttl = timedelta(seconds=60 + 4 * timeout_s)

    def deliver_due(self) -> DeliveryStats:
        """One pass over rows due now (next_attempt_at ≤ now); returns what happened to them."""
        now = self._clock()
        failed = self._fail_exhausted(now)
        counts = {DELIVERED: 0, RETRIED: 0, FAILED: failed, SKIPPED: 0}
        due = self._due(now)
        if self._url is None:
            outcomes = [self._skip(row_id, kind, attempts) for row_id, kind, attempts in due]
        else:
            outcomes = []
            for row_id, _, attempts in due:
                # as of now, not the pass's start: after slow attempts (each up to ATTEMPT_BOUND × the
                # timeout), a claim dated from the start had lapsed before its POST began
                claimed = self._claim(row_id, attempts, self._clock())
                outcomes.append(self._attempt(self._url, claimed) if claimed else None)
        for outcome in outcomes:
            if outcome is not None:
                counts[outcome] += 1
        return DeliveryStats(
            delivered=counts[DELIVERED],
            retried=counts[RETRIED],
            failed=counts[FAILED],
            skipped=counts[SKIPPED],
            pending=self.refresh_pending(),
        )

    def refresh_pending(self) -> int:
        """Count pending rows and publish the count on the notifications_pending gauge."""
        with self._sessions() as session:
            pending = session.scalar(
                select(func.count(Notification.id)).where(Notification.status == PENDING)
            )
        pending = pending or 0
        if self._metrics is not None:
            self._metrics.notifications_pending.set(pending)
        return pending

    # --- steps -----------------------------------------------------------------------------

    def _due(self, now: datetime) -> list[tuple[int, str, int]]:
        with self._sessions() as session:
            rows = session.execute(
                select(Notification.id, Notification.kind, Notification.attempts)
                .where(
                    Notification.status == PENDING,
                    Notification.next_attempt_at <= now,
                    Notification.attempts < self._max_attempts,
                )
                .order_by(Notification.next_attempt_at, Notification.id)
                .limit(self._batch_size)
            )
            return [(r.id, r.kind, r.attempts) for r in rows]

    def _claim(self, row_id: int, seen_attempts: int, now: datetime) -> _Claimed | None:
        """Take the row for one attempt; None if another worker got there first."""
        with self._sessions.begin() as session:
            taken = session.execute(
                update(Notification)
                .where(
                    Notification.id == row_id,
                    Notification.status == PENDING,
                    Notification.attempts == seen_attempts,
                    Notification.next_attempt_at <= now,
                )
                .values(attempts=seen_attempts + 1, next_attempt_at=now + self._claim_ttl)
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount != 1:  # type: ignore[attr-defined]
                return None
            row = session.get_one(Notification, row_id)
            return _Claimed(row.id, row.kind, row.dedup_key, dict(row.payload), row.created_at, row.attempts)

    def _attempt(self, url: str, claimed: _Claimed) -> str:
        error = _post(url, _body(claimed), key=claimed.dedup_key, timeout_s=self._timeout_s)
        now = self._clock()
        which = f"notification #{claimed.id} ({claimed.kind}, {claimed.dedup_key})"
        attempt = f"attempt {claimed.attempts} of {self._max_attempts} failed"
        if error is None:
            outcome, values = DELIVERED, {"status": DELIVERED, "delivered_at": now, "last_error": None}
        elif claimed.attempts >= self._max_attempts:
            outcome, values = FAILED, {"status": FAILED, "last_error": error}
            log.error("%s was not delivered: %s: %s", which, attempt, error)
        else:
            delay = timedelta(seconds=self._backoff_s * 2 ** (claimed.attempts - 1))
            outcome, values = RETRIED, {"last_error": error, "next_attempt_at": now + delay}
            log.warning("%s: %s, retrying in %g s: %s", which, attempt, delay.total_seconds(), error)
        with self._sessions.begin() as session:
            session.execute(
                update(Notification)
                .where(Notification.id == claimed.id, Notification.attempts == claimed.attempts)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
        self._count(claimed.kind, outcome)
        return outcome

    def _skip(self, row_id: int, kind: str, seen_attempts: int) -> str | None:
        with self._sessions.begin() as session:
            taken = session.execute(
                update(Notification)
                .where(
                    Notification.id == row_id,
                    Notification.status == PENDING,
                    Notification.attempts == seen_attempts,
                )
                .values(status=SKIPPED, last_error=NO_WEBHOOK)
                .execution_options(synchronize_session=False)
            )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return None
        self._count(kind, SKIPPED)
        return SKIPPED

    def _fail_exhausted(self, now: datetime) -> int:
        """Rows whose last attempt was claimed by a worker that never reported back (it died)."""
        with self._sessions.begin() as session:
            lost = session.execute(
                select(Notification.id, Notification.kind).where(
                    Notification.status == PENDING,
                    Notification.attempts >= self._max_attempts,
                    Notification.next_attempt_at <= now,
                )
            ).all()
            failed = [
                kind
                for row_id, kind in lost
                if session.execute(
                    update(Notification)
                    .where(
                        Notification.id == row_id,
                        Notification.status == PENDING,
                        Notification.attempts >= self._max_attempts,
                    )
                    .values(
                        status=FAILED, last_error="no outcome recorded for the final attempt (worker lost)"
                    )
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]
                == 1
            ]
        for kind in failed:
            self._count(kind, FAILED)
        if failed:
            log.error(
                "%d notification(s) were not delivered: no outcome recorded for the final attempt",
                len(failed),
            )
        return len(failed)

    def _count(self, kind: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.notifications.labels(kind=kind, outcome=outcome).inc()


def _body(claimed: _Claimed) -> dict[str, Any]:
    """The JSON POSTed: Slack reads `text`; other receivers read `kind` and the structured `payload`."""
    return {
        "text": str(claimed.payload.get("text") or f"driftloop {claimed.kind}"),
        "kind": claimed.kind,
        "dedup_key": claimed.dedup_key,
        "notification_id": claimed.id,
        "created_at": claimed.created_at.isoformat(),
        "attempt": claimed.attempts,
        "payload": claimed.payload,
    }


# An attempt is given up after this many times the timeout in all. httpx's timeout bounds each step (connect,
# each write, each read), not the attempt: a receiver that sent its answer a byte at a time, each well
# within it, held the attempt, and the delivery job with every alert queued behind it, for as long as it
# trickled; past the claim's lapse, another process posted the same notification again.
ATTEMPT_BOUND = 2


def _post(url: str, body: dict[str, Any], *, key: str, timeout_s: float) -> str | None:
    """POST once; None on a 2xx answer, else a one-line description of what went wrong. Run in a thread
    with no event loop of its own (the scheduler's, a route's thread pool, the CLI): the deadline on the
    whole attempt is asyncio's, which can cancel a read that httpx's sync client could only wait out."""
    return asyncio.run(_post_within(url, body, key=key, timeout_s=timeout_s))


async def _post_within(url: str, body: dict[str, Any], *, key: str, timeout_s: float) -> str | None:
    bound = ATTEMPT_BOUND * timeout_s
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            async with asyncio.timeout(bound):
                response = await client.post(url, json=body, headers={"Idempotency-Key": key})
    except httpx.TimeoutException as exc:
        return f"timeout after {timeout_s:g} s ({type(exc).__name__})"
    except TimeoutError:
        return f"timeout after {timeout_s:g} s (the answer took over {bound:g} s in all)"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {_os_error(exc) or exc}"
    if response.is_success:
        return None
    snippet = " ".join(response.text.split())[:200]
    return f"HTTP {response.status_code} {response.reason_phrase}" + (f": {snippet}" if snippet else "")


def _os_error(exc: BaseException) -> str | None:
    """The system's word for a failed connection ("[Errno 111] Connection refused"), which the async client
    wraps in "All connection attempts failed" (from an ExceptionGroup of each address's, for a name of two
    addresses: localhost as ::1 and 127.0.0.1); None when no cause has an error number."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None and cause.errno > 0:
            return f"[Errno {cause.errno}] {os.strerror(cause.errno)}"
        if isinstance(cause, BaseExceptionGroup):
            return next(filter(None, map(_os_error, cause.exceptions)), None)
        cause = cause.__cause__ or cause.__context__
    return None


# --- payloads ------------------------------------------------------------------------------------


def retrain_key(run_id: int) -> str:
    """One key per retrain run: its outcome is announced once, by its launcher or the leader's sweep."""
    return f"retrain:{run_id}"


def breach_key(*, champion_version: int | None, streak_start_report_id: int) -> str:
    """One key per ongoing breach: the champion and the report that started the run of breaches."""
    return f"breach:v{champion_version}:episode-{streak_start_report_id}"


def format_breach(
    *,
    decision: Decision,
    champion_version: int | None,
    report_id: int | None,
    obs: Observation | None = None,
) -> dict[str, Any]:
    """Payload for a breach alert; `obs` adds the measured figures to the structured part."""
    report = f" (report #{report_id})" if report_id is not None else ""
    action = (
        f"Retraining launched (trigger: {decision.trigger})."
        if decision.retrain
        else f"No retraining: {decision.held_by}."
    )
    lines = [
        f":rotating_light: driftloop: champion v{champion_version} breached the drift policy on "
        f"{decision.trigger or 'drift'}{report}, "
        f"{decision.consecutive} in a row.",
        *(f"• {reason}" for reason in decision.reasons),
        action,
    ]
    payload: dict[str, Any] = {
        "text": "\n".join(lines),
        "champion_version": champion_version,
        "report_id": report_id,
        "decision": decision.as_dict(),
    }
    if obs is not None:
        payload["observation"] = {
            "at": obs.at.isoformat(),
            "rows": obs.rows,
            "labelled_rows": obs.labelled_rows,
            "drift_share": obs.drift_share,
            "weighted_drift_score": obs.weighted_score,
            "mae": obs.mae,
            "champion_mae": obs.champion_mae,
            "drifted_features": list(obs.drifted_features),
        }
    return payload


_OUTCOME_ICON = {"promoted": ":white_check_mark:", "rejected": ":no_entry:", "failed": ":x:"}


def enqueue_retrain_outcome(
    session: Session, run_id: int, *, now: datetime, metrics: Metrics | None = None
) -> Notification | None:
    """Announce a finished run, once per run whoever asks first (its own process, or the leader's sweep)."""
    payload = format_retrain_outcome(session=session, run_id=run_id)
    row = enqueue(
        session, kind="retrain_outcome", dedup_key=retrain_key(run_id), payload=payload, now=now,
        metrics=metrics,
    )  # fmt: skip
    if row is not None:
        # The text without its chat icon: one line a run in the log of whichever process announced it.
        log.log(
            logging.WARNING if payload["status"] == "failed" else logging.INFO,
            "%s", " | ".join(payload["text"].split(" ", 1)[1].splitlines()),
        )  # fmt: skip
    return row


def announce_finished_runs(
    sessions: sessionmaker[Session],
    *,
    now: datetime,
    horizon: timedelta,
    grace: timedelta = timedelta(0),
    metrics: Metrics | None = None,
) -> list[int]:
    """Enqueue the outcome of every run that finished within `horizon`, at least `grace` ago, and has none
    yet; their ids.

    The process that launched a run announces it when its child exits. That process may exit first (the
    CLI's `--no-wait`, a restart or crash mid-run); the scheduler leader sweeps these up, once `grace` has
    given a launcher still alive the time to announce its own run (between the child finishing the run's
    row and the launcher's enqueue lie the child's exit and the announcer's poll). Older runs are left:
    news a day late is noise.
    """
    with sessions() as session:
        finished = session.scalars(
            select(RetrainRun.id).where(
                RetrainRun.status != RunStatus.running,
                RetrainRun.finished_at >= now - horizon,
                RetrainRun.finished_at <= now - grace,
            )
        ).all()
        keys = {retrain_key(run_id): run_id for run_id in finished}
        taken = set(session.scalars(select(Notification.dedup_key).where(Notification.dedup_key.in_(keys))))
    announced = []
    for key, run_id in keys.items():
        if key not in taken:
            with sessions.begin() as session:
                if enqueue_retrain_outcome(session, run_id, now=now, metrics=metrics) is not None:
                    announced.append(run_id)
    return announced


def format_retrain_outcome(*, session: Session, run_id: int) -> dict[str, Any]:
    """Payload announcing what a finished retrain run did and why (read from its retrain_run row)."""
    run = session.get_one(RetrainRun, run_id)
    icon = _OUTCOME_ICON.get(run.status, ":information_source:")
    if run.status == "promoted":
        summary = f"candidate v{run.candidate_version} promoted, replacing v{run.champion_version}"
    elif run.status == "rejected":
        summary = f"candidate v{run.candidate_version} rejected; v{run.champion_version} stays champion"
    else:
        summary = f"{run.status}; v{run.champion_version} stays champion"
    lines = [f"{icon} driftloop retrain run #{run.id} (trigger: {run.trigger}): {summary}."]
    if run.reason:
        lines.append(f"Reason: {run.reason}")
    gate = (run.metrics or {}).get("gate") or {}
    if run.status == "rejected" and gate.get("reasons"):
        lines.append(f"Gate: {'; '.join(gate['reasons'])}")
    if run.error and run.error.strip():
        lines.append(f"Error: {run.error.strip().splitlines()[-1][:300]}")
    return {
        "text": "\n".join(lines),
        "run_id": run.id,
        "trigger": run.trigger,
        "status": run.status,
        "champion_version": run.champion_version,
        "candidate_version": run.candidate_version,
        "report_id": run.report_id,
        "metrics": dict(run.metrics or {}),
        "error": run.error,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }
