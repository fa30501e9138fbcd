"""Serving benchmark: driftloop (validation + batched logging + metrics) against plain FastAPI + CatBoost.

Both run as one uvicorn worker on 127.0.0.1 with the same model, loaded by the same bounded load generator.
Prints req/s, p50/p99 and server CPU per request for each, the throughput ratio, and logged rows versus
answered requests. Both predict with the same CatBoost thread_count (DRIFTLOOP_PREDICT_THREADS, default 1).
    .venv/bin/python bench/serve.py [--requests 20000] [--concurrency 8] [--rounds 10] [--seconds 60]

Both servers run at once; the load alternates between them in rounds, so that whatever else the machine does
falls on both rather than on whichever would have run second.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import LoadResult, json_payloads, run_load  # noqa: E402
from core.generator import generate_transactions  # noqa: E402
from core.spec import load_spec  # noqa: E402
from service.process import start_server, stop_server  # noqa: E402

console = Console(width=120)


def warm(url: str, payloads: list[bytes], args: argparse.Namespace) -> int:
    """Requests answered while warming up (they are logged too)."""
    total = min(1000, args.requests)
    return run_load(url + "/predict", payloads, total=total, concurrency=args.concurrency, max_seconds=10).ok


def rounds(
    urls: dict[str, str], pids: dict[str, int], payloads: list[bytes], args: argparse.Namespace
) -> tuple[dict[str, LoadResult], list[float], dict[str, float]]:
    """Alternate the servers for `args.rounds` short rounds of requests/rounds each, merging each
    server's rounds: a noisy moment of the machine then falls on both, not on whichever ran second.
    Also returns each round's throughput ratio (second server / first), to show the spread, and each
    server's CPU seconds (all its threads) while it was under load."""
    merged = {name: LoadResult() for name in urls}
    per_round = max(1, args.requests // args.rounds)
    ratios = []
    cpu = {name: 0.0 for name in urls}
    for i in range(args.rounds):
        order = list(urls.items()) if i % 2 == 0 else list(urls.items())[::-1]  # neither always goes first
        rps = {}
        for name, url in order:
            before = cpu_seconds(pids[name])
            r = run_load(
                url + "/predict", payloads, total=per_round, concurrency=args.concurrency,
                max_seconds=args.seconds / args.rounds,
            )  # fmt: skip
            cpu[name] += cpu_seconds(pids[name]) - before
            merge(merged[name], r)
            rps[name] = r.rps
            if name == "driftloop":
                wait_drained(url)  # its writer's tail must not run during the other server's round
        first, second = list(urls)
        ratios.append(rps[second] / rps[first] if rps[first] else float("nan"))
    return merged, ratios, cpu


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def merge(into: LoadResult, r: LoadResult) -> None:
    into.sent += r.sent
    for status, count in r.statuses.items():
        into.statuses[status] = into.statuses.get(status, 0) + count
    into.latencies_s += r.latencies_s
    into.seconds += r.seconds


def wait_drained(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = httpx.get(url + "/metrics", timeout=5).text
        depth = next(
            (
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("driftloop_logger_queue_depth ")
            ),
            0.0,
        )
        if depth == 0:
            return
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0, help="time bound per server, all rounds")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds per server")
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

        with console.status("starting both servers…"):
            plain_proc, plain_url = start_server(
                [sys.executable, "-m", "uvicorn", "--factory", "bench.plain_app:app",
                 "--log-level", "warning", "--no-access-log"],
                {**env, "BENCH_MODEL_PATH": str(model_path)}, cwd=ROOT,
            )  # fmt: skip
            ours_proc, ours_url = start_server(
                [*driftloop, "serve", "--no-scheduler", "--log-level", "warning"], env, cwd=ROOT
            )
        try:
            with console.status(f"{args.rounds} alternating rounds of load…"):
                warm(plain_url, payloads, args)
                warmed = warm(ours_url, payloads, args)
                urls = {"plain": plain_url, "driftloop": ours_url}
                pids = {"plain": plain_proc.pid, "driftloop": ours_proc.pid}
                results, ratios, cpu = rounds(urls, pids, payloads, args)
        finally:
            stop_server(plain_proc)
            stop_server(ours_proc)  # SIGTERM: the logger drains before exit
        plain, ours = results["plain"], results["driftloop"]
        answered_total = ours.ok + warmed  # warm-up answers are logged too
        engine = create_engine(f"sqlite:///{db}")
        with engine.connect() as conn:
            logged = conn.execute(text("SELECT count(*) FROM prediction_log")).scalar_one()
        engine.dispose()

    table = Table(
        title=f"POST /predict, 1 uvicorn worker, {args.concurrency} keep-alive connections, 127.0.0.1, "
        f"CatBoost thread_count {os.environ.get('DRIFTLOOP_PREDICT_THREADS', '1')} in both"
    )
    for col in ("server", "requests", "non-200", "req/s", "p50 ms", "p99 ms", "CPU µs/req"):
        table.add_column(col, justify="right")
    for name, key, r in (("plain FastAPI + CatBoost", "plain", plain), ("driftloop", "driftloop", ours)):
        table.add_row(
            name,
            str(r.sent),
            str(r.failed),
            f"{r.rps:,.0f}",
            f"{r.percentile_ms(50):.2f}",
            f"{r.percentile_ms(99):.2f}",
            f"{cpu[key] / max(1, r.ok) * 1e6:,.0f}",
        )
    console.print(table)
    ratio = ours.rps / plain.rps if plain.rps else float("nan")
    console.print(f"throughput ratio driftloop / plain: [bold]{ratio:.3f}[/] (target ≥ 0.95)")
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    console.print(
        f"  per round ({len(ratios)}): median {median:.3f}, quartiles {q1:.3f}–{q3:.3f}, "
        f"range {min(ratios):.3f}–{max(ratios):.3f}"
    )
    console.print(f"p99 driftloop: [bold]{ours.percentile_ms(99):.2f} ms[/] (target ≤ 10 ms)")
    verdict = "[green]equal[/]" if logged == answered_total else "[red]MISMATCH[/]"
    console.print(f"logged rows {logged} vs answered requests {answered_total}: {verdict}")


if __name__ == "__main__":
    main()
