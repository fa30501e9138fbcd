"""The backtest over every built-in scenario: per scenario and policy, error relative to `never`, retrains,
training seconds and the drift policy's detection delay, with the issue's targets checked at the end.

    python bench/loop.py [--rows 36000] [--out var/bench-loop]

Settings come from DRIFTLOOP_* like everywhere else, except three defaults set here (say so when quoting the
figures): the retrain cooldown is 28 days (the live default, 1 h, is shorter than one weekly step); the drift
window holds the last 28 days (about 900 rows of this stream; the live default, the newest 5,000 rows, would
span five months here, and a change would stay a minority of it for months); and training rows lose half
their weight per 30 days of age (live default: no decay), so that a candidate learns a market that moved
rather than the average of old and new. Set any of the variables to override.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from core.generator import SCENARIOS
from core.settings import Settings
from core.spec import load_spec
from monitor.backtest.compare import Ratio, mae_ratio
from monitor.backtest.replay import POLICIES, ReplayConfig, run_replay
from monitor.backtest.results import TABLE_COLUMNS, PolicySummary, summarize, table_row, write_outputs
from monitor.backtest.stream import load_stream

BENCH_DEFAULTS = {
    "DRIFTLOOP_RETRAIN_COOLDOWN_S": str(28 * 86400),
    "DRIFTLOOP_WINDOW_SECONDS": str(28 * 86400),
    "DRIFTLOOP_TRAIN_HALF_LIFE_DAYS": "30",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=36_000)
    parser.add_argument("--out", type=Path, default=Path("var/bench-loop"))
    args = parser.parse_args()
    for key, value in BENCH_DEFAULTS.items():
        os.environ.setdefault(key, value)
    settings = Settings()
    config = ReplayConfig()
    console = Console(width=190)
    console.print(
        f"{args.rows:,} generated rows per scenario (2020–2022; v1 learns 2020–2021; change on 2022-04-01); "
        f"step {config.step.days} d, label delay {config.label_delay.days} d, monitor every "
        f"{config.monitor_every.days} d, periodic every {config.period.days} d; cooldown "
        f"{settings.retrain_cooldown_s / 86400:g} d, drift window {settings.window_rows:,} rows / "
        f"{(settings.window_seconds or 0) / 86400:g} d, accuracy window {settings.accuracy_window_rows:,} "
        f"labelled rows, train window {_days(settings.train_window_days, 'all rows')}, half-life "
        f"{_days(settings.train_half_life_days, 'off')}, "
        f"{settings.train_iterations} iterations"
    )
    results: dict[str, dict[str, PolicySummary]] = {}
    vs_periodic: dict[str, Ratio] = {}
    for scenario in SCENARIOS:
        started = time.perf_counter()
        stream = load_stream(f"generated:{scenario}", load_spec(settings.spec_path), rows=args.rows)
        replay = run_replay(
            stream, settings=settings, config=config, policies=POLICIES, until=stream.default_train_until(),
            workdir=args.out / scenario / "work",
        )  # fmt: skip
        summaries, periods = summarize(replay)
        write_outputs(replay, summaries, periods, args.out / scenario)
        results[scenario] = {x.policy: x for x in summaries}
        vs_periodic[scenario] = mae_ratio(replay, "drift", "periodic")
        console.print(f"  {scenario}: {time.perf_counter() - started:.0f} s → {args.out / scenario}")
    console.print(_table(results))
    for line in _targets(results, vs_periodic):
        console.print(line)
    return 0


def _days(value: float | None, unset: str) -> str:
    return unset if value is None else f"{value:g} d"


def _table(results: dict[str, dict[str, PolicySummary]]) -> Table:
    table = Table("scenario", *TABLE_COLUMNS, title="backtest: every built-in scenario")
    for scenario, by_policy in results.items():
        for x in by_policy.values():
            table.add_row(scenario, *table_row(x))
        table.add_section()
    return table


def _targets(results: dict[str, dict[str, PolicySummary]], vs_periodic: dict[str, Ratio]) -> list[str]:
    lines = []
    stable = results["none"]["drift"]
    lines.append(_check(stable.retrains == 0, f"none: drift policy retrains {stable.retrains} (target 0)"))
    for scenario in SCENARIOS[1:]:
        drift, periodic = results[scenario]["drift"], results[scenario]["periodic"]
        d = drift.detections[0]
        lines.append(
            _check(
                d.cycles_after_ready is not None and d.cycles_after_ready <= 2,
                f"{scenario}: detected {d.delay_days} d after the change: monitor run {d.cycles_after_ready} "
                "counted from the first whose window held min_window_rows post-change rows (target ≤ 2; "
                f"0 = even before), run {d.cycles_after_labels_ready} counted from the first that saw "
                "min_labelled_rows post-change labels",
            )
        )
        lines.append(
            _check(
                drift.cumulative_mae <= periodic.cumulative_mae and drift.retrains < periodic.retrains,
                f"{scenario}: drift MAE {drift.cumulative_mae:,.0f} with {drift.retrains} retrains vs "
                f"periodic {periodic.cumulative_mae:,.0f} with {periodic.retrains} "
                f"(target: ≤ MAE with fewer retrains); {_ratio(vs_periodic[scenario])}",
            )
        )
        if drift.post_swap_mae is not None and drift.post_swap_oracle_mae:
            ratio = drift.post_swap_mae / drift.post_swap_oracle_mae
            lines.append(
                _check(ratio <= 1.1, f"{scenario}: post-swap MAE {ratio:.2f}× the oracle's (target ≤ 1.1×)")
            )
        else:
            lines.append(_check(False, f"{scenario}: no swap after the change to compare with the oracle"))
    return lines


def _ratio(ratio: Ratio) -> str:
    if ratio is None:
        return "periodic made no error to compare with"
    value, ci = ratio
    if ci is None:
        return f"drift/periodic {value:.3f}"
    verdict = "cannot tell them apart" if ci[0] <= 1 <= ci[1] else "a real difference"
    return f"drift/periodic {value:.3f}, 95 % CI {ci[0]:.3f}–{ci[1]:.3f} ({verdict})"


def _check(ok: bool, text: str) -> str:
    return f"[{'green' if ok else 'red'}]{'met ' if ok else 'MISSED'}[/] {text}"


if __name__ == "__main__":
    sys.exit(main())
