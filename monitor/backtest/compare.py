"""Is one policy's error really lower than another's? A paired block bootstrap over a replay."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd

from monitor.backtest.replay import Replay
from monitor.backtest.stream import ns_times

# Error is correlated in time (a model is off for weeks at a stretch, the market has seasons), so the
# bootstrap resamples whole blocks of this much replayed time rather than single rows.
BOOTSTRAP_BLOCK = timedelta(days=28)
BOOTSTRAP_DRAWS = 4000
# A ratio of two policies' cumulative MAE and its 95 % interval (None: too little replay for one); None
# when the second policy made no error at all.
Ratio = tuple[float, tuple[float, float] | None] | None


def mae_ratio(replay: Replay, policy: str, baseline: str) -> Ratio:
    """`policy`'s cumulative MAE / `baseline`'s on the same replayed rows, and its 95 % interval (see
    `paired_ratio`); None when `baseline` made no error at all."""
    errors = replay_errors(replay)
    return paired_ratio(errors[policy], errors[baseline], *bootstrap_blocks(replay, replay_times(replay)))


def paired_ratio(
    errors: np.ndarray, baseline: np.ndarray, blocks: np.ndarray, strata: np.ndarray | None = None
) -> Ratio:
    """sum(errors) / sum(baseline), and its 95 % interval by a block bootstrap.

    `blocks` numbers each row's block 0..k-1; `strata` (one per block, optional) groups the blocks, and a
    draw takes as many blocks from each stratum as it has, so that the share of each (the replay before
    and after a known change point, say) stays what it was rather than becoming part of the noise.
    Both error arrays are for the same rows (policies answering one stream), so the comparison is paired:
    the bootstrap draws whole blocks with replacement and recomputes the ratio of the two sums over them.
    An interval that straddles 1 says the replay cannot tell the two apart. The interval is None with fewer
    than two blocks; the whole answer None when `baseline` sums to 0. Deterministic (a fixed seed).
    """
    total = float(baseline.sum())
    if total <= 0:
        return None
    ratio = float(errors.sum()) / total
    sums, base = np.bincount(blocks, errors), np.bincount(blocks, baseline)
    if sums.size < 2:
        return ratio, None
    rng = np.random.default_rng(0)
    groups = (
        [np.arange(sums.size)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    )
    draws = np.hstack([g[rng.integers(0, g.size, (BOOTSTRAP_DRAWS, g.size))] for g in groups])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = sums[draws].sum(axis=1) / base[draws].sum(axis=1)
    low, high = np.quantile(ratios[np.isfinite(ratios)], [0.025, 0.975])
    return ratio, (float(low), float(high))


def bootstrap_blocks(replay: Replay, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each replayed row's bootstrap block, and each block's stratum: the replay is cut at every known
    change point into strata, and each stratum into blocks of BOOTSTRAP_BLOCK (at least one step)."""
    block = np.timedelta64(max(BOOTSTRAP_BLOCK, replay.config.step))
    starts = [replay.until, *(c for c in replay.stream.change_points or () if c > replay.until)]
    edges = np.array([np.datetime64(pd.Timestamp(t).tz_convert(None), "ns") for t in starts])
    stratum = np.searchsorted(edges, times, side="right") - 1
    within = (times - edges[stratum]) // block
    codes, keys = pd.factorize(pd.MultiIndex.from_arrays([stratum, within]))
    return np.asarray(codes), np.asarray(keys.get_level_values(0))


def replay_times(replay: Replay) -> np.ndarray:
    return ns_times(replay.replay[replay.stream.time_column])


def replay_errors(replay: Replay) -> dict[str, np.ndarray]:
    actual = replay.replay[replay.stream.spec.target].to_numpy(dtype=float)
    return {name: np.abs(trace.predictions - actual) for name, trace in replay.traces.items()}
