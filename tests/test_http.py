"""Real HTTP through uvicorn: every answered prediction is logged (bursts, DB outages, SIGTERM, swaps)."""

import itertools
import json
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import psycopg
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from bench.loadgen import LoadResult, json_payloads, run_load
from core.db import make_engine, make_sessions, unreachable
from core.generator import generate_transactions
from core.registry import NewVersion, Registry
from core.schema import PredictionLog, Trigger
from retrain.train import reference_snapshot
from service.process import stop_server
from tests.conftest import make_settings
from tests.live import start_server, wait_until

ADMIN = {"Authorization": "Bearer test-admin-token"}


@pytest.fixture
def payloads(spec) -> list[bytes]:
    rows = generate_transactions(500, start="2022-01-01", end="2022-03-31", seed=21)[spec.feature_names]
    return json_payloads(rows.to_dict("records"))


def logged_ids(db_url: str) -> list[str]:
    engine = make_engine(db_url)
    try:
        with make_sessions(engine)() as session:
            return list(session.scalars(select(PredictionLog.id)))
    finally:
        engine.dispose()


def in_background(target, *args, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_burst_every_answered_prediction_is_logged_once(champion, db_url, tmp_path, payloads) -> None:
    server = start_server(make_settings(db_url, tmp_path), tmp_path)
    try:
        result = run_load(server.url + "/predict", payloads, total=5000, concurrency=16, max_seconds=120,
                          keep_bodies=True)  # fmt: skip
        assert (result.sent, result.ok, result.errors) == (5000, 5000, [])
        assert server.metric('driftloop_logger_rows_total{outcome="dropped"}') == 0
    finally:
        assert server.terminate()
    ids = logged_ids(db_url)
    assert len(ids) == 5000
    assert set(ids) == set(result.prediction_ids())


@pytest.mark.slow
def test_sigterm_mid_burst_loses_no_answered_prediction(champion, db_url, tmp_path, payloads) -> None:
    # The writer waits for a batch it never gets before the signal: every row reaches the database through
    # the shutdown drain (with the usual 0.2 s flush, a server that skipped the drain would pass too).
    settings = make_settings(db_url, tmp_path, log_batch_size=100_000, log_flush_interval_s=600)
    server = start_server(settings, tmp_path)
    result = LoadResult()
    load = in_background(
        run_load, server.url + "/predict", payloads, total=50_000, concurrency=16, max_seconds=120,
        keep_bodies=True, result=result,
    )  # fmt: skip
    wait_until(lambda: result.ok >= 2000, timeout=60, what="2,000 answered predictions")
    assert logged_ids(db_url) == []  # all of them still queued in the server
    assert server.terminate()
    load.join(timeout=120)
    answered = set(result.prediction_ids())
    ids = logged_ids(db_url)
    assert len(ids) == len(set(ids))
    assert answered <= set(ids)  # a request cut off mid-answer may be logged without being answered
    assert len(answered) >= 2000
    assert "Waiting for application shutdown" in server.log()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_database_down_mid_burst_spools_then_replays_exactly_once(
    champion, db_url, pg_cluster, tmp_path, payloads
) -> None:
    server = start_server(make_settings(db_url, tmp_path, spool_replay_interval_s=0.2), tmp_path)
    try:
        result = LoadResult()
        load = in_background(
            run_load, server.url + "/predict", payloads, total=6000, concurrency=8, max_seconds=180,
            keep_bodies=True, result=result,
        )  # fmt: skip
        wait_until(lambda: result.ok >= 1500, timeout=60, what="1,500 answered predictions")
        pg_cluster.stop()
        try:
            wait_until(lambda: result.ok >= 3500, timeout=60, what="predictions while PostgreSQL is down")
            # Still ready: its answers are spooled, and every replica shares the database.
            ready = server.get("/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["problems"] == [
                "database unreachable: OperationalError; predictions go to the spool and are replayed when "
                "it answers, labels and model operations are refused"
            ]
        finally:
            pg_cluster.start()
        load.join(timeout=180)
        assert (result.sent, result.ok) == (6000, 6000)
        spooled = wait_until(
            lambda: (
                server.metric('driftloop_logger_rows_total{outcome="replayed"}')
                == server.metric('driftloop_logger_rows_total{outcome="spooled"}')
                and server.metric("driftloop_logger_spool_rows") == 0
                and server.metric('driftloop_logger_rows_total{outcome="spooled"}')
            ),
            timeout=60,
            what="the spool to be replayed",
        )
        assert spooled
        assert server.metric('driftloop_logger_rows_total{outcome="dropped"}') == 0
    finally:
        assert server.terminate()
    ids = logged_ids(db_url)
    assert len(ids) == 6000
    assert set(ids) == set(result.prediction_ids())


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_replica_that_can_neither_log_nor_spool_is_not_ready(
    champion, db_url, pg_cluster, tmp_path
) -> None:
    """With the database down and the spool unwritable (here a file where its directory should be), every
    answer is lost: only then does /ready take the replica out, and it comes back once rows are kept."""
    server = start_server(make_settings(db_url, tmp_path, spool_replay_interval_s=0.2), tmp_path)
    shutil.rmtree(tmp_path / "spool")  # made and claimed by the start
    (tmp_path / "spool").write_text("not a directory")  # after the start, which refuses one (settings)
    try:
        assert httpx.post(f"{server.url}/predict", json=INSTANCE, timeout=30).status_code == 200
        assert server.get("/ready").status_code == 200
        pg_cluster.stop()
        try:
            assert httpx.post(f"{server.url}/predict", json=INSTANCE, timeout=30).status_code == 200
            wait_until(
                lambda: server.metric('driftloop_logger_rows_total{outcome="dropped"}') >= 1,
                timeout=30,
                what="the answer to be dropped",
            )
            ready = server.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["problems"][0] == (
                "database unreachable and the spool write failing: answered predictions are dropped"
            )
        finally:
            pg_cluster.start()
        (tmp_path / "spool").unlink()
        httpx.post(f"{server.url}/predict", json=INSTANCE, timeout=30)
        wait_until(lambda: server.get("/ready").status_code == 200, timeout=60, what="ready again")
    finally:
        assert server.terminate()


@pytest.mark.parametrize(
    ("cause", "outage"),
    [
        (psycopg.errors.ConnectionFailure("gone"), True),
        (psycopg.errors.OperationalError("connection refused"), True),  # no SQLSTATE: never connected
        (psycopg.errors.AdminShutdown("terminating"), True),
        (psycopg.errors.SerializationFailure("retry"), True),
        (psycopg.errors.LockNotAvailable("busy"), True),
        (psycopg.errors.ProgramLimitExceeded("index row too big"), False),  # retrying cannot cure it
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("no such table: model_version"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_only_a_database_outage_is_one_to_wait_out(cause: Exception, outage: bool) -> None:
    """503 'retry' for what passes (the connection, a lock, the server shutting down), 500 for a fault."""
    assert unreachable(OperationalError("SELECT 1", {}, cause)) is outage


def test_a_pool_with_no_connection_free_in_time_is_an_outage_to_wait_out() -> None:
    """Every pooled connection held by a request waiting on a database that does not reply."""
    assert unreachable(PoolTimeout("QueuePool limit of size 5 overflow 10 reached")) is True


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_database_that_does_not_reply_leaves_ready_and_predict_answering_and_labels_503(
    champion, db_url, pg_cluster, tmp_path
) -> None:
    """A frozen PostgreSQL (connections open, no reply): 60 labels posted at once hold every thread sync
    routes share, and /ready, which needed one, went unanswered; those that found no pooled connection within
    its 30 s were a 500 with a traceback. /ready answers, names it, and stays 200; those labels are 503."""
    server = start_server(make_settings(db_url, tmp_path), tmp_path)
    try:
        answered = httpx.post(f"{server.url}/predict", json=INSTANCE, timeout=30).json()["prediction_id"]
        wait_until(lambda: answered in logged_ids(db_url), timeout=30, what="the prediction to be stored")
        label = [{"prediction_id": answered, "actual": 1.0}]
        answers: list[httpx.Response] = []

        def post_label() -> None:
            answers.append(httpx.post(f"{server.url}/feedback", json=label, timeout=120))

        with pg_cluster.frozen():
            posts = [in_background(post_label) for _ in range(60)]
            time.sleep(
                5
            )  # pacing, not an assertion: the posts take every thread long before the pool gives up
            ready = httpx.get(f"{server.url}/ready", timeout=15)
            assert (ready.status_code, ready.json()["ready"]) == (200, True), ready.text
            assert ready.json()["problems"][0].startswith("database not answering: SELECT 1 has waited ")
            assert httpx.post(f"{server.url}/predict", json=INSTANCE, timeout=30).status_code == 200
            wait_until(lambda: answers, timeout=60, what="the first label to find no pooled connection")
        for post in posts:
            post.join(timeout=120)
        statuses = {a.status_code for a in answers}
        assert len(answers) == 60 and statuses <= {200, 503}, [
            a.text for a in answers if a.status_code != 200
        ]
        assert 503 in statuses
        unavailable = next(a for a in answers if a.status_code == 503)
        assert unavailable.headers.get("retry-after") == "5"
        assert unavailable.json() == {
            "error": "unavailable",
            "message": "database unavailable: nothing was stored; retry the same request",
        }
    finally:
        assert server.terminate()
    assert "internal error on" not in server.log()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_reads_and_operations_in_a_database_outage_are_503_to_retry_not_500(
    champion, db_url, pg_cluster, tmp_path
) -> None:
    """The registry, reports and runs live in the database: while it is down they are unavailable (503
    with Retry-After, one log line each), not a fault of ours (500 with a traceback); predictions go on."""
    server = start_server(make_settings(db_url, tmp_path, spool_replay_interval_s=0.2), tmp_path)
    try:
        assert server.get("/models").status_code == 200
        answered = httpx.post(f"{server.url}/predict", json=INSTANCE, timeout=30).json()["prediction_id"]
        wait_until(lambda: answered in logged_ids(db_url), timeout=30, what="the prediction to be stored")
        pg_cluster.stop()
        try:
            for method, path in [("GET", "/models"), ("GET", "/reports"), ("GET", "/retrain/runs"),
                                 ("POST", "/models/rollback")]:  # fmt: skip
                answer = httpx.request(method, server.url + path, headers=ADMIN, timeout=30)
                assert (answer.status_code, answer.headers.get("retry-after")) == (503, "5"), answer.text
                assert answer.json() == {
                    "error": "unavailable",
                    "message": "database unavailable (OperationalError): retry shortly",
                }
            label = [{"prediction_id": answered, "actual": 1.0}]
            answer = httpx.post(f"{server.url}/feedback", json=label, timeout=30)
            assert (answer.status_code, answer.headers.get("retry-after")) == (503, "5"), answer.text
            assert answer.json() == {
                "error": "unavailable",
                "message": "database unavailable: nothing was stored; retry the same request",
            }
            assert httpx.post(f"{server.url}/predict", json=INSTANCE, timeout=30).status_code == 200
        finally:
            pg_cluster.start()
        wait_until(lambda: server.get("/models").status_code == 200, timeout=60, what="the registry back")
        assert httpx.post(f"{server.url}/feedback", json=label, timeout=30).json()["accepted"] == 1
    finally:
        assert server.terminate()
    assert "GET /models: database unavailable (OperationalError: " in server.log()
    assert "internal error on" not in server.log()


@pytest.mark.slow
def test_promote_and_rollback_swap_under_load_without_a_failed_request(
    champion, registry: Registry, db_url, tmp_path, payloads, spec
) -> None:
    model = registry.load(champion)
    v2 = registry.register(
        NewVersion(
            model=model, reference=reference_snapshot(model, registry.reference(champion), spec),
            trigger=Trigger.manual, metrics={"val_mae": 1.0}, params={}, train_rows=1, parent_version=1,
        )
    )  # fmt: skip
    server = start_server(make_settings(db_url, tmp_path, champion_poll_s=0.2), tmp_path)
    try:
        result = LoadResult()
        load = in_background(
            run_load, server.url + "/predict", payloads, total=200_000, concurrency=8, max_seconds=60,
            keep_bodies=True, result=result,
        )  # fmt: skip
        wait_until(lambda: result.ok >= 500, timeout=60, what="traffic")
        assert server.post(f"/models/{v2.version}/promote", headers=ADMIN).status_code == 200
        wait_until(lambda: served_version(result) == 2, timeout=10, what="the service to answer with v2")
        assert server.post("/models/rollback", headers=ADMIN).json()["version"] == 1
        wait_until(
            lambda: served_version(result) == 1, timeout=10, what="the service to answer with v1 again"
        )
        seen = result.ok
        wait_until(lambda: result.ok >= seen + 200, timeout=30, what="more traffic after the rollback")
    finally:
        result.stop()
        load.join(timeout=120)
        assert server.terminate()
    assert result.errors == []
    assert result.failed == 0
    versions = [json.loads(b)["model_version"] for b in result.bodies]
    assert versions[0] == 1 and versions[-1] == 1 and 2 in versions
    swaps = sum(1 for a, b in itertools.pairwise(versions) if a != b)
    assert swaps >= 2


def served_version(result: LoadResult) -> int | None:
    return json.loads(result.bodies[-1])["model_version"] if result.bodies else None


def http_exchange(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on a kept-alive socket; its status and body (content-length framed)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"the server closed the connection; got {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            v
            for k, v in (h.split(b":", 1) for h in head.split(b"\r\n")[1:])
            if k.lower() == b"content-length"
        )
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-body")
        body += chunk
    return int(head.split(b" ")[1]), body


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_fault_of_ours_answers_500_and_keeps_the_connection_for_the_next_request(
    champion, db_url, tmp_path
) -> None:
    # Without Faults, uvicorn drops a connection after a 500 and a client's next request on it is reset.
    settings = make_settings(db_url, tmp_path, scheduler=False)
    server = start_server(settings, tmp_path, command=("serve", "--access-log"))
    try:
        engine = make_engine(db_url)
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE drift_report"))  # a fault the routes do not foresee
        engine.dispose()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            get = b"GET %s HTTP/1.1\r\nHost: test\r\nX-Request-ID: lb-7f3a\r\n\r\n"
            status, body = http_exchange(sock, get % b"/reports")
            assert (status, json.loads(body)) == (
                500,
                {
                    "error": "internal",
                    "message": "internal error (OperationalError); the service log has the details, "
                    "under request lb-7f3a",
                },
            )
            assert http_exchange(sock, get % b"/health") == (200, b'{"status":"ok"}')
        assert server.metric('driftloop_http_errors_total{endpoint="/reports",status="500"}') == 1
        # the id the client was given names the traceback in the log
        assert "internal error on GET /reports (request lb-7f3a)\nTraceback" in server.log()
        given = server.get("/health").headers["x-request-id"]  # none sent: the one made for it
    finally:
        assert server.terminate()
    # and the access log's lines: every request's own id, the one made for a request that sent none too
    access = [
        re.sub(r'" (\d+) [^(]*\(', r'" \1 (', line.split(" - ", 1)[1])  # uvicorn ≥ 0.32 adds the phrase
        for line in server.log().splitlines()
        if '"GET /' in line
    ]
    assert access[-4:] == [
        '"GET /reports HTTP/1.1" 500 (request lb-7f3a)',
        '"GET /health HTTP/1.1" 200 (request lb-7f3a)',
        access[-2],  # server.metric's scrape
        f'"GET /health HTTP/1.1" 200 (request {given})',
    ]
    # start_server's probes and the scrape: ids made here, each its own
    made = [re.fullmatch(r'"GET /\w+ HTTP/1.1" 200 \(request ([0-9a-f]{32})\)', line) for line in access]
    assert all(made[:-4]) and made[-2] and len({m[1] for m in made if m}) == len(access) - 2


INSTANCE = {
    "district": "Mapo-gu", "area_m2": 84.5, "floor": 12, "build_year": 2008, "households": 950,
    "subway_distance_m": 420.0,
}  # fmt: skip


@pytest.mark.slow
def test_the_same_id_labelled_twice_at_once_is_stored_once_without_an_error(
    champion, db_url, tmp_path
) -> None:
    # Both requests read "no label yet" and insert; the later insert broke the primary key: a 500, before.
    server = start_server(make_settings(db_url, tmp_path, scheduler=False), tmp_path)
    try:
        batch = server.post("/predict/batch", json={"instances": [INSTANCE] * 60}).json()
        ids = [p["prediction_id"] for p in batch["predictions"]]
        answers: dict[str, list[tuple[int, dict]]] = {pid: [] for pid in ids}

        def send(pid: str, actual: float, barrier: threading.Barrier) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                barrier.wait()
                response = client.post("/feedback", json=[{"prediction_id": pid, "actual": actual}])
                answers[pid].append((response.status_code, response.json()))

        for i, pid in enumerate(ids):  # the same label for even ids, two different ones for odd ids
            barrier = threading.Barrier(2)
            for thread in [
                in_background(send, pid, 100_000.0, barrier),
                in_background(send, pid, 100_000.0 + i % 2, barrier),
            ]:
                thread.join(timeout=60)
    finally:
        assert server.terminate()
    for i, pid in enumerate(ids):
        assert [status for status, _ in answers[pid]] == [200, 200]
        outcomes = sorted(
            k for _, body in answers[pid] for k in ("accepted", "updated", "duplicate") if body[k]
        )
        assert outcomes == ["accepted", "updated" if i % 2 else "duplicate"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("scheduler", "command", "interval"),
    [(True, ("serve",), 77), (False, ("serve",), 0), (True, ("serve", "--no-scheduler"), 0)],
)
def test_serve_runs_the_scheduler_as_driftloop_scheduler_and_no_scheduler_say(
    champion, db_url, tmp_path, scheduler, command, interval
) -> None:
    # `serve` passed scheduler=True unless --no-scheduler: DRIFTLOOP_SCHEDULER=false (documented) did nothing.
    settings = make_settings(db_url, tmp_path, scheduler=scheduler, monitor_interval_s=77)
    server = start_server(settings, tmp_path, command=command)
    try:
        assert (
            server.metric("driftloop_monitor_interval_seconds") == interval
        )  # set when the scheduler starts
    finally:
        assert server.terminate()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("command", [("serve",), ("worker",)])
def test_log_level_quiets_driftloop_s_own_logs_as_well_as_uvicorn_s(
    champion, db_url, tmp_path, command
) -> None:
    """--log-level set uvicorn's loggers only: at warning, driftloop's INFO lines (the champion loaded, the
    scheduler started) went on."""
    settings = make_settings(db_url, tmp_path, monitor_interval_s=3600)
    logs = []
    for level in ("info", "warning"):
        server = start_server(settings, tmp_path, command=(*command, "--log-level", level))
        try:
            assert server.get("/health").status_code == 200
        finally:
            assert server.proc.poll() is None
            server.proc.terminate()
            server.proc.wait(timeout=60)
        logs.append(server.log())
    loud, quiet = ([line for line in log.splitlines() if " INFO " in line] for log in logs)
    assert any(" INFO driftloop." in line for line in loud), logs[0]
    assert quiet == [], logs[1]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_client_gone_mid_body_is_counted_as_499_not_as_our_fault(champion, db_url, tmp_path) -> None:
    """A client that hangs up before its body is in is no fault of ours: not an internal error in the log,
    not a 500 in the error counters HighErrorRate watches, but 499 (nginx's "client closed request")."""
    server = start_server(make_settings(db_url, tmp_path, scheduler=False), tmp_path)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        head = b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        # A declared length the body never reaches (a lean route and a FastAPI one), and a chunked body cut
        # off before its last chunk.
        for request in (
            head % b"/predict" + b'Content-Length: 1000\r\n\r\n{"district": ',
            head % b"/feedback" + b'Transfer-Encoding: chunked\r\n\r\n5\r\n[{"pr\r\n',
            head % b"/feedback" + b'Content-Length: 1000\r\n\r\n[{"prediction_id": ',
        ):
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(request)

        def counted(name: str) -> float | None:
            try:
                return server.metric(name)
            except KeyError:
                return None

        wait_until(
            lambda: counted('driftloop_http_requests_total{endpoint="/feedback",status="499"}') == 2,
            timeout=30,
            what="the hang-ups on /feedback to be counted",
        )
        assert counted('driftloop_http_requests_total{endpoint="/predict",status="499"}') == 1
        # The chunked one, which BodyLimit reads before any route is matched, counts under its route too.
        assert counted('driftloop_http_requests_total{endpoint="unmatched",status="499"}') is None
        exposition = server.get("/metrics").text
        assert 'status="500"' not in exposition and 'status="422"' not in exposition
        assert server.log().count("client closed the connection before its body was in: POST") == 3
        assert "internal error" not in server.log()
        assert httpx.post(f"{server.url}/predict", json=INSTANCE, timeout=30).status_code == 200
    finally:
        assert server.terminate()


def test_a_server_that_exits_before_answering_is_reported_with_its_log(tmp_path, sqlite_url) -> None:
    with pytest.raises(RuntimeError) as raised:
        start_server(make_settings(sqlite_url, tmp_path), tmp_path, command=("serve", "--no-such-option"))
    assert "process exited with 2 before" in str(raised.value)
    assert "No such option: --no-such-option" in str(raised.value)  # the tail of its own log


def test_a_process_that_ignores_sigterm_is_killed_once_the_wait_is_over() -> None:
    ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1); time.sleep(60)"
    with subprocess.Popen([sys.executable, "-u", "-c", ignores], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdout.readline() == b"1\n"  # its handler is set
        stop_server(proc, timeout=1)
    assert proc.returncode == -signal.SIGKILL
