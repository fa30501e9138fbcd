"""Serving benchmark: driftloop (validation + batched logging + metrics) against plain FastAPI + CatBoost.

Both run as one uvicorn worker on 127.0.0.1 with the same model, loaded by the same bounded load generator.
Prints req/s and p50/p99 for each, the throughput ratio, and logged rows versus answered requests.
    .venv/bin/python bench/serve.py [--requests 20000] [--concurrency 16] [--seconds 30]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import LoadResult, json_payloads, run_load  # noqa: E402
from core.generator import generate_transactions  # noqa: E402
from core.spec import load_spec  # noqa: E402
from service.process import free_port, wait_http_ok  # noqa: E402

console = Console()


def start(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(url + "/health", proc, timeout=60)
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def load(url: str, payloads: list[bytes], args: argparse.Namespace) -> tuple[LoadResult, int]:
    """(the measured load, requests answered during the warm-up before it)."""
    warmup = run_load(
        url + "/predict",
        payloads,
        total=min(1000, args.requests),
        concurrency=args.concurrency,
        max_seconds=10,
    )
    measured = run_load(
        url + "/predict",
        payloads,
        total=args.requests,
        concurrency=args.concurrency,
        max_seconds=args.seconds,
    )
    return measured, warmup.ok


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()

    spec = load_spec()
    rows = generate_transactions(2000, start="2022-01-01", end="2022-06-30", seed=11)[spec.feature_names]
    payloads = json_payloads(rows.to_dict("records"))
    with tempfile.TemporaryDirectory(prefix="driftloop-bench-") as tmp:
        db = Path(tmp) / "bench.db"
        env = {
            **os.environ,
            "DRIFTLOOP_DATABASE_URL": f"sqlite:///{db}",
            "DRIFTLOOP_ARTIFACT_DIR": f"{tmp}/artifacts",
            "DRIFTLOOP_SPOOL_DIR": f"{tmp}/spool",
            "DRIFTLOOP_REPORT_DIR": f"{tmp}/reports",
            "DRIFTLOOP_SCHEDULER": "false",
        }
        driftloop = [sys.executable, "-m", "service.cli"]
        with console.status("bootstrapping v1 (CatBoost, 300 iterations)…"):
            subprocess.run([*driftloop, "bootstrap"], env=env, cwd=ROOT, check=True, capture_output=True)
        model_path = next(Path(tmp, "artifacts").glob("v1/model.cbm"))

        with console.status("plain FastAPI + CatBoost…"):
            proc, url = start(
                [sys.executable, "-m", "uvicorn", "--factory", "bench.plain_app:app",
                 "--log-level", "warning", "--no-access-log"],
                {**env, "BENCH_MODEL_PATH": str(model_path)},
            )  # fmt: skip
            plain, _ = load(url, payloads, args)
            stop(proc)
        with console.status("driftloop serve…"):
            proc, url = start([*driftloop, "serve", "--no-scheduler", "--log-level", "warning"], env)
            ours, warmed = load(url, payloads, args)
            stop(proc)  # SIGTERM: the logger drains before exit
        answered_total = ours.ok + warmed  # warm-up answers are logged too
        engine = create_engine(f"sqlite:///{db}")
        with engine.connect() as conn:
            logged = conn.execute(text("SELECT count(*) FROM prediction_log")).scalar_one()
        engine.dispose()

    table = Table(
        title=f"POST /predict, 1 uvicorn worker, {args.concurrency} keep-alive connections, 127.0.0.1"
    )
    for col in ("server", "requests", "non-200", "req/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="right")
    for name, r in (("plain FastAPI + CatBoost", plain), ("driftloop", ours)):
        table.add_row(
            name,
            str(r.sent),
            str(r.failed),
            f"{r.rps:,.0f}",
            f"{r.percentile_ms(50):.2f}",
            f"{r.percentile_ms(99):.2f}",
        )
    console.print(table)
    ratio = ours.rps / plain.rps if plain.rps else float("nan")
    console.print(f"throughput ratio driftloop / plain: [bold]{ratio:.3f}[/] (target ≥ 0.95)")
    console.print(f"p99 driftloop: [bold]{ours.percentile_ms(99):.2f} ms[/] (target ≤ 10 ms)")
    verdict = "[green]equal[/]" if logged == answered_total else "[red]MISMATCH[/]"
    console.print(f"logged rows {logged} vs answered requests {answered_total}: {verdict}")


if __name__ == "__main__":
    main()
