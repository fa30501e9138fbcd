"""Scale-out mode on real processes: API replicas (`serve --no-scheduler`) and workers sharing one database;
exactly one worker leads, monitors what the replicas logged, and a standby takes over when it stops."""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.generator import generate_transactions
from core.schema import DriftReport, ModelVersion
from core.spec import FeatureSpec
from service.worker import create_worker_app
from tests.conftest import make_settings
from tests.live import LiveServer, start_server, wait_until


def leader(worker: LiveServer) -> bool:
    return bool(worker.get("/health").json()["leader"])


def monitor_runs(server: LiveServer) -> float:
    text = server.get("/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("driftloop_monitor_runs_total{")
    )


def reports(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count(DriftReport.id))) or 0)


def test_one_worker_leads_monitors_the_replicas_traffic_and_a_standby_takes_over(
    db_url: str,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    champion: ModelVersion,
    spec: FeatureSpec,
) -> None:
    settings = make_settings(db_url, tmp_path, monitor_interval_s=1, lease_ttl_s=1.5)
    api = start_server(settings, tmp_path, command=("serve", "--no-scheduler"))
    first = start_server(settings, tmp_path, command=("worker",))
    standby: LiveServer | None = None
    try:
        wait_until(lambda: leader(first), timeout=30, what="the first worker to take the lease")
        standby = start_server(settings, tmp_path, command=("worker",))
        sales = generate_transactions(400, start="2022-01-01", end="2022-06-30", seed=5)
        instances = sales[spec.feature_names].to_dict("records")
        answer = httpx.post(api.url + "/predict/batch", json={"instances": instances}, timeout=60)
        assert answer.status_code == 200

        wait_until(lambda: reports(sessions) >= 2, timeout=60, what="the leader to monitor logged traffic")
        assert leader(standby) is False  # the lease is held: the standby idles
        assert monitor_runs(first) >= 2
        assert monitor_runs(standby) == 0
        assert monitor_runs(api) == 0  # a replica never monitors on its own

        assert first.terminate()  # releases the lease on the way out
        wait_until(lambda: leader(standby), timeout=30, what="the standby to take over the lease")
        before = monitor_runs(standby)
        wait_until(lambda: monitor_runs(standby) > before, timeout=30, what="the new leader to monitor")
    finally:
        for server in (api, first, standby):
            if server is not None:
                server.terminate()


def test_the_worker_does_not_log_every_probe_and_scrape(sqlite_url: str, tmp_path: Path) -> None:
    """A worker's requests are health probes and Prometheus scrapes: one access-log line each would bury
    its monitor verdicts and lease changes, so, like `serve`, it logs them only with --access-log."""
    worker = start_server(make_settings(sqlite_url, tmp_path), tmp_path, command=("worker",))
    try:
        for _ in range(3):
            assert worker.get("/health").status_code == 200
            assert worker.get("/metrics").status_code == 200
    finally:
        assert worker.terminate()
    assert "scheduler lease taken by" in worker.log()
    assert "GET /health" not in worker.log() and "GET /metrics" not in worker.log()


def test_the_worker_answers_head_and_errors_as_the_api_does(sqlite_url: str, tmp_path: Path) -> None:
    """The README's `curl -I /health` was 405 on the worker, and its 404 was FastAPI's {"detail": …}
    rather than the {"error", "message"} every API error has. No lifespan: the scheduler is not needed."""
    client = TestClient(create_worker_app(make_settings(sqlite_url, tmp_path)))
    head = client.head("/health")
    assert (head.status_code, head.content) == (200, b"")
    missing = client.get("/ready")
    assert (missing.status_code, missing.json()) == (
        404,
        {"error": "not_found", "message": "no route takes the path '/ready': GET /docs lists them"},
    )
