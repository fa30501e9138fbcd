"""Seoul-style apartment sale transactions (아파트 실거래가) with named drift scenarios.

price (10k KRW) = area × district level × age × floor × subway × complex size × market index(t)
× lognormal noise.
Deterministic for a given seed. Rows before `change_at` are identical across scenarios with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import pandas as pd

Scenario = Literal["none", "rate_shock", "new_town", "unit_bug"]
SCENARIOS: tuple[Scenario, ...] = ("none", "rate_shock", "new_town", "unit_bug")

# Price level in 10k KRW per m² of exclusive area; the dearest gu is ~3× the cheapest.
DISTRICT_LEVEL: dict[str, float] = {
    "Gangnam-gu": 2450, "Seocho-gu": 2350, "Songpa-gu": 1950, "Yongsan-gu": 1900, "Seongdong-gu": 1650,
    "Mapo-gu": 1600, "Gwangjin-gu": 1500, "Yangcheon-gu": 1500, "Jongno-gu": 1400, "Jung-gu": 1400,
    "Yeongdeungpo-gu": 1400, "Dongjak-gu": 1400, "Gangdong-gu": 1350, "Seodaemun-gu": 1200,
    "Seongbuk-gu": 1100, "Dongdaemun-gu": 1100, "Gangseo-gu": 1100, "Eunpyeong-gu": 1000, "Guro-gu": 950,
    "Gwanak-gu": 950, "Nowon-gu": 900, "Jungnang-gu": 880, "Geumcheon-gu": 860, "Gangbuk-gu": 850,
    "Dobong-gu": 820,
}  # fmt: skip
OUTER_DISTRICTS = (
    "Gangseo-gu",
    "Eunpyeong-gu",
    "Nowon-gu",
    "Dobong-gu",
    "Guro-gu",
    "Jungnang-gu",
    "Gangbuk-gu",
)
PYEONG_M2 = 3.3058
# Features each scenario moves; rate_shock moves none (concept drift: only prices change).
DRIFTED_FEATURES: dict[str, tuple[str, ...]] = {
    "none": (),
    "rate_shock": (),
    "new_town": ("district", "area_m2", "build_year", "households"),
    "unit_bug": ("area_m2",),
}
RATE_SHOCK_DROP = 0.20
NEW_TOWN_SHARE = 0.6
UNIT_BUG_SHARE = 0.9
NOISE_SIGMA = 0.08


@dataclass(frozen=True, slots=True)
class Timeline:
    start: datetime
    end: datetime
    change_at: datetime | None


def to_utc(value: str | datetime | pd.Timestamp) -> datetime:
    ts = pd.Timestamp(value)
    ts = ts.tz_localize(UTC) if ts.tzinfo is None else ts.tz_convert(UTC)
    out: datetime = ts.to_pydatetime()
    return out


def generate_transactions(
    n: int,
    *,
    start: str | datetime = "2019-01-01",
    end: str | datetime = "2021-12-31",
    scenario: Scenario | str = "none",
    change_at: str | datetime | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """`n` transactions with contract dates uniform in [start, end), sorted by date.

    For a drift scenario the change starts at `change_at` (default: the midpoint of the range).
    Columns: the apartment spec's features, `contract_date` (UTC) and `price_10k_krw`.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    if n < 0:
        raise ValueError("n must be >= 0")
    t0, t1 = to_utc(start), to_utc(end)
    if t1 <= t0:
        raise ValueError("end must be after start")
    change = to_utc(change_at) if change_at is not None else t0 + (t1 - t0) / 2
    if scenario != "none" and change >= t1:  # before start is fine: every row has changed
        raise ValueError(f"change_at {change:%Y-%m-%d %H:%M} is not before end: no row would change")
    rng = np.random.default_rng(seed)

    seconds = np.sort(rng.uniform(0, (t1 - t0).total_seconds(), n))
    dates = (pd.to_datetime(t0) + pd.to_timedelta(seconds, unit="s")).floor("s")
    after = np.asarray(dates >= change) if scenario != "none" else np.zeros(n, dtype=bool)
    years = dates.year.to_numpy() + (dates.dayofyear.to_numpy() - 1) / 365.25

    districts = np.array(list(DISTRICT_LEVEL))
    district = rng.choice(districts, size=n)
    area = np.clip(rng.choice([39.0, 59.0, 84.0, 114.0, 135.0], size=n, p=[0.1, 0.3, 0.4, 0.12, 0.08])
                   + rng.normal(0, 3, n), 15, 250)  # fmt: skip
    build_year = np.clip(np.round(rng.uniform(1978, 2021, n)), 1970, 2030).astype(int)
    households = np.clip(np.round(rng.lognormal(np.log(600), 0.8, n)), 30, 12000).astype(int)
    subway = np.clip(rng.lognormal(np.log(550), 0.6, n), 30, 5000)
    floor = np.clip(np.round(rng.gamma(2.2, 4.5, n)), 1, 60).astype(int)
    noise = rng.lognormal(0.0, NOISE_SIGMA, n)
    # Draws for the scenarios come after the shared ones, so pre-change rows match across scenarios.
    scen_u = rng.uniform(0, 1, n)
    new_district = rng.choice(np.array(OUTER_DISTRICTS), size=n)
    new_year_offset = rng.integers(0, 3, n)
    new_households = np.round(rng.uniform(2500, 6000, n)).astype(int)
    new_area = np.clip(
        rng.choice([84.0, 114.0, 135.0], size=n, p=[0.5, 0.3, 0.2]) + rng.normal(0, 3, n), 15, 250
    )

    if scenario == "new_town":
        moved = after & (scen_u < NEW_TOWN_SHARE)
        district = np.where(moved, new_district, district)
        build_year = np.where(moved, np.floor(years).astype(int) - new_year_offset, build_year)
        households = np.where(moved, new_households, households)
        area = np.where(moved, new_area, area)

    level = np.array([DISTRICT_LEVEL[d] for d in district])
    age = np.maximum(np.floor(years) - build_year, 0)
    age_factor = 1.25 * np.exp(-0.012 * age) + np.where(age >= 30, 0.25, 0.0)  # reconstruction premium
    floor_factor = np.where(floor <= 2, 0.9, 1.0 + 0.004 * np.minimum(floor, 30))
    subway_factor = np.exp(-0.00012 * subway)
    size_factor = 1.0 + 0.05 * np.log(households / 600)
    price = area * level * age_factor * floor_factor * subway_factor * size_factor
    price = price * _market_index(years, after if scenario == "rate_shock" else None, dates, change) * noise

    reported_area = area
    if scenario == "unit_bug":
        reported_area = np.where(after & (scen_u < UNIT_BUG_SHARE), area / PYEONG_M2, area)

    return pd.DataFrame(
        {
            "district": district.astype(object),
            "area_m2": np.round(reported_area, 2),
            "floor": floor,
            "build_year": build_year.astype(int),
            "households": households.astype(int),
            "subway_distance_m": np.round(subway, 0),
            "contract_date": dates,
            "price_10k_krw": np.round(price, 0),
        }
    )


def _market_index(
    years: np.ndarray, shocked: np.ndarray | None, dates: pd.DatetimeIndex, change: datetime
) -> np.ndarray:
    """A flat market with a mild seasonal swing; a rate shock takes ~20 % off over 60 days."""
    index = 1.0 + 0.02 * np.sin(2 * np.pi * years)
    if shocked is None:
        return index
    days = np.asarray((dates - pd.Timestamp(change)).total_seconds() / 86400.0)
    ramp = np.clip(days / 60.0, 0.0, 1.0)
    return np.where(shocked, index * (1.0 - RATE_SHOCK_DROP * ramp), index)
