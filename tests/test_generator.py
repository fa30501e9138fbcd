import numpy as np
import pytest

from core.generator import DISTRICT_LEVEL, OUTER_DISTRICTS, PYEONG_M2, SCENARIOS, generate_transactions
from core.spec import FeatureSpec


def test_deterministic_with_a_seed() -> None:
    a = generate_transactions(500, seed=7)
    b = generate_transactions(500, seed=7)
    assert a.equals(b)
    assert not a.equals(generate_transactions(500, seed=8))


def test_rows_fit_the_spec_and_are_time_ordered(spec: FeatureSpec) -> None:
    frame = generate_transactions(2000, seed=3)
    assert list(frame.columns) == [*spec.feature_names, "contract_date", "price_10k_krw"]
    assert frame["contract_date"].is_monotonic_increasing
    rows = frame[spec.feature_names].to_dict("records")
    assert [e for row in rows for e in spec.row_errors(row)] == []
    assert (frame["price_10k_krw"] > 0).all()


def test_districts_are_priced_about_three_times_apart() -> None:
    assert max(DISTRICT_LEVEL.values()) / min(DISTRICT_LEVEL.values()) == pytest.approx(2.99, abs=0.01)
    frame = generate_transactions(20000, seed=1)
    per_m2 = (frame["price_10k_krw"] / frame["area_m2"]).groupby(frame["district"]).median()
    assert per_m2["Gangnam-gu"] / per_m2["Dobong-gu"] > 2.5


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rows_before_the_change_are_identical_across_scenarios(scenario: str) -> None:
    kw = {"start": "2022-01-01", "end": "2022-12-31", "change_at": "2022-07-01", "seed": 5}
    base = generate_transactions(3000, scenario="none", **kw)
    other = generate_transactions(3000, scenario=scenario, **kw)
    before = base["contract_date"] < "2022-07-01"
    assert base[before].equals(other[before])


def test_scenarios_move_what_they_say() -> None:
    kw = {"start": "2022-01-01", "end": "2022-12-31", "change_at": "2022-01-01", "seed": 2}
    none = generate_transactions(6000, scenario="none", **kw)
    shock = generate_transactions(6000, scenario="rate_shock", **kw)
    town = generate_transactions(6000, scenario="new_town", **kw)
    bug = generate_transactions(6000, scenario="unit_bug", **kw)
    late = none["contract_date"] >= "2022-03-15"  # after the 60-day ramp
    ratio = shock.loc[late, "price_10k_krw"].sum() / none.loc[late, "price_10k_krw"].sum()
    assert ratio == pytest.approx(0.8, abs=0.01)
    assert shock[none.columns[:6]].equals(none[none.columns[:6]])  # concept drift: features unchanged
    assert town["district"].isin(OUTER_DISTRICTS).mean() > 0.6 > none["district"].isin(OUTER_DISTRICTS).mean()
    assert town["households"].median() > 2 * none["households"].median()
    shrunk = np.isclose(bug["area_m2"] * PYEONG_M2, none["area_m2"], atol=0.05)
    assert 0.85 < shrunk.mean() < 0.95
    assert bug["price_10k_krw"].equals(none["price_10k_krw"])


def test_unknown_scenario_is_named() -> None:
    with pytest.raises(ValueError, match="unknown scenario 'crash'"):
        generate_transactions(10, scenario="crash")
