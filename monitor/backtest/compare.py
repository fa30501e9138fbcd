"""Is one policy's error really lower than another's? A paired block bootstrap over a replay."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from core.times import ns_times
from monitor.backtest.replay import Replay

# Error is correlated in time (a model is off for weeks at a stretch, the market has seasons), so the
# bootstrap resamples whole blocks of this much replayed time rather than single rows.
BOOTSTRAP_BLOCK = timedelta(days=28)
BOOTSTRAP_DRAWS = 4000
MIN_BLOCKS = 8  # fewer blocks than this give an interval only in name
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
    An interval that straddles 1 says the replay cannot tell the two apart. The interval is None when
    there is too little to resample (fewer than MIN_BLOCKS blocks, or a stratum of one block, which every
    draw would repeat) or when some draw's baseline made no error; the whole answer None when `baseline`
    sums to 0. Deterministic (a fixed seed).
    """
    total = float(baseline.sum())
    if total <= 0:
        return None
    ratio = float(errors.sum()) / total
    sums, base = np.bincount(blocks, errors), np.bincount(blocks, baseline)
    groups = (
        [np.arange(sums.size)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    )
    if sums.size < MIN_BLOCKS or min(g.size for g in groups) < 2:
        return ratio, None
    rng = np.random.default_rng(0)
    draws = np.hstack([g[rng.integers(0, g.size, (BOOTSTRAP_DRAWS, g.size))] for g in groups])
    drawn_base = base[draws].sum(axis=1)
    if (drawn_base <= 0).any():
        return ratio, None
    low, high = np.quantile(sums[draws].sum(axis=1) / drawn_base, [0.025, 0.975])
    return ratio, (float(low), float(high))


def bootstrap_blocks(replay: Replay, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each replayed row's bootstrap block and each block's stratum (see `time_blocks`): blocks of
    BOOTSTRAP_BLOCK or one step, whichever is longer, cut apart at the known change points."""
    changes = [c for c in replay.stream.change_points or () if c > replay.until]
    last = replay.replay[replay.stream.time_column].iloc[-1]
    return time_blocks(
        times, start=replay.until, end=last, cuts=changes, block=max(BOOTSTRAP_BLOCK, replay.config.step)
    )


def time_blocks(
    times: np.ndarray, *, start: datetime, end: datetime, cuts: list[datetime], block: timedelta
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's block (0..k-1, in time order) and each block's stratum, for `times` (naive UTC
    datetime64) in [start, end]: `cuts` split the span into strata, and each stratum into as many
    equal-length blocks as `block` fits into it (at least one), so that no short remainder block counts as
    much as a full one in a draw."""
    edges = [np.datetime64(pd.Timestamp(t).tz_convert(None), "ns") for t in (start, *cuts, end)]
    edges[-1] = max(edges[-1], times.max()) + np.timedelta64(1, "ns")  # the last row falls inside
    stratum = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, len(edges) - 2)
    codes, strata, offset = np.empty(times.size, dtype=np.int64), [], 0
    for s in range(len(edges) - 1):
        length = edges[s + 1] - edges[s]
        n = max(1, round(length / np.timedelta64(block)))
        rows = stratum == s
        share = (times[rows] - edges[s]) / length  # 0 ≤ share < 1
        codes[rows] = offset + np.minimum((share * n).astype(np.int64), n - 1)
        strata.extend([s] * n)
        offset += n
    used, codes = np.unique(codes, return_inverse=True)  # a block without rows is not a block
    return codes, np.asarray(strata)[used]


def replay_times(replay: Replay) -> np.ndarray:
    return ns_times(replay.replay[replay.stream.time_column])


def replay_errors(replay: Replay) -> dict[str, np.ndarray]:
    actual = replay.replay[replay.stream.spec.target].to_numpy(dtype=float)
    return {name: np.abs(trace.predictions - actual) for name, trace in replay.traces.items()}
