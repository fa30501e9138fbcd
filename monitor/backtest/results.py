"""What a replay shows: error per period and in total, retrains, compute, detection delay, false retrains."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.figures import figure
from monitor.backtest.compare import bootstrap_blocks, paired_ratio, replay_errors, replay_times
from monitor.backtest.replay import MonitorRecord, PolicyTrace, Replay, step_bounds
from monitor.backtest.stream import duration_words
from retrain.runner import jsonable


@dataclass(frozen=True, slots=True)
class Detection:
    """How the drift policy met one known change point."""

    change_at: datetime
    first_breach_at: datetime | None
    delay_days: float | None
    # Monitor runs, counted from the first one at which the window could hold `min_window_rows` post-change
    # rows (1 = that very run; 0 = the breach came even earlier), until the first breach; None: no breach.
    cycles_after_ready: int | None
    # The same, counted from the first run that could see `min_labelled_rows` post-change labels: the
    # evidence a change that only moves the target (concept drift) is detected on.
    cycles_after_labels_ready: int | None
    first_swap_at: datetime | None
    swap_delay_days: float | None
    # When that breach continues a run of breaches begun at or before the change, the run's first: the
    # delay then says nothing of how soon the monitor saw the change. None: the run began after it.
    breaching_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class PolicySummary:
    policy: str
    rows: int
    cumulative_mae: float
    mae_vs_never: float | None  # cumulative MAE / never's
    # 95 % interval of that ratio, by a bootstrap over blocks of about 28 days of replayed time, drawn apart
    # before and after each known change point; None without `never` or with too few blocks to resample
    # (see monitor/backtest/compare.py).
    mae_vs_never_ci: tuple[float, float] | None
    mae_before_change: float | None
    mae_after_change: float | None
    retrains: int
    promotions: int
    retrain_seconds: float
    # Retrains started, and breaching monitor runs, up to the first change point (all of them on a stable
    # stream); None when the change points are unknown (a user's CSV without --change-at).
    false_retrains: int | None
    false_breaches: int | None
    post_swap_mae: float | None  # drift only: MAE from its first post-change swap on
    post_swap_oracle_mae: float | None  # the oracle's MAE on the same rows
    detections: tuple[Detection, ...]
    # drift only: its monitor runs by verdict ("ok", "breach", "insufficient": too few rows to judge)
    monitor_verdicts: dict[str, int] = field(default_factory=dict)
    # Retrain runs that failed (counted among `retrains`), and the first one's time and error.
    failed_retrains: int = 0
    first_retrain_error: str | None = None


TABLE_COLUMNS = (
    "policy", "cum. MAE", "vs never (95 % CI)", "MAE after change", "retrains (promoted)", "train s",
    "detection delay", "runs after rows/labels ready", "swap delay", "false retrains",
)  # fmt: skip


def table_row(x: PolicySummary) -> list[str]:
    """One policy's summary as the printed table shows it (TABLE_COLUMNS); '-' where nothing applies, and
    one figure per change point, comma-separated, in the detection columns."""

    def num(value: float | int | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    def mae(value: float | None) -> str:  # in the target's units: 8,148 for a price, 0.0834 for a rate
        return "-" if value is None else figure(value)

    def days(value: float | None) -> str:
        return "-" if value is None else f"{value:g} d"

    def each(show: Callable[[Detection], str]) -> str:
        return ", ".join(show(d) for d in x.detections) or "-"

    return [
        x.policy, mae(x.cumulative_mae), _ratio_text(x.mae_vs_never, x.mae_vs_never_ci),
        mae(x.mae_after_change),
        f"{x.retrains} ({x.promotions})", num(x.retrain_seconds, ".1f"),
        each(lambda d: days(d.delay_days)),
        each(lambda d: f"{num(d.cycles_after_ready, 'd')} / {num(d.cycles_after_labels_ready, 'd')}"),
        each(lambda d: days(d.swap_delay_days)),
        num(x.false_retrains, "d"),
    ]  # fmt: skip


BLIND_SHARE = 0.5  # a drift policy without a verdict for more of its monitor runs than this gets a warning


def blind_monitor_warning(summary: PolicySummary, min_window_rows: int) -> str | None:
    """A warning when the drift policy's monitor could not judge most of its runs: too few rows of the
    serving champion's predictions in the window (it starts afresh at each swap). Its figures then say
    little about the policy, only that it rarely got to look."""
    runs = sum(summary.monitor_verdicts.values())
    blind = summary.monitor_verdicts.get("insufficient", 0)
    if not runs or blind / runs <= BLIND_SHARE:
        return None
    return (
        f"{summary.policy}: {blind} of {runs} monitor runs had fewer than DRIFTLOOP_MIN_WINDOW_ROWS="
        f"{min_window_rows} rows of the serving champion's predictions to judge (the count starts afresh at "
        f"each swap), so its figures rest on {runs - blind} verdict(s); for data this sparse lower "
        "DRIFTLOOP_MIN_WINDOW_ROWS (and widen DRIFTLOOP_WINDOW_SECONDS if it is set)"
    )


def carried_breach_warnings(summary: PolicySummary) -> list[str]:
    """A warning for each detection whose breach only continued a run of breaches begun before its change
    point (false breaches, or the previous change's): its delay is not the monitor seeing that change."""
    return [
        f"{summary.policy}: the breach counted as detecting the change at {d.change_at:%Y-%m-%d %H:%M} "
        f"({d.delay_days:g} d after it) continues a run of breaches begun "
        f"{d.breaching_since:%Y-%m-%d %H:%M}, before the change; that delay does not measure how soon the "
        "monitor saw it"
        for d in summary.detections
        if d.breaching_since is not None
    ]


def failed_retrain_warning(summary: PolicySummary) -> str | None:
    """A warning when some of a policy's retrain runs failed: they count among its retrains and training
    seconds, yet trained nothing (an oracle's first run after a change, say, on the few labels there are)."""
    if not summary.failed_retrains:
        return None
    return (
        f"{summary.policy}: {summary.failed_retrains} of {summary.retrains} retrain runs failed and trained "
        f"nothing; the first {summary.first_retrain_error}"
    )


def _ratio_text(ratio: float | None, ci: tuple[float, float] | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else " (-)")  # -: too little to resample


def summarize(replay: Replay) -> tuple[list[PolicySummary], pd.DataFrame]:
    """Per-policy summaries and the per-period table (one row per policy and step)."""
    changes = replay.stream.change_points or ()
    times = replay_times(replay)
    first_change = np.datetime64(pd.Timestamp(changes[0]).tz_convert(None), "ns") if changes else None
    after = times >= first_change if first_change is not None else np.zeros(len(times), dtype=bool)
    errors = replay_errors(replay)
    blocks = bootstrap_blocks(replay, times)
    summaries = [
        _summary(replay, trace, errors, after, times, blocks, changes) for trace in replay.traces.values()
    ]
    return summaries, _periods(replay, errors, times)


def _summary(
    replay: Replay,
    trace: PolicyTrace,
    errors: dict[str, np.ndarray],
    after: np.ndarray,
    times: np.ndarray,
    blocks: tuple[np.ndarray, np.ndarray],
    changes: tuple[datetime, ...],
) -> PolicySummary:
    err = errors[trace.name]
    first_change = changes[0] if changes else None
    known = replay.stream.change_points is not None
    post_swap, post_swap_oracle = None, None
    detections: tuple[Detection, ...] = ()
    if trace.name == "drift":
        detections = tuple(
            _detection(replay, trace, change, next(iter(changes[i + 1 :]), None), times)
            for i, change in enumerate(changes)
        )
        swap = next((d.first_swap_at for d in detections if d.first_swap_at), None)
        if swap is not None:
            rows = times >= np.datetime64(pd.Timestamp(swap).tz_convert(None), "ns")
            if rows.any():
                post_swap = float(err[rows].mean())
                if "oracle" in errors:
                    post_swap_oracle = float(errors["oracle"][rows].mean())
    cumulative = float(err.mean())
    failed = [r for r in trace.retrains if r.status == "failed"]
    vs_never = paired_ratio(err, errors["never"], *blocks) if "never" in errors else None
    return PolicySummary(
        policy=trace.name,
        rows=int(err.size),
        cumulative_mae=cumulative,
        mae_vs_never=vs_never[0] if vs_never else None,
        mae_vs_never_ci=vs_never[1] if vs_never else None,
        mae_before_change=float(err[~after].mean()) if (~after).any() and changes else None,
        mae_after_change=float(err[after].mean()) if after.any() else None,
        retrains=len(trace.retrains),
        promotions=sum(r.status == "promoted" for r in trace.retrains),
        retrain_seconds=round(sum(r.seconds for r in trace.retrains), 2),
        false_retrains=_before(first_change, [r.at for r in trace.retrains], known=known),
        false_breaches=_before(first_change, [m.at for m in trace.monitors if m.breach], known=known),
        post_swap_mae=post_swap,
        post_swap_oracle_mae=post_swap_oracle,
        detections=detections,
        monitor_verdicts=dict(Counter(m.verdict for m in trace.monitors)),
        failed_retrains=len(failed),
        first_retrain_error=f"at {failed[0].at:%Y-%m-%d %H:%M}: {failed[0].error}" if failed else None,
    )


def _before(change: datetime | None, times: list[datetime], *, known: bool) -> int | None:
    """How many of `times` come at or before `change` (all of them with no change): a run at the change's
    own time judged only rows before it. None when unknowable."""
    if not known:
        return None
    return sum(change is None or t <= change for t in times)


def _detection(
    replay: Replay, trace: PolicyTrace, change: datetime, end: datetime | None, times: np.ndarray
) -> Detection:
    """The drift policy's answer to `change`: its first breach and swap after it, up to the next change
    point (`end`) included. A run at time t judged the rows before t, so one at a change point's own time
    saw none of that change's rows: it answered the change before (or was a false breach)."""
    post = np.flatnonzero(times >= np.datetime64(pd.Timestamp(change).tz_convert(None), "ns"))

    def within(at: datetime) -> bool:
        return at > change and (end is None or at <= end)

    def nth_post_change_row(n: int) -> datetime | None:
        return pd.Timestamp(times[post[n - 1]], tz="UTC").to_pydatetime() if post.size >= n else None

    def cycles_after(ready: datetime | None) -> int | None:
        if breach is None or ready is None:
            return None
        # A run at time t saw the rows before t: the first run after `ready` is the first that held them.
        return sum(1 for m in trace.monitors if ready < m.at <= breach) if breach > ready else 0

    def streak_start(last: MonitorRecord) -> datetime:
        """Where the run of breaches ending with `last` began, as in the policy's own count: a run for
        another champion ends it (a swap starts a new one); runs without a verdict (too few rows) neither
        count nor end it."""
        at = last.at
        for m in reversed([m for m in trace.monitors if m.at < last.at]):
            if m.champion_version != last.champion_version:
                break
            if m.verdict == "insufficient":
                continue
            if not m.breach:
                break
            at = m.at
        return at

    first = next((m for m in trace.monitors if m.breach and within(m.at)), None)
    breach = first.at if first else None
    since = streak_start(first) if first else None
    labelled = nth_post_change_row(replay.settings.min_labelled_rows)
    swap = next((r.at for r in trace.retrains if r.status == "promoted" and within(r.at)), None)
    return Detection(
        change_at=change,
        first_breach_at=breach,
        delay_days=_days(breach - change) if breach else None,
        cycles_after_ready=cycles_after(nth_post_change_row(replay.settings.min_window_rows)),
        cycles_after_labels_ready=cycles_after(labelled + replay.config.label_delay if labelled else None),
        first_swap_at=swap,
        swap_delay_days=_days(swap - change) if swap else None,
        breaching_since=since if since is not None and since <= change else None,
    )


def _periods(replay: Replay, errors: dict[str, np.ndarray], times: np.ndarray) -> pd.DataFrame:
    """One row per policy and step, a step without rows included (0 rows, no MAE or version): a retrain or
    breach at its end is still one of the policy's."""
    step = replay.config.step
    last = replay.replay[replay.stream.time_column].iloc[-1].to_pydatetime()
    steps = len(step_bounds(replay.until, last, step)) - 1
    since = times - np.datetime64(pd.Timestamp(replay.until).tz_convert(None), "ns")
    index = (since // np.timedelta64(step)).astype(int)
    frames = []
    for name, trace in replay.traces.items():
        frame = pd.DataFrame({"k": index, "error": errors[name], "version": trace.versions})
        grouped = (
            frame.groupby("k")
            .agg(rows=("error", "size"), mae=("error", "mean"), champion_version=("version", "max"))
            .reindex(range(steps))
        )
        start = [replay.until + step * k for k in range(steps)]
        events = {r.at: r.status for r in trace.retrains}
        breaches = {m.at for m in trace.monitors if m.breach}
        frames.append(
            pd.DataFrame(
                {
                    "policy": name,
                    "period_start": start,
                    "period_end": [s + step for s in start],
                    "rows": grouped["rows"].fillna(0).astype(int).to_numpy(),
                    # significant digits, not decimals: a rate's MAE of 0.0005 is not 0.001 or 0
                    "mae": [float(f"{v:.6g}") for v in grouped["mae"]],
                    "champion_version": grouped["champion_version"].astype("Int64").to_numpy(),
                    "retrain": [events.get(s + step, "") for s in start],
                    "breach": [(s + step) in breaches for s in start],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


OUTPUTS = {"summary": "summary.json", "periods": "periods.csv", "plot": "backtest.png"}


def clear_outputs(out: Path) -> None:
    """Remove an earlier run's outputs from `out` before a replay, so that a run cut short (Ctrl-C, a crash)
    does not leave them beside its own scratch state, looking like its results."""
    for name in OUTPUTS.values():
        if (out / name).is_file():
            (out / name).unlink()


def write_outputs(
    replay: Replay, summaries: list[PolicySummary], periods: pd.DataFrame, out: Path
) -> dict[str, Path]:
    """summary.json, periods.csv and backtest.png in `out`; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in OUTPUTS.items()}
    periods.to_csv(paths["periods"], index=False)
    _plot(replay, periods, paths["plot"])
    # Last: a summary.json is there only once the other outputs are.
    paths["summary"].write_text(json.dumps(_summary_json(replay, summaries), indent=2, default=str))
    return paths


def _summary_json(replay: Replay, summaries: list[PolicySummary]) -> dict[str, Any]:
    config = replay.config
    s = replay.settings
    return {
        "data": replay.stream.source,
        "rows": {"initial": len(replay.stream.frame) - len(replay.replay), "replayed": len(replay.replay)},
        "initial_train_until": replay.until,
        "change_points": list(replay.stream.change_points)
        if replay.stream.change_points is not None
        else None,
        "step_days": config.step.total_seconds() / 86400,
        "label_delay_days": config.label_delay.total_seconds() / 86400,
        "monitor_every_days": config.monitor_every.total_seconds() / 86400,
        "periodic_every_days": config.period.total_seconds() / 86400,
        "v1_validation_mae": replay.v1_validation_mae,
        # Every setting that changes what the replay does: the monitor's windows, the policy's rules, the
        # trainer and the gate.
        "policy_config": {
            k: getattr(s, k)
            for k in (
                "window_rows",
                "window_seconds",
                "accuracy_window_rows",
                "evidently_max_rows",
                "drift_stattest_threshold",
                "sample_seed",
                "min_window_rows",
                "min_labelled_rows",
                "drift_share_threshold",
                "weighted_drift_threshold",
                "mae_degradation_ratio",
                "lineage_baseline",
                "consecutive_breaches",
                "retrain_cooldown_s",
                "max_retrains_per_day",
                "auto_retrain",
                "gate_margin",
                "holdout_fraction",
                "new_data_weight_share",
                "train_window_days",
                "train_half_life_days",
                "refit",
                "train_iterations",
                "train_depth",
                "train_learning_rate",
            )
        },
        "policies": {x.policy: jsonable(asdict(x)) for x in summaries},
        "workdir": str(replay.workdir),
    }


def error_axis_label(step: timedelta) -> str:
    """The plot's error axis, in the step's own unit: a 12-hour step is not a "1-day period"."""
    return f"MAE per step ({duration_words(step)})"


# One colour per policy whatever the policies replayed, none of them the breach bands' red.
POLICY_COLORS = {"never": "tab:blue", "periodic": "tab:orange", "drift": "tab:green", "oracle": "tab:purple"}
BREACH_COLOR = "tab:red"


def _plot(replay: Replay, periods: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drift = replay.traces.get("drift")
    rows = 2 if drift is not None and drift.monitors else 1
    fig, axes = plt.subplots(rows, 1, figsize=(11, 4.2 * rows), sharex=True, squeeze=False)
    ax = axes[0][0]
    for name, frame in periods.groupby("policy", sort=False):
        ends = pd.to_datetime(frame["period_end"], utc=True)
        served = (frame["rows"] > 0).to_numpy()
        color = POLICY_COLORS[str(name)]
        ax.plot(ends[served], frame["mae"][served], label=str(name), lw=1.6, color=color)
        # A swap at the end of a step without rows sits on the line between its neighbours.
        swaps = (frame["retrain"] == "promoted").to_numpy()
        at = ends.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        height = np.interp(at[swaps], at[served], frame["mae"].to_numpy()[served])
        ax.scatter(ends[swaps], height, marker="^", s=40, color=color, zorder=3)
    for change in replay.stream.change_points or ():
        ax.axvline(change, color="black", ls="--", lw=1)
    if drift is not None:
        for m in drift.monitors:
            if m.breach:
                ax.axvline(m.at, color=BREACH_COLOR, alpha=0.15, lw=3)
    ax.set_ylabel(error_axis_label(replay.config.step))
    ax.set_title(
        f"Backtest on {replay.stream.source}: error per policy (▲ swap, red band drift breach, -- change)"
    )
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    if rows == 2 and drift is not None:
        ax2 = axes[1][0]
        at = [m.at for m in drift.monitors]
        ax2.plot(at, [m.drift_share for m in drift.monitors], marker=".", label="drift share")
        ax2.plot(at, [m.weighted_score for m in drift.monitors], marker=".", label="weighted drift score")
        ax2.axhline(replay.settings.drift_share_threshold, color="tab:blue", ls=":", lw=1)
        ax2.axhline(replay.settings.weighted_drift_threshold, color="tab:orange", ls=":", lw=1)
        ax2.set_ylabel("drift policy's monitor: drift")
        ax2.set_ylim(-0.02, 1.02)
        ax2.legend(loc="upper left")
        ax2.grid(alpha=0.3)
        lineage = replay.settings.lineage_baseline
        ratio = accuracy_ratios(drift.monitors, lineage_baseline=lineage)
        ax3 = ax2.twinx()
        yardstick = "min(champion, line best) val. MAE" if lineage else "champion validation MAE"
        ax3.plot(at, ratio, color="tab:green", marker=".", label="window MAE / yardstick")
        ax3.axhline(replay.settings.mae_degradation_ratio, color="tab:green", ls=":", lw=1)
        ax3.set_ylabel(f"accuracy: window MAE / {yardstick}")
        ax3.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_ratios(monitors: list[MonitorRecord], *, lineage_baseline: bool) -> list[float | None]:
    """Each monitor run's window MAE over the yardstick the policy's accuracy rule judged it by (None where
    either is missing): the champion's validation MAE or, with the lineage baseline, its line's best when
    lower (see monitor/policy.py), so that a ratio above DRIFTLOOP_MAE_DEGRADATION_RATIO breaches (given
    DRIFTLOOP_MIN_LABELLED_ROWS labels), as the breaches marked beside it show."""
    ratios: list[float | None] = []
    for m in monitors:
        yardstick = m.champion_mae
        if lineage_baseline and m.baseline_mae is not None and yardstick is not None:
            yardstick = min(yardstick, m.baseline_mae)
        ratios.append(m.mae / yardstick if m.mae is not None and yardstick else None)
    return ratios


def _days(delta: timedelta) -> float:
    return round(delta.total_seconds() / 86400, 2)
