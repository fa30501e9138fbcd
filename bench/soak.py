"""Soak run: does a long-running deployment leak?

bootstrap, then `serve --no-scheduler` and `worker` on 127.0.0.1 (SQLite in a temp directory), under steady
paced traffic (/predict and /predict/batch), delayed /feedback for a share of the answers, and inputs that
switch between the stable stream and a drifted one every --phase-minutes, so the monitor breaches, retrains
run and the API hot-swaps many times. Every --sample-s it records each process's RSS, open fds and threads,
the database size and the files under the report, artifact and spool directories; at the end it writes
soak.csv and soak.png to --out and prints start/end/max of each series and what the loop did.
Bounded in time; every process it starts is stopped.
    .venv/bin/python bench/soak.py [--minutes 35] [--out var/soak] [--postgres] [--keep-state]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.generator import generate_transactions  # noqa: E402
from core.spec import load_spec  # noqa: E402
from service.process import start_server, stop_server  # noqa: E402

ADMIN = "soak-admin-token"
PHASES = ("none", "unit_bug", "none", "new_town")  # each switch is drift against the newest champion
PROCS = ("serve", "worker")
RSS = ("rss_kb", "rss_anon_kb")


def soak_env(state: Path, database_url: str, args: argparse.Namespace) -> dict[str, str]:
    own = {
        "DATABASE_URL": database_url,
        "ARTIFACT_DIR": str(state / "artifacts"),
        "SPOOL_DIR": str(state / "spool"),
        "REPORT_DIR": str(state / "reports"),
        "ADMIN_TOKEN": ADMIN,
        "MONITOR_INTERVAL_S": str(args.monitor_interval_s),
        "WINDOW_ROWS": "2000",
        "MIN_WINDOW_ROWS": "500",
        "ACCURACY_WINDOW_ROWS": "500",
        "MIN_LABELLED_ROWS": "200",
        "CONSECUTIVE_BREACHES": "2",
        "RETRAIN_COOLDOWN_S": str(args.cooldown_s),
        "MAX_RETRAINS_PER_DAY": "1000",
        "REPORT_HTML_KEEP": str(args.html_keep),
        "TRAIN_ITERATIONS": "100",
        "CHAMPION_POLL_S": "2",
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLOOP_")}
    return clean | {f"DRIFTLOOP_{k}": v for k, v in own.items()}


class Traffic:
    """Paced predict/batch/feedback/read loops on threads; counts answers and non-2xx by endpoint."""

    def __init__(self, url: str, args: argparse.Namespace, deadline: float) -> None:
        self.url, self.args, self.deadline = url, args, deadline
        self.spec = load_spec()
        self.started = time.monotonic()
        self.answered: dict[str, int] = {}
        self.non_2xx: dict[str, int] = {}
        self.errors: list[str] = []
        self.labels: deque[tuple[float, str, float]] = deque(maxlen=200_000)
        self.lock = threading.Lock()
        self.pools = {s: self._rows(s, k) for k, s in enumerate(sorted(set(PHASES)))}

    def _rows(self, scenario: str, seed: int) -> list[tuple[dict[str, Any], float]]:
        frame = generate_transactions(
            5000, start="2026-01-01", end="2026-06-30", scenario=scenario, change_at="2025-12-01", seed=seed
        )
        return list(
            zip(frame[self.spec.feature_names].to_dict("records"), frame[self.spec.target], strict=True)
        )

    def phase(self) -> str:
        return PHASES[int((time.monotonic() - self.started) / 60 / self.args.phase_minutes) % len(PHASES)]

    def _count(self, endpoint: str, response: httpx.Response | None, error: str | None = None) -> None:
        with self.lock:
            if response is not None and response.is_success:
                self.answered[endpoint] = self.answered.get(endpoint, 0) + 1
            else:
                self.non_2xx[endpoint] = self.non_2xx.get(endpoint, 0) + 1
                if error and len(self.errors) < 20:
                    self.errors.append(error)

    def _post(self, client: httpx.Client, path: str, body: Any) -> httpx.Response | None:
        try:
            response = client.post(path, json=body)
        except httpx.HTTPError as exc:
            self._count(path, None, f"{path}: {exc!r}")
            return None
        self._count(path, response, f"{path}: {response.status_code} {response.text[:200]}")
        return response if response.is_success else None

    def _paced(self, per_second: float, step: Any) -> None:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        with httpx.Client(base_url=self.url, timeout=30, headers=headers) as client:
            for tick in itertools.count():
                at = self.started + tick / per_second
                if at >= self.deadline:
                    return
                time.sleep(max(0.0, at - time.monotonic()))
                step(client, tick)

    def predict(self, client: httpx.Client, tick: int) -> None:
        features, actual = self.pools[self.phase()][tick % 5000]
        if (response := self._post(client, "/predict", features)) is not None:
            self._label(response.json()["prediction_id"], actual, tick)

    def batch(self, client: httpx.Client, tick: int) -> None:
        pool, size = self.pools[self.phase()], self.args.batch_size
        rows = [pool[(tick * size + i) % 5000] for i in range(size)]
        if (response := self._post(client, "/predict/batch", {"instances": [f for f, _ in rows]})) is None:
            return
        for answer, (_, actual) in zip(response.json()["predictions"], rows, strict=True):
            self._label(answer["prediction_id"], actual, tick)

    def _label(self, prediction_id: str, actual: float, tick: int) -> None:
        if (hash(prediction_id) % 100) < self.args.label_percent:
            with self.lock:
                self.labels.append((time.monotonic(), prediction_id, actual))

    def feed(self, client: httpx.Client, tick: int) -> None:
        due: list[tuple[float, str, float]] = []
        cutoff = time.monotonic() - self.args.label_delay_s
        with self.lock:
            while self.labels and self.labels[0][0] <= cutoff and len(due) < 1000:
                due.append(self.labels.popleft())
        if due:
            self._post(client, "/feedback", [{"prediction_id": i, "actual": a} for _, i, a in due])

    def read(self, client: httpx.Client, tick: int) -> None:
        path = ("/reports", "/models", "/retrain/runs", "/metrics", "/reports/latest", "/ready")[tick % 6]
        try:
            self._count(path, client.get(path))
        except httpx.HTTPError as exc:
            self._count(path, None, f"{path}: {exc!r}")

    def threads(self) -> list[threading.Thread]:
        loops = [
            (self.args.rate, self.predict),
            (self.args.batch_rate, self.batch),
            (4, self.feed),
            (1, self.read),
        ]
        return [threading.Thread(target=self._paced, args=loop, daemon=True) for loop in loops]


def proc_figures(pid: int) -> dict[str, int]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {
        "rss_kb": int(status["VmRSS"].split()[0]),
        "rss_anon_kb": int(status["RssAnon"].split()[0]),  # the heap; VmRSS also counts mapped files
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(status["Threads"]),
        "children": len(children),
    }


def files_under(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def sample(
    state: Path, pids: dict[str, int], urls: dict[str, str], elapsed: float, db_bytes: Callable[[], int]
) -> dict[str, Any]:
    row: dict[str, Any] = {"elapsed_s": round(elapsed, 1)}
    for name, pid in pids.items():
        row |= {f"{name}_{k}": v for k, v in proc_figures(pid).items()}
    row["db_bytes"] = db_bytes()
    for name in ("reports", "artifacts", "spool"):
        row[f"{name}_files"] = files_under(state / name)
    row |= loop_counters(urls)
    return row


def loop_counters(urls: dict[str, str]) -> dict[str, int]:
    """Monitor runs (worker), swaps and predictions (serve), from their /metrics."""
    wanted = {
        "monitor_runs": ("worker", "driftloop_monitor_runs_total"),
        "swaps": ("serve", "driftloop_model_swaps_total"),
        "retrains": ("worker", "driftloop_retrain_runs_total"),
        "predictions": ("serve", "driftloop_predictions_total"),
    }
    texts = {name: httpx.get(url + "/metrics", timeout=10).text for name, url in urls.items()}
    out = {}
    for key, (proc, metric) in wanted.items():
        lines = [
            line
            for line in texts[proc].splitlines()
            if line.startswith(metric + "{") or line.startswith(metric + " ")
        ]
        out[key] = int(sum(float(line.rsplit(" ", 1)[1]) for line in lines))
    return out


def database(state: Path, postgres: bool, stack: ExitStack) -> tuple[str, Callable[[], int]]:
    """A SQLite file in `state`, or a database on a throwaway PostgreSQL cluster (the test suite's), and how
    to measure its size."""
    if not postgres:
        db = state / "driftloop.db"
        return f"sqlite:///{db}", lambda: sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
    from tests.pgcluster import PgCluster

    cluster = stack.enter_context(PgCluster())

    def size() -> int:
        with cluster.connect("soak") as conn:
            return int(conn.execute("SELECT pg_database_size('soak')").fetchone()[0])  # type: ignore[index]

    return cluster.create_database("soak"), size


def plot(rows: list[dict[str, Any]], runs: list[dict[str, Any]], t0: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[tuple[str, float]]]] = [
        ("RSS (MiB; anon: the heap)", [(f"{p}_{k}", 1 / 1024) for p in PROCS for k in RSS]),
        ("open fds", [(f"{p}_fds", 1) for p in PROCS]),
        ("threads", [(f"{p}_threads", 1) for p in PROCS]),
        ("database (MiB)", [("db_bytes", 1 / 2**20)]),
        ("files", [("reports_files", 1), ("artifacts_files", 1), ("spool_files", 1)]),
        ("loop (cumulative)", [("monitor_runs", 1), ("retrains", 1), ("swaps", 1)]),
    ]
    minutes = [r["elapsed_s"] / 60 for r in rows]
    fig, grid = plt.subplots(3, 2, figsize=(12, 10), sharex=True)
    axes: list[Any] = list(cast(Any, grid).flat)
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, scale in series:
            ax.plot(minutes, [r[key] * scale for r in rows], ".-", label=key)
        for run in runs:
            if run.get("finished_at"):
                at = (_epoch(run["finished_at"]) - t0) / 60
                ax.axvline(at, color="tab:green" if run["status"] == "promoted" else "grey", alpha=0.3)
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax in axes[-2:]:
        ax.set_xlabel("minutes (vertical lines: retrain runs finished; green = promoted)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _epoch(iso: str) -> float:
    from datetime import UTC, datetime

    at = datetime.fromisoformat(iso)
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def summary(rows: list[dict[str, Any]], traffic: Traffic, runs: list[dict[str, Any]]) -> None:
    print(f"{'series':<22}{'start':>14}{'end':>14}{'max':>14}")
    for key in rows[0]:
        if key != "elapsed_s":
            values = [r[key] for r in rows]
            print(f"{key:<22}{values[0]:>14,}{values[-1]:>14,}{max(values):>14,}")
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run["status"]] = statuses.get(run["status"], 0) + 1
    print(f"answered (2xx) by endpoint: {traffic.answered}")
    print(f"non-2xx or failed by endpoint: {traffic.non_2xx or 0}")
    for error in traffic.errors:
        print(f"  {error}")
    print(
        f"monitor runs {rows[-1]['monitor_runs']}, retrain runs {len(runs)} {statuses}, swaps in serve "
        f"{rows[-1]['swaps']}, predictions served {rows[-1]['predictions']:,}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=35)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "soak")
    parser.add_argument("--rate", type=float, default=100, help="/predict requests per second")
    parser.add_argument("--batch-rate", type=float, default=25, help="/predict/batch requests per second")
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--label-percent", type=int, default=50)
    parser.add_argument("--label-delay-s", type=float, default=5)
    parser.add_argument("--phase-minutes", type=float, default=6)
    parser.add_argument("--monitor-interval-s", type=int, default=20)
    parser.add_argument("--cooldown-s", type=int, default=120)
    parser.add_argument("--html-keep", type=int, default=5)
    parser.add_argument("--sample-s", type=float, default=30)
    parser.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL cluster, not SQLite")
    parser.add_argument("--keep-state", action="store_true", help="keep the database, artifacts and reports")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="driftloop-soak-"))
    try:
        with ExitStack() as stack:
            return soak(args, state, *database(state, args.postgres, stack))
    finally:
        if not args.keep_state:  # a 35-minute run leaves ~200 MB of SQLite behind
            shutil.rmtree(state, ignore_errors=True)


def soak(args: argparse.Namespace, state: Path, database_url: str, db_bytes: Callable[[], int]) -> int:
    env = soak_env(state, database_url, args)
    cli = [sys.executable, "-m", "service.cli"]
    print(f"state in {state}; bootstrapping v1", flush=True)
    subprocess.run([*cli, "bootstrap", "--rows", "20000"], env=env, cwd=ROOT, check=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    try:
        for name, command in (("serve", ["serve", "--no-scheduler"]), ("worker", ["worker"])):
            procs[name], urls[name] = start_server(
                [*cli, *command, "--no-access-log"], env, cwd=ROOT, log=args.out / f"{name}.log", timeout=120
            )
        pids = {name: proc.pid for name, proc in procs.items()}
        t0, started = time.time(), time.monotonic()
        traffic = Traffic(urls["serve"], args, started + args.minutes * 60)
        threads = traffic.threads()
        for thread in threads:
            thread.start()
        while (elapsed := time.monotonic() - started) < args.minutes * 60 + 1:
            rows.append(sample(state, pids, urls, elapsed, db_bytes))
            print(f"{elapsed / 60:5.1f} min  phase {traffic.phase():<9} {rows[-1]}", flush=True)
            time.sleep(max(0.0, args.sample_s - (time.monotonic() - started - elapsed)))
        for thread in threads:
            thread.join(timeout=60)
        runs = httpx.get(urls["serve"] + "/retrain/runs", params={"limit": 500}, timeout=30).json()
        rows.append(sample(state, pids, urls, time.monotonic() - started, db_bytes))
    finally:
        for proc in procs.values():
            stop_server(proc)
    with (args.out / "soak.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, runs, t0, args.out / "soak.png")
    summary(rows, traffic, runs)
    kept = f"; state kept in {state}" if args.keep_state else ""
    print(f"wrote {args.out / 'soak.csv'} and {args.out / 'soak.png'}{kept}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
