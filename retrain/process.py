"""A retrain run in a child OS process, so CatBoost never competes with request handling.

The parent claims the run's row, starts `python -m retrain.child RUN_ID`, and watches it: past
`retrain_timeout_s` it kills the child, and a child that exits without finishing its row gets the run
marked failed with its exit code or signal.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from pydantic import SecretStr
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core.db import Clock, make_engine, make_sessions, utcnow, wait_out_outage
from core.metrics import Metrics
from core.schema import RetrainRun, RunStatus
from core.settings import Settings
from retrain import RETRAIN_LOGGER
from retrain.runs import fail_run, observe_run, start_run

log = logging.getLogger(RETRAIN_LOGGER)

CHILD_MODULE = "retrain.child"
SETTINGS_ENV = "DRIFTLOOP_RETRAIN_SETTINGS"  # the parent's Settings as JSON, for the child
SPEC_SHA256_ENV = "DRIFTLOOP_RETRAIN_SPEC_SHA256"  # the spec file as the parent read it, for the child


class RunHandle:
    """A launched run: its id, the child's pid, and the parent's view of when it ended."""

    def __init__(self, run_id: int, process: subprocess.Popen[bytes]) -> None:
        self.run_id = run_id
        self.pid = process.pid
        self._process = process
        self._done = threading.Event()
        self._status: str = RunStatus.running.value

    def poll(self) -> str | None:
        """The run's final status, or None while the child is still running."""
        return self._status if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> str:
        """Block until the run ends (or `timeout` s pass); the run's status, `running` if not yet ended."""
        self._done.wait(timeout)
        return self._status

    def _finished(self, status: str) -> None:
        self._status = status
        self._done.set()


def child_env(settings: Settings, *, spec_sha256: str = "") -> dict[str, str]:
    """The child's environment: ours without DRIFTLOOP_* overrides, plus our settings as JSON (no secrets)
    and the sha256 of the spec file as we read it (the child refuses to run under a file changed since)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLOOP_")}
    secrets = {name for name, value in settings if isinstance(value, SecretStr)}
    env[SETTINGS_ENV] = json.dumps(settings.model_dump(mode="json", exclude=secrets))
    if spec_sha256:
        env[SPEC_SHA256_ENV] = spec_sha256
    return env


def launch(
    *,
    settings: Settings,
    trigger: str,
    reason: str = "",
    report_id: int | None = None,
    sessions: sessionmaker[Session] | None = None,
    metrics: Metrics | None = None,
    clock: Clock = utcnow,
    spec_sha256: str = "",
    count: bool = True,
) -> RunHandle:
    """Claim the single-flight slot here (RunInProgress at once if taken), then run it in a child process.

    A daemon thread waits on the child: past settings.retrain_timeout_s it kills it; a child that exits
    without finishing its row gets the run marked failed with its exit code or signal. With `count`, it then
    counts the run in `metrics`; the loop passes False and counts the runs it announces, once each.
    """
    engine = None
    if sessions is None:
        engine = make_engine(settings.database_url)
        sessions = make_sessions(engine)
    try:
        run_id = start_run(sessions, trigger=trigger, reason=reason, report_id=report_id, now=clock())
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", CHILD_MODULE, str(run_id)],
                env=child_env(settings, spec_sha256=spec_sha256),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            fail_run(sessions, run_id, error=f"could not start the child process: {exc}", now=clock())
            raise
    except BaseException:
        if engine is not None:
            engine.dispose()
        raise
    with sessions.begin() as session:
        session.execute(update(RetrainRun).where(RetrainRun.id == run_id).values(pid=process.pid))
    if metrics is not None:
        metrics.retrain_running.set(1)
    handle = RunHandle(run_id, process)
    watcher = threading.Thread(
        target=_watch,
        kwargs={
            "handle": handle,
            "process": process,
            "sessions": sessions,
            "timeout_s": settings.retrain_timeout_s,
            # The leader fails a run with no heartbeat for 3 lease TTLs: until then, recording the child's
            # exit is this process's to do, and worth waiting out a database outage for.
            "retry_s": 3 * settings.lease_ttl_s,
            "metrics": metrics,
            "count": count,
            "clock": clock,
            "on_done": engine.dispose if engine is not None else None,
        },
        name=f"retrain-watch-{run_id}",
        daemon=True,
    )
    watcher.start()
    return handle


def _watch(
    *,
    handle: RunHandle,
    process: subprocess.Popen[bytes],
    sessions: sessionmaker[Session],
    timeout_s: float,
    metrics: Metrics | None,
    clock: Clock,
    on_done: Callable[[], None] | None,
    retry_s: float = 0.0,
    count: bool = True,
) -> None:
    status = RunStatus.failed.value
    try:
        try:
            code = process.wait(timeout=timeout_s)
            error = f"child process {process.pid} {_describe_exit(code)} before finishing the run"
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            error = f"timed out after {timeout_s:g} s; child process {process.pid} killed"

        def record() -> str | None:
            fail_run(sessions, handle.run_id, error=error, now=clock())  # no-op if the child finished it
            with sessions() as session:
                return session.scalar(select(RetrainRun.status).where(RetrainRun.id == handle.run_id))

        # a child that died on a database outage exits while it lasts: wait it out, bounded
        status = wait_out_outage(record, patience_s=retry_s) or status
        if metrics is not None and count:
            observe_run(metrics, sessions, handle.run_id)
        elif metrics is not None:
            metrics.retrain_running.set(0)
    except Exception:
        log.exception("watching retrain run %s failed", handle.run_id)
    finally:
        handle._finished(status)
        if on_done is not None:
            on_done()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
