"""The notification outbox and webhook delivery, against a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.metrics import Metrics, build_metrics
from core.schema import Notification, RetrainRun
from monitor import LOOP_LOGGER
from monitor.notify import (
    DeliveryStats,
    WebhookNotifier,
    breach_key,
    enqueue,
    format_breach,
    format_retrain_outcome,
)
from monitor.policy import Decision, Observation
from tests.webhook import Receiver, running_receiver

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PAYLOAD = {"text": "champion v3 breached", "champion_version": 3, "report_id": 17}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as receiver:
        yield receiver


# --- helpers ---------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Prom:
    registry: CollectorRegistry
    metrics: Metrics

    def count(self, kind: str, outcome: str) -> float | None:
        return self.registry.get_sample_value(
            "driftloop_notifications_total", {"kind": kind, "outcome": outcome}
        )

    def pending(self) -> float | None:
        return self.registry.get_sample_value("driftloop_notifications_pending")


@pytest.fixture
def prom() -> Prom:
    registry = CollectorRegistry()
    return Prom(registry, build_metrics(registry))


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


def notifier(
    sessions: sessionmaker[Session],
    url: str | None,
    prom: Prom,
    clock: Clock,
    *,
    max_attempts: int = 5,
    backoff_s: float = 10.0,
    timeout_s: float = 5.0,
) -> WebhookNotifier:
    return WebhookNotifier(
        sessions,
        url=url,
        timeout_s=timeout_s,
        max_attempts=max_attempts,
        backoff_s=backoff_s,
        metrics=prom.metrics,
        clock=clock,
    )


def add(
    sessions: sessionmaker[Session],
    key: str = "breach:v3:episode-17",
    *,
    kind: str = "breach",
    prom: Prom | None = None,
    now: datetime = T0,
) -> int | None:
    with sessions.begin() as session:
        row = enqueue(
            session,
            kind=kind,
            dedup_key=key,
            payload=PAYLOAD,
            now=now,
            metrics=prom.metrics if prom else None,
        )
        return row.id if row else None


def outbox(sessions: sessionmaker[Session]) -> list[Notification]:
    with sessions() as session:
        return list(session.scalars(select(Notification).order_by(Notification.id)))


# --- enqueue and delivery --------------------------------------------------------------------


def test_one_delivery_per_breach_key(
    sessions: sessionmaker[Session], receiver: Receiver, prom: Prom, clock: Clock
) -> None:
    ids = [add(sessions, prom=prom) for _ in range(3)]
    webhook = notifier(sessions, receiver.url, prom, clock)

    assert ids[0] is not None and ids[1:] == [None, None]
    assert webhook.deliver_due() == DeliveryStats(delivered=1)
    assert webhook.deliver_due() == DeliveryStats()
    assert add(sessions, prom=prom) is None  # still suppressed once delivered

    [row] = outbox(sessions)
    assert (row.status, row.attempts, row.delivered_at, row.last_error) == ("delivered", 1, T0, None)
    assert receiver.bodies == [
        {
            "text": "champion v3 breached",
            "kind": "breach",
            "dedup_key": "breach:v3:episode-17",
            "notification_id": ids[0],
            "created_at": T0.isoformat(),
            "attempt": 1,
            "payload": PAYLOAD,
        }
    ]
    assert receiver.keys == ["breach:v3:episode-17"]
    assert prom.count("breach", "suppressed") == 3
    assert prom.count("breach", "delivered") == 1
    assert prom.pending() == 0


def test_retries_with_exponential_backoff_until_delivered(
    sessions: sessionmaker[Session], receiver: Receiver, prom: Prom, clock: Clock
) -> None:
    receiver.statuses = [500, 500, 200]
    add(sessions)
    webhook = notifier(sessions, receiver.url, prom, clock, backoff_s=10.0)

    assert webhook.deliver_due() == DeliveryStats(retried=1, pending=1)
    [row] = outbox(sessions)
    assert (row.status, row.attempts, row.next_attempt_at) == ("pending", 1, T0 + timedelta(seconds=10))
    assert row.last_error == "HTTP 500 Internal Server Error: boom"
    assert prom.pending() == 1

    assert webhook.deliver_due() == DeliveryStats(pending=1)  # not due yet
    clock.advance(10)
    assert webhook.deliver_due() == DeliveryStats(retried=1, pending=1)
    [row] = outbox(sessions)
    assert (row.attempts, row.next_attempt_at) == (2, T0 + timedelta(seconds=30))

    clock.advance(19)
    assert webhook.deliver_due() == DeliveryStats(pending=1)
    clock.advance(1)
    assert webhook.deliver_due() == DeliveryStats(delivered=1)
    [row] = outbox(sessions)
    assert (row.status, row.attempts, row.delivered_at, row.last_error) == (
        "delivered",
        3,
        T0 + timedelta(seconds=30),
        None,
    )
    assert [b["attempt"] for b in receiver.bodies] == [1, 2, 3]
    assert (prom.count("breach", "retried"), prom.count("breach", "delivered")) == (2, 1)
    assert prom.count("breach", "failed") is None
    assert prom.pending() == 0


def test_gives_up_after_max_attempts(
    sessions: sessionmaker[Session], receiver: Receiver, prom: Prom, clock: Clock
) -> None:
    receiver.statuses = [503] * 10
    add(sessions)
    webhook = notifier(sessions, receiver.url, prom, clock, max_attempts=3, backoff_s=1.0)

    assert webhook.deliver_due() == DeliveryStats(retried=1, pending=1)
    clock.advance(1)
    assert webhook.deliver_due() == DeliveryStats(retried=1, pending=1)
    clock.advance(2)
    assert webhook.deliver_due() == DeliveryStats(failed=1)
    clock.advance(3600)
    assert webhook.deliver_due() == DeliveryStats()

    [row] = outbox(sessions)
    assert (row.status, row.attempts, row.delivered_at) == ("failed", 3, None)
    assert row.last_error == "HTTP 503 Service Unavailable: boom"
    assert len(receiver.bodies) == 3
    assert (prom.count("breach", "retried"), prom.count("breach", "failed")) == (2, 1)
    assert prom.pending() == 0


def test_failed_attempts_are_logged_naming_the_alert_and_the_error(
    sessions: sessionmaker[Session],
    receiver: Receiver,
    prom: Prom,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A webhook that refuses every alert (a mistyped URL, an expired key) is seen in the log, not only in a
    counter: the alerts are the loop's way of being heard."""
    receiver.statuses = [503] * 10
    add(sessions)
    webhook = notifier(sessions, receiver.url, prom, clock, max_attempts=2, backoff_s=1.0)

    with caplog.at_level("WARNING", logger=LOOP_LOGGER):
        webhook.deliver_due()
        clock.advance(1)
        webhook.deliver_due()

    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "notification #1 (breach, breach:v3:episode-17): attempt 1 of 2 failed, retrying in 1 s: "
            "HTTP 503 Service Unavailable: boom",
        ),
        (
            "ERROR",
            "notification #1 (breach, breach:v3:episode-17) was not delivered: attempt 2 of 2 failed: "
            "HTTP 503 Service Unavailable: boom",
        ),
    ]


def test_timeout_is_a_failed_attempt(
    sessions: sessionmaker[Session], receiver: Receiver, prom: Prom, clock: Clock
) -> None:
    receiver.hang = 1
    add(sessions)
    webhook = notifier(sessions, receiver.url, prom, clock, timeout_s=0.2, backoff_s=5.0)

    assert webhook.deliver_due() == DeliveryStats(retried=1, pending=1)
    [row] = outbox(sessions)
    assert (row.attempts, row.last_error) == (1, "timeout after 0.2 s (ReadTimeout)")

    clock.advance(5)
    assert webhook.deliver_due() == DeliveryStats(delivered=1)
    # At-least-once: the receiver saw the timed-out POST too; the Idempotency-Key lets it drop the repeat.
    assert receiver.keys == ["breach:v3:episode-17", "breach:v3:episode-17"]


def test_a_trickled_answer_is_a_timeout(
    sessions: sessionmaker[Session], receiver: Receiver, prom: Prom, clock: Clock
) -> None:
    """httpx's timeout bounds each read, not the answer: a receiver sending a byte every 0.1 s held an
    attempt with a 0.3 s timeout for the 30 s its 300 bytes took (the delivery job, and every alert queued
    behind it, with it). An attempt is given up after twice the timeout in all."""
    receiver.trickle = 1
    add(sessions)
    webhook = notifier(sessions, receiver.url, prom, clock, timeout_s=0.3, backoff_s=5.0)

    started = time.monotonic()
    assert webhook.deliver_due() == DeliveryStats(retried=1, pending=1)
    assert time.monotonic() - started < 3
    [row] = outbox(sessions)
    assert (row.attempts, row.last_error) == (1, "timeout after 0.3 s (the answer took over 0.6 s in all)")

    clock.advance(5)
    assert webhook.deliver_due() == DeliveryStats(delivered=1)


def test_unreachable_webhook_is_a_failed_attempt(
    sessions: sessionmaker[Session], prom: Prom, clock: Clock
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    add(sessions)
    webhook = notifier(sessions, f"http://127.0.0.1:{port}/hook", prom, clock)

    assert webhook.deliver_due() == DeliveryStats(retried=1, pending=1)
    [row] = outbox(sessions)
    assert row.last_error is not None and row.last_error.startswith("ConnectError: ")
    assert row.last_error == "ConnectError: [Errno 111] Connection refused"


def test_without_a_webhook_rows_are_skipped(
    sessions: sessionmaker[Session], prom: Prom, clock: Clock
) -> None:
    add(sessions, "breach:v3:episode-1")
    add(sessions, "retrain:9", kind="retrain")
    webhook = notifier(sessions, None, prom, clock)

    assert webhook.deliver_due() == DeliveryStats(skipped=2)
    assert [(r.status, r.attempts, r.last_error) for r in outbox(sessions)] == [
        ("skipped", 0, "no webhook configured"),
        ("skipped", 0, "no webhook configured"),
    ]
    assert (prom.count("breach", "skipped"), prom.count("retrain", "skipped")) == (1, 1)
    assert prom.pending() == 0
    assert add(sessions, "breach:v3:episode-1") is None


def test_rows_are_delivered_in_order_and_only_when_due(
    sessions: sessionmaker[Session], receiver: Receiver, prom: Prom, clock: Clock
) -> None:
    add(sessions, "a", now=T0)
    add(sessions, "later", now=T0 + timedelta(minutes=1))
    add(sessions, "b", kind="retrain", now=T0)
    webhook = notifier(sessions, receiver.url, prom, clock)

    assert webhook.deliver_due() == DeliveryStats(delivered=2, pending=1)
    clock.advance(60)
    assert webhook.deliver_due() == DeliveryStats(delivered=1)
    assert receiver.keys == ["a", "b", "later"]
    assert (prom.count("breach", "delivered"), prom.count("retrain", "delivered")) == (2, 1)


def test_a_final_attempt_lost_with_its_worker_is_failed(
    sessions: sessionmaker[Session], receiver: Receiver, prom: Prom, clock: Clock
) -> None:
    """A worker claimed the last attempt (attempts = max, claim expired) and died before recording it."""
    with sessions.begin() as session:
        session.add(
            Notification(
                created_at=T0,
                kind="breach",
                dedup_key="k",
                payload=PAYLOAD,
                status="pending",
                attempts=3,
                next_attempt_at=T0,
            )
        )
    webhook = notifier(sessions, receiver.url, prom, clock, max_attempts=3)

    assert webhook.deliver_due() == DeliveryStats(failed=1)
    [row] = outbox(sessions)
    assert (row.status, row.last_error) == (
        "failed",
        "no outcome recorded for the final attempt (worker lost)",
    )
    assert receiver.bodies == []
    assert prom.count("breach", "failed") == 1


def test_two_workers_deliver_each_row_once(
    sessions: sessionmaker[Session], receiver: Receiver, prom: Prom, clock: Clock
) -> None:
    keys = [f"breach:v3:episode-{i}" for i in range(20)]
    for key in keys:
        add(sessions, key)
    workers = [notifier(sessions, receiver.url, prom, clock) for _ in range(2)]
    start = threading.Barrier(2)
    stats: list[DeliveryStats] = []
    errors: list[BaseException] = []

    def work(webhook: WebhookNotifier) -> None:
        try:
            start.wait()
            stats.append(webhook.deliver_due())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert sorted(receiver.keys) == sorted(keys)
    assert sum(s.delivered for s in stats) == 20
    assert {(r.status, r.attempts) for r in outbox(sessions)} == {("delivered", 1)}
    assert prom.count("breach", "delivered") == 20


# --- payloads --------------------------------------------------------------------------------


def test_format_breach_reads_as_a_slack_message() -> None:
    decision = Decision(
        verdict="breach",
        breach=True,
        retrain=False,
        trigger="drift",
        reasons=("drift share 0.667 ≥ threshold 0.500 (drifted: area_m2, floor)",),
        held_by="hysteresis 1/2",
        consecutive=1,
    )
    observation = Observation(
        at=T0,
        rows=1000,
        labelled_rows=0,
        drift_share=0.667,
        weighted_score=0.2,
        mae=None,
        champion_mae=1500.0,
        drifted_features=("area_m2", "floor"),
    )
    payload = format_breach(decision=decision, champion_version=3, report_id=17, obs=observation)

    assert payload["text"] == (
        ":rotating_light: driftloop: champion v3 breached the drift policy on drift (report #17), "
        "1 in a row.\n"
        "• drift share 0.667 ≥ threshold 0.500 (drifted: area_m2, floor)\n"
        "No retraining: hysteresis 1/2."
    )
    assert payload["decision"] == decision.as_dict()
    assert payload["observation"]["drifted_features"] == ["area_m2", "floor"]
    assert json.loads(json.dumps(payload)) == payload
    launched = format_breach(
        decision=Decision("breach", True, True, "accuracy", ("MAE up",), None, 2),
        champion_version=3,
        report_id=18,
    )
    assert (
        launched["text"]
        .splitlines()[0]
        .endswith("breached the drift policy on accuracy (report #18), 2 in a row.")
    )
    assert launched["text"].splitlines()[-1] == "Retraining launched (trigger: accuracy)."
    assert "observation" not in launched
    assert breach_key(champion_version=3, streak_start_report_id=17) == "breach:v3:episode-17"


def test_format_retrain_outcome(sessions: sessionmaker[Session]) -> None:
    def run(
        status: str, candidate: int | None, error: str | None, gate: list[str] | None = None
    ) -> RetrainRun:
        return RetrainRun(
            trigger="drift",
            status=status,
            reason="weighted drift score 0.420 ≥ threshold 0.300",
            report_id=17,
            champion_version=3,
            candidate_version=candidate,
            metrics={"val_mae": 1234.5, **({"gate": {"passed": False, "reasons": gate}} if gate else {})},
            steps={},
            error=error,
            pid=None,
            started_at=T0,
            finished_at=T0 + timedelta(minutes=4),
        )

    with sessions.begin() as session:
        runs = [
            run("promoted", 4, None),
            run("rejected", 5, None, gate=["mae: candidate MAE 1300 is not <= …", "spread: …"]),
            run("failed", None, "Traceback ...\nValueError: no labelled rows"),
        ]
        session.add_all(runs)
    with sessions() as session:
        promoted, rejected, failed = (format_retrain_outcome(session=session, run_id=r.id) for r in runs)

    assert promoted["text"] == (
        f":white_check_mark: driftloop retrain run #{runs[0].id} (trigger: drift): "
        "candidate v4 promoted, replacing v3.\n"
        "Reason: weighted drift score 0.420 ≥ threshold 0.300"
    )
    assert rejected["text"].splitlines()[0] == (
        f":no_entry: driftloop retrain run #{runs[1].id} (trigger: drift): "
        "candidate v5 rejected; v3 stays champion."
    )
    assert rejected["text"].splitlines()[-1] == "Gate: mae: candidate MAE 1300 is not <= …; spread: …"
    assert failed["text"].splitlines()[-1] == "Error: ValueError: no labelled rows"
    assert {k: promoted[k] for k in ("status", "candidate_version", "metrics", "finished_at")} == {
        "status": "promoted",
        "candidate_version": 4,
        "metrics": {"val_mae": 1234.5},
        "finished_at": (T0 + timedelta(minutes=4)).isoformat(),
    }


def test_a_refused_connection_to_a_name_of_two_addresses_is_named_as_the_systems_error() -> None:
    """A name that resolves to two addresses (localhost as ::1 and 127.0.0.1, on most hosts) fails as anyio
    raises it: one OSError without an errno, from an ExceptionGroup of each address's refusal. The sync
    client said '[Errno 111] Connection refused' of it; the async one 'All connection attempts failed'."""
    import errno
    import os

    import httpx

    from monitor.notify import _os_error

    refusals = [ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED)) for _ in "ab"]
    with pytest.raises(httpx.ConnectError) as raised:
        try:
            raise OSError("All connection attempts failed") from ExceptionGroup(
                "multiple connection attempts failed", refusals
            )
        except OSError as exc:  # as httpcore's map_exceptions wraps it
            raise httpx.ConnectError(str(exc)) from exc
    assert _os_error(raised.value) == f"[Errno {errno.ECONNREFUSED}] {os.strerror(errno.ECONNREFUSED)}"


def test_a_row_claimed_late_in_a_slow_pass_is_not_claimed_again_by_another_process(
    sessions: sessionmaker[Session], receiver: Receiver, prom: Prom, clock: Clock
) -> None:
    """A pass claimed each row as of the pass's start: a row reached after slow attempts (a receiver that
    hangs, each attempt up to twice the timeout, a hundred rows a pass) was claimed with its claim already
    lapsed, and another process's delivery job posted it at the same time. A claim runs from when it is
    made."""
    receiver.hang = 3
    add(sessions, "breach:v3:episode-1")
    add(sessions, "breach:v3:episode-2")
    first = notifier(sessions, receiver.url, prom, clock, timeout_s=3.0)
    claim_s = 60 + 4 * 3.0  # WebhookNotifier's claim on a row, for a 3 s timeout

    passing = threading.Thread(target=first.deliver_due)
    passing.start()
    try:
        wait_for(lambda: len(receiver.keys) == 1)  # the first row's attempt, hung
        clock.advance(claim_s + 1)  # a slow pass: the second row is claimed after what its claim lasts
        wait_for(lambda: len(receiver.keys) == 2)  # the second row's attempt, hung
        other = notifier(sessions, receiver.url, prom, clock, timeout_s=3.0)
        other.deliver_due()  # another process's delivery job, meanwhile
    finally:
        passing.join(30)
    assert receiver.keys == ["breach:v3:episode-1", "breach:v3:episode-2"]
    assert [row.attempts for row in outbox(sessions)] == [1, 1]


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
