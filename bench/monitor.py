"""Benchmark: compute_drift (sampled, per-column Evidently metrics) against the full Evidently presets.

    .venv/bin/python bench/monitor.py [--sizes 10000,100000,1000000] [--scenarios none,new_town]
                                      [--max-rows 50000] [--skip-full-above N] [--workspace]

For each window size and scenario, a window of 2022 traffic is generated (every row labelled, so the
full RegressionPreset can run on it) and scored by a champion trained on 2019–2021. Each measurement runs
in a fresh child process that loads the window and the reference from parquet, warms up with one call on the
first 2,000 rows (a long-running monitor pays Evidently's first-call set-up once), resets its peak-RSS mark
(/proc/self/clear_refs) and then times one call on the whole window. Memory is the child's peak RSS during
that call (getrusage ru_maxrss after the reset), so it includes the interpreter, the libraries and the input
frames; the RSS just before the call is shown in brackets.
The full run is Report([DataDriftPreset(), RegressionPreset()]) on the whole window and reference.
With --workspace, the sampled child then adds the call's snapshots to a fresh Evidently workspace as a
monitor run does (DRIFTLOOP_EVIDENTLY_WORKSPACE), timed apart, with the bytes it wrote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_SEED = 11
PREDICTION_COLUMN = "prediction"
WARM_UP_ROWS = 2_000


@dataclass(frozen=True, slots=True)
class Measurement:
    seconds: float
    peak_mb: float
    before_mb: float
    drifted: list[str]
    mae: float | None
    workspace_s: float | None = None  # adding the snapshots to an Evidently workspace (--workspace)
    workspace_mb: float | None = None  # what that wrote


def main(argv: list[str] | None = None) -> None:
    # Run as a script, this file's folder heads sys.path and its name would shadow the `monitor` package;
    # hence also the imports inside functions below.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    args = _parse(argv)
    if args.child:
        print(json.dumps(_child(args.child, Path(args.reference), Path(args.window), args.max_rows)))
        return
    _parent(args)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="window sizes, comma-separated")
    p.add_argument("--scenarios", default="none,new_town", help="generator scenarios, comma-separated")
    p.add_argument("--max-rows", type=int, default=50_000, help="compute_drift's sample size")
    p.add_argument("--reference-rows", type=int, default=20_000, help="rows the champion is trained on")
    p.add_argument("--skip-full-above", type=int, default=None, help="skip the full presets above N rows")
    p.add_argument("--workspace", action="store_true", help="also time adding the snapshots to a workspace")
    p.add_argument("--child", choices=["sampled", "sampled+workspace", "full"], help=argparse.SUPPRESS)
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--window", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- parent: build data, launch children, print the table ----------------------------------------------


def _parent(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import Progress

    console = Console() if sys.stdout.isatty() else Console(width=170)
    sizes = [int(s) for s in args.sizes.split(",")]
    scenarios = [s.strip() for s in args.scenarios.split(",")]
    rows: list[tuple[int, str, Measurement, Measurement | None]] = []
    with tempfile.TemporaryDirectory(prefix="driftloop-bench-") as tmp, Progress(console=console) as progress:
        task = progress.add_task("training the champion", total=1 + len(sizes) * len(scenarios) * 3)
        model, reference_path = _champion(Path(tmp), args.reference_rows)
        progress.advance(task)
        for size in sizes:
            for scenario in scenarios:
                progress.update(task, description=f"{size:,} rows {scenario}: generating")
                window_path = _window(Path(tmp), model, size, scenario)
                progress.advance(task)
                progress.update(task, description=f"{size:,} rows {scenario}: compute_drift")
                mode = "sampled+workspace" if args.workspace else "sampled"
                sampled = _run_child(mode, reference_path, window_path, args.max_rows)
                progress.advance(task)
                full = None
                if args.skip_full_above is None or size <= args.skip_full_above:
                    progress.update(task, description=f"{size:,} rows {scenario}: full presets")
                    full = _run_child("full", reference_path, window_path, args.max_rows)
                progress.advance(task)
                rows.append((size, scenario, sampled, full))
                window_path.unlink()
    console.print(_table(rows, args.max_rows))


def _champion(tmp: Path, rows: int) -> tuple[Any, Path]:
    from core.generator import generate_transactions
    from core.spec import load_spec
    from retrain.train import TrainParams, feature_importance, reference_snapshot, train_model

    spec = load_spec()
    data = generate_transactions(rows, seed=1)
    model = train_model(data, spec, TrainParams(thread_count=2))
    path = tmp / "reference.parquet"
    reference_snapshot(model, data, spec, seed=1).to_parquet(path, index=False)
    (tmp / "importance.json").write_text(json.dumps(feature_importance(model, spec)), encoding="utf-8")
    return model, path


def _window(tmp: Path, model: Any, size: int, scenario: str) -> Path:
    from core.generator import generate_transactions
    from core.spec import load_spec
    from retrain.train import PREDICTION, predict

    spec = load_spec()
    raw = generate_transactions(
        size,
        start="2022-01-01",
        end="2022-12-31",
        scenario=scenario,
        change_at="2022-01-01",
        seed=SCENARIO_SEED,
    )
    window = spec.coerce(raw)
    window[PREDICTION] = predict(model, window, spec)
    window[spec.target] = raw[spec.target].astype(float)
    path = tmp / f"window-{size}-{scenario}.parquet"
    window.to_parquet(path, index=False)
    return path


def _run_child(mode: str, reference: Path, window: Path, max_rows: int) -> Measurement:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--reference", str(reference)]
    cmd += ["--window", str(window), "--max-rows", str(max_rows)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{done.stderr[-4000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def _table(rows: list[tuple[int, str, Measurement, Measurement | None]], max_rows: int) -> Any:
    from rich.table import Table

    table = Table(title=f"compute_drift (sample ≤ {max_rows:,} rows, per-column metrics) vs full presets")
    for name in (
        "window rows",
        "scenario",
        "sampled s",
        "sampled peak MB (before)",
        "full s",
        "full peak MB (before)",
    ):
        table.add_column(name, justify="right")
    table.add_column("drifted (sampled)")
    table.add_column("verdicts agree")
    table.add_column("MAE sampled / full", justify="right")
    workspace = any(s.workspace_s is not None for _, _, s, _ in rows)
    if workspace:
        table.add_column("workspace s (MB)", justify="right")
    for size, scenario, sampled, full in rows:
        table.add_row(
            f"{size:,}",
            scenario,
            f"{sampled.seconds:.2f}",
            f"{sampled.peak_mb:,.0f} ({sampled.before_mb:,.0f})",
            f"{full.seconds:.2f}" if full else "skipped",
            f"{full.peak_mb:,.0f} ({full.before_mb:,.0f})" if full else "-",
            ", ".join(sampled.drifted) or "none",
            ("yes" if sampled.drifted == full.drifted else f"NO (full: {', '.join(full.drifted)})")
            if full
            else "-",
            f"{sampled.mae:,.0f} / {full.mae:,.0f}" if full and sampled.mae and full.mae else "-",
            *([f"{sampled.workspace_s:.2f} ({sampled.workspace_mb:.2f})"] if workspace else []),
        )
    return table


# --- child: one measured call --------------------------------------------------------------------------


def _child(mode: str, reference_path: Path, window_path: Path, max_rows: int) -> dict[str, Any]:
    import pandas as pd

    from core.spec import load_spec
    from monitor import report  # noqa: F401 - import Evidently before the measurement starts

    spec = load_spec()
    reference = pd.read_parquet(reference_path)
    window = pd.read_parquet(window_path)
    importance = json.loads((reference_path.parent / "importance.json").read_text(encoding="utf-8"))

    def run(frame: pd.DataFrame) -> tuple[list[str], float | None, Any]:
        """Drifted columns and MAE, and compute_drift's result (None for the full presets)."""
        if mode.startswith("sampled"):
            result = _sampled(reference, frame, spec, importance, max_rows)
            return *_verdict(result), result
        return *_full(reference, frame, spec), None

    run(window.iloc[:WARM_UP_ROWS])
    before_mb = _reset_peak()
    started = time.perf_counter()
    drifted, mae, result = run(window)
    seconds = time.perf_counter() - started
    measured = {
        "seconds": seconds,
        "peak_mb": _peak_mb(),
        "before_mb": before_mb,
        "drifted": drifted,
        "mae": mae,
    }
    if mode == "sampled+workspace":
        measured["workspace_s"], measured["workspace_mb"] = _workspace(result, spec)
    return measured


def _workspace(result: Any, spec: Any) -> tuple[float, float]:
    """Seconds to add `result`'s snapshots to a fresh workspace, as a monitor run does, and the MB written."""
    from monitor.workspace import EvidentlyWorkspace

    with tempfile.TemporaryDirectory(prefix="driftloop-bench-workspace-") as tmp:
        workspace = EvidentlyWorkspace(Path(tmp), spec, keep=10)
        started = time.perf_counter()
        workspace.add(result.snapshots, report_id=1, champion_version=1, verdict="ok")
        seconds = time.perf_counter() - started
        written = sum(f.stat().st_size for f in Path(tmp).rglob("*.json"))
    return seconds, written / 1e6


def _sampled(reference: Any, window: Any, spec: Any, importance: dict[str, float], max_rows: int) -> Any:
    from monitor.report import compute_drift

    return compute_drift(reference, window, spec, importance=importance, max_rows=max_rows)


def _verdict(result: Any) -> tuple[list[str], float | None]:
    prediction = [PREDICTION_COLUMN] if result.prediction and result.prediction.detected else []
    return result.drifted() + prediction, result.accuracy.mae if result.accuracy else None


def _full(reference: Any, window: Any, spec: Any) -> tuple[list[str], float | None]:
    """DataDriftPreset (every column) + RegressionPreset on every row; verdicts read from its ValueDrift
    results, found by metric type and column."""
    import warnings

    from evidently import DataDefinition, Dataset, Regression, Report
    from evidently.legacy.tests.base_test import TestStatus
    from evidently.metrics import MAE
    from evidently.presets import DataDriftPreset, RegressionPreset

    from retrain.train import PREDICTION

    definition = DataDefinition(
        numerical_columns=[*spec.numeric_features, PREDICTION, spec.target],
        categorical_columns=spec.categorical_features,
        regression=[Regression(target=spec.target, prediction=PREDICTION)],
    )
    columns = [*spec.feature_names, PREDICTION, spec.target]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # R² of one-row target bins in the regression plots
        snapshot = Report([DataDriftPreset(), RegressionPreset()], include_tests=True).run(
            Dataset.from_pandas(window[columns], data_definition=definition),
            Dataset.from_pandas(reference[columns], data_definition=definition),
        )
    drifted, mae = set(), None
    for result in snapshot.metric_results.values():
        config = result.to_dict()["config"]
        kind = str(config.get("type", "")).rsplit(":", 1)[-1]
        if kind == "ValueDrift" and any(
            t.id == "drift" and t.status is TestStatus.FAIL for t in result.tests
        ):
            drifted.add(config["column"])
        elif kind == MAE.__name__ and config.get("regression_name", "default") == "default":
            mae = float(result.mean.value)
    return [name for name in [*spec.feature_names, PREDICTION] if name in drifted], mae


def _reset_peak() -> float:
    """Reset this process's peak-RSS mark (Linux) and return the current RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    """Peak RSS since the reset (VmHWM). getrusage's ru_maxrss is not used: it also keeps the peak seen
    when any thread of the process exited, which may predate the reset."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


if __name__ == "__main__":
    main()
