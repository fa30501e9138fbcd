"""`driftloop demo`: the whole loop on the embedded default, narrated.

bootstrap v1 on 2019–2021 → serve → stable traffic → a drift scenario with delayed feedback → the monitor
flags it → an alert reaches a local webhook receiver → a candidate is trained, gated and swapped in.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pandas as pd
from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.generator import generate_transactions
from core.settings import Settings, to_env
from core.spec import load_spec
from service.process import free_port, wait_http_ok

BATCH = 50
FEEDBACK_DELAY_BATCHES = 3  # labels arrive three batches after their predictions
DRIFT_CHUNK_ROWS = 6000
AFTER_SWAP_ROWS = 1500  # drifted rows answered by the new model before the demo ends
DRIFT_BUDGET_S = 300  # the longest the drifted stream waits for a swap
STATE_MARKER = ".driftloop-demo"  # left in the state directory the demo made: only such a one is wiped


@dataclass
class Timeline:
    start: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = field(default_factory=list)
    console: Console = field(default_factory=Console)

    def mark(self, text: str) -> float:
        at = time.monotonic() - self.start
        self.events.append((at, text))
        self.console.print(f"[dim]{at:6.1f}s[/]  {text}")
        return at


class _Receiver(BaseHTTPRequestHandler):
    alerts: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).alerts.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


@dataclass
class Served:
    index: int
    version: int
    prediction: float
    actual: float
    phase: str


def demo_settings(state: Path, webhook_url: str) -> Settings:
    """The demo's own values over the defaults. The caller's DRIFTLOOP_* variables (DRIFTLOOP_CONFIG among
    them) and .env are not read: the demo shows the shipped apartment example whatever is set."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("DRIFTLOOP_")}
    try:
        return _demo_settings(state, webhook_url)
    finally:
        os.environ.update(saved)


DEMO_FEEDBACK_TOKEN = "demo-feedback-token"


def _demo_settings(state: Path, webhook_url: str) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite:///{state / 'driftloop.db'}",
        artifact_dir=state / "artifacts",
        spool_dir=state / "spool",
        report_dir=state / "reports",
        evidently_workspace=state / "evidently",
        admin_token=SecretStr("demo-admin-token"),
        feedback_token=SecretStr(DEMO_FEEDBACK_TOKEN),  # labels steer retraining: the demo guards them too
        webhook_url=webhook_url,
        webhook_backoff_s=0.5,
        monitor_interval_s=3,
        window_rows=1000,
        min_window_rows=400,
        min_labelled_rows=200,
        consecutive_breaches=2,
        retrain_cooldown_s=900,
        champion_poll_s=0.5,
        train_iterations=300,
        train_thread_count=2,
    )


def demo_env(settings: Settings) -> dict[str, str]:
    """The children's environment: the demo's settings only. A DRIFTLOOP_* variable of the caller's (a spec
    of their own, say) must not reach the processes that bootstrap and serve the apartment example."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DRIFTLOOP_")} | to_env(settings)


def state_problem(state: Path) -> str | None:
    """Why the demo may not wipe `state`, or None: it does not exist, is empty, or an earlier demo made it.

    `--state var` must not delete the database and artifacts beside the demo's in ./var."""
    if not state.exists():
        return None
    if not state.is_dir():
        return f"{state} is not a directory"
    if (state / STATE_MARKER).is_file() or not any(state.iterdir()):
        return None
    return (
        f"{state} holds files the demo did not make, and the demo wipes its state directory: give --state a "
        f"new or empty directory (one a demo made has a {STATE_MARKER} file; an older demo's, remove by hand)"
    )


def run_demo(*, scenario: str = "rate_shock", state: Path = Path("var/demo"), seed: int = 0) -> int:
    console = Console()
    if problem := state_problem(state):
        console.print(f"[red]demo: {escape(problem)}[/]", highlight=False)
        return 2
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    (state / STATE_MARKER).touch()
    spec = load_spec()
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.alerts = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    settings = demo_settings(state, f"http://127.0.0.1:{receiver.server_address[1]}/hook")
    env = demo_env(settings)
    tl = Timeline(console=console)
    console.rule(f"[bold]driftloop demo[/] — scenario [cyan]{scenario}[/]")

    cli = [sys.executable, "-m", "service.cli"]
    subprocess.run([*cli, "bootstrap", "--rows", "20000", "--seed", str(seed)], env=env, check=True)
    tl.mark("v1 bootstrapped on 20,000 transactions from 2019–2021")
    port = free_port()
    log = (state / "server.log").open("wb")
    server = subprocess.Popen(
        [*cli, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    served: list[Served] = []
    try:
        wait_http_ok(url + "/ready", server, timeout=60)
        tl.mark(
            f"service up at {url} (monitor every {settings.monitor_interval_s}s, webhook receiver listening)"
        )
        stable = generate_transactions(1500, start="2022-01-01", end="2022-06-30", seed=seed + 1)
        drifted = _drifted(scenario, seed)
        labeller = httpx.Client(
            base_url=url, timeout=30, headers={"Authorization": f"Bearer {DEMO_FEEDBACK_TOKEN}"}
        )
        with labeller as client, _progress(console) as progress:
            _stream(client, stable, spec, served, "stable", progress, pace_s=0.12)
            tl.mark(f"streamed {len(stable):,} stable transactions with delayed feedback")
            _wait_reports(client, 1, console)
            first = client.get("/reports/latest").json()
            tl.mark(_describe(first))
            tl.mark(f"[yellow]drift begins: {scenario}[/]")
            swap_at = _stream_until_swap(client, drifted, spec, served, progress, tl, settings)
        if swap_at is None:
            console.print(f"[red]no swap happened within the demo's {DRIFT_BUDGET_S} s of drifted traffic[/]")
        _finish(console, tl, url, state, served, spec, scenario, seed)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
        receiver.shutdown()
    logged = _count_logged(settings.database_url)
    verdict = "every answered prediction is logged" if logged == len(served) else "[red]MISMATCH[/]"
    console.print(
        f"prediction log after shutdown: {logged:,} rows for {len(served):,} answered predictions: {verdict}"
    )
    return 0 if any(s.version > 1 for s in served) and logged == len(served) else 1


def _count_logged(database_url: str) -> int:
    from sqlalchemy import func, select

    from core.db import make_engine
    from core.schema import PredictionLog

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(PredictionLog)) or 0)
    finally:
        engine.dispose()


def _stream(
    client: httpx.Client,
    frame: pd.DataFrame,
    spec: Any,
    served: list[Served],
    phase: str,
    progress: Progress,
    *,
    pace_s: float,
) -> None:
    task = progress.add_task(f"{phase} traffic", total=len(frame))
    pending: list[list[tuple[str, float]]] = []
    for start in range(0, len(frame), BATCH):
        _send_batch(client, frame.iloc[start : start + BATCH], spec, served, phase, pending)
        progress.advance(task, min(BATCH, len(frame) - start))
        time.sleep(pace_s)
    for labels in pending:
        client.post("/feedback", json=[{"prediction_id": i, "actual": a} for i, a in labels])
    progress.remove_task(task)


def _send_batch(
    client: httpx.Client,
    chunk: pd.DataFrame,
    spec: Any,
    served: list[Served],
    phase: str,
    pending: list[list[tuple[str, float]]],
) -> None:
    instances = chunk[spec.feature_names].to_dict("records")
    body = client.post("/predict/batch", json={"instances": instances}).raise_for_status().json()
    actuals = chunk[spec.target].tolist()
    for p, actual in zip(body["predictions"], actuals, strict=True):
        served.append(Served(len(served), p["model_version"], p["prediction"], actual, phase))
    pending.append([(p["prediction_id"], a) for p, a in zip(body["predictions"], actuals, strict=True)])
    if len(pending) > FEEDBACK_DELAY_BATCHES:
        labels = pending.pop(0)
        client.post(
            "/feedback", json=[{"prediction_id": i, "actual": a} for i, a in labels]
        ).raise_for_status()


def _drifted(scenario: str, seed: int) -> Iterator[pd.DataFrame]:
    """Drifted transactions, 6,000 at a time, for as long as the demo streams them."""
    for k in itertools.count():
        yield generate_transactions(
            DRIFT_CHUNK_ROWS, start="2022-07-01", end="2023-06-30", scenario=scenario,
            change_at="2022-05-01",  # landed in full (rate_shock ramps 60 days) before the stream starts
            seed=seed + 2 + 1000 * k,
        )  # fmt: skip


def _stream_until_swap(
    client: httpx.Client,
    chunks: Iterator[pd.DataFrame],
    spec: Any,
    served: list[Served],
    progress: Progress,
    tl: Timeline,
    settings: Settings,
) -> float | None:
    """Drifted traffic until the service has answered AFTER_SWAP_ROWS rows with a new model, or for
    DRIFT_BUDGET_S with none: on a slow or busy machine the retrain takes longer, and the stream waits."""
    task = progress.add_task("drifted traffic (until the swap)", total=None)
    started = time.monotonic()
    pending: list[list[tuple[str, float]]] = []
    seen_reports: set[int] = {r["id"] for r in client.get("/reports").json()}
    seen_runs: dict[int, str] = {}
    alerts_seen = 0
    swap_at = None
    after_swap = 0
    batches = (chunk.iloc[start : start + BATCH] for chunk in chunks for start in range(0, len(chunk), BATCH))
    for batch in batches:
        if time.monotonic() - started > DRIFT_BUDGET_S:
            break
        _send_batch(client, batch, spec, served, "drift", pending)
        progress.advance(task, len(batch))
        time.sleep(0.12)
        for report in reversed(client.get("/reports", params={"limit": 5}).json()):
            if report["id"] not in seen_reports:
                seen_reports.add(report["id"])
                if report["verdict"] != "insufficient":
                    tl.mark(_describe(report))
        for alert in _Receiver.alerts[alerts_seen:]:
            tl.mark(f"[magenta]webhook received[/]: {alert['text'].splitlines()[0]}")
        alerts_seen = len(_Receiver.alerts)
        for run in client.get("/retrain/runs").json():
            if seen_runs.get(run["id"]) != run["status"]:
                seen_runs[run["id"]] = run["status"]
                tl.mark(_describe_run(run))
        if swap_at is None and served[-1].version > 1:
            swap_at = tl.mark(
                f"[green]service now answers with v{served[-1].version}[/] (hot swap, no failed request)"
            )
        if swap_at is not None:
            after_swap += len(batch)
            if after_swap >= AFTER_SWAP_ROWS:
                break
    for labels in pending:
        client.post("/feedback", json=[{"prediction_id": i, "actual": a} for i, a in labels])
    progress.remove_task(task)
    return swap_at


def _describe(report: dict[str, Any]) -> str:
    mae = f"{report['mae']:,.0f}" if report["mae"] is not None else "n/a"
    share = f"{report['drift_share']:.2f}" if report["drift_share"] is not None else "n/a"
    verdict = "[red]BREACH[/]" if report["breach"] else "ok"
    labelled = report["labelled_rows"]
    head = f"monitor report {report['id']}: "
    return head + f"{verdict} drift share {share}, window MAE {mae} ({labelled} labelled)"


def _describe_run(run: dict[str, Any]) -> str:
    if run["status"] == "running":
        return f"retrain run {run['id']} started (trigger: {run['trigger']})"
    metrics = run.get("metrics") or {}
    cand, champ = metrics.get("val_mae"), metrics.get("champion_val_mae")
    figures = f" — holdout MAE candidate {cand:,.0f} vs champion {champ:,.0f}" if cand and champ else ""
    return f"retrain run {run['id']}: [bold]{run['status']}[/] candidate v{run['candidate_version']}{figures}"


def _finish(
    console: Console,
    tl: Timeline,
    url: str,
    state: Path,
    served: list[Served],
    spec: Any,
    scenario: str,
    seed: int,
) -> None:
    from catboost import CatBoostRegressor

    with httpx.Client(base_url=url, timeout=30) as client:
        models = client.get("/models").json()
        latest = client.get("/reports/latest").json()
        reports = client.get("/reports", params={"limit": 500}).json()
        response = client.get(latest["html_url"]) if latest.get("html_url") else None
        page = response.text if response is not None and response.status_code == 200 else None
    test = generate_transactions(
        3000, start="2023-07-01", end="2023-12-31", scenario=scenario, change_at="2022-05-01", seed=seed + 3
    )
    table = Table(title="MAE on post-drift transactions (10k KRW)")
    for col in ("model", "status", "live traffic MAE", "fresh post-drift sample MAE"):
        table.add_column(col, justify="right")
    drift_rows = [s for s in served if s.phase == "drift"]
    for m in sorted(models, key=lambda m: m["version"]):
        model = CatBoostRegressor()
        model.load_model(str(state / "artifacts" / f"v{m['version']}" / "model.cbm"))
        fresh = float(np.mean(np.abs(model.predict(spec.coerce(test)) - test[spec.target])))
        live = [abs(s.prediction - s.actual) for s in drift_rows if s.version == m["version"]]
        table.add_row(
            f"v{m['version']}", m["status"], f"{np.mean(live):,.0f}" if live else "-", f"{fresh:,.0f}"
        )
    console.print(table)
    by_version = {
        m["version"]: [abs(s.prediction - s.actual) for s in drift_rows if s.version == m["version"]]
        for m in models
    }
    if by_version.get(1) and len(by_version) > 1:
        newest = max(v for v in by_version if by_version[v])
        before, after = float(np.mean(by_version[1])), float(np.mean(by_version[newest]))
        console.print(
            f"[bold]v{newest} cuts the MAE on post-drift traffic from {before:,.0f} to {after:,.0f} "
            f"({(after - before) / before:+.0%})[/]"
        )
    plot = state / "demo.png"
    _plot(served, reports, plot)
    console.print(f"plot of error and drift over time: [bold]{escape(str(plot))}[/]")
    if page is not None:
        saved = state / "latest_report.html"
        saved.write_text(page, encoding="utf-8")
        console.print(
            f"latest Evidently report: [bold]{escape(str(saved))}[/] (report {latest['id']}: a copy of "
            f"the page the demo's service, stopped now, served at GET {latest['html_url']})"
        )
    workspace = state / "evidently"
    if workspace.is_dir():
        console.print(
            f"every judged monitor run in Evidently's own UI: [bold]DO_NOT_TRACK=1 .venv/bin/evidently ui "
            f"--workspace {escape(str(workspace))}[/] (then http://127.0.0.1:8000)"
        )
    console.print(f"alerts delivered to the webhook receiver: {len(_Receiver.alerts)}")


def _plot(served: list[Served], reports: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    err = pd.Series([abs(s.prediction - s.actual) for s in served]).rolling(100, min_periods=20).mean()
    versions = np.array([s.version for s in served])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=False)
    for v in sorted(set(versions)):
        mask = versions == v
        top.plot(np.flatnonzero(mask), err[mask], ".", markersize=2, label=f"served by v{v}")
    drift_start = next((s.index for s in served if s.phase == "drift"), None)
    if drift_start is not None:
        top.axvline(drift_start, color="grey", linestyle="--", label="drift begins")
    top.set_title("Rolling absolute error of served predictions (100 requests)")
    top.set_xlabel("request")
    top.set_ylabel("MAE (10k KRW)")
    top.legend()
    rows = [r for r in reversed(reports) if r["drift_share"] is not None]
    if rows:
        ids = [r["id"] for r in rows]
        bottom.plot(ids, [r["drift_share"] for r in rows], "o-", label="drift share")
        bottom.plot(ids, [r["weighted_drift_score"] for r in rows], "s-", label="weighted drift score")
        bottom.set_ylim(-0.02, 1.02)  # shares and scores live in [0, 1]; an all-zero line is not noise
        twin = bottom.twinx()
        twin.plot(ids, [r["mae"] or np.nan for r in rows], "^-", color="tab:red", label="window MAE")
        twin.set_ylabel("window MAE")
        for r in rows:
            if r["breach"]:
                bottom.axvspan(r["id"] - 0.5, r["id"] + 0.5, color="tab:red", alpha=0.12, lw=0)
        bottom.legend(loc="upper left")
        twin.legend(loc="upper right")
    bottom.set_title("Monitor reports (shaded: breach)")
    bottom.set_xlabel("report id")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wait_reports(client: httpx.Client, count: int, console: Console) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reports = client.get("/reports").json()
        if len([r for r in reports if r["verdict"] != "insufficient"]) >= count:
            return
        time.sleep(0.5)
    console.print("[yellow]the monitor has not produced a verdict yet[/]")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    )  # fmt: skip
