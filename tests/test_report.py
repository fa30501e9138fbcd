"""compute_drift on a tiny real champion, real Evidently, windows from the generator's scenarios."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from catboost import CatBoostRegressor

from core.figures import figure
from core.generator import DRIFTED_FEATURES, generate_transactions
from core.registry import Registry
from core.schema import ModelVersion
from core.spec import FeatureSpec
from monitor.report import DriftResult, compute_accuracy, compute_drift
from retrain.train import PREDICTION, predict, regression_metrics

JS = "Jensen-Shannon distance"
WASSERSTEIN = "Wasserstein distance (normed)"


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """The database is not the subject here: SQLite only (overrides the sqlite/postgresql pair)."""
    return sqlite_url


@dataclass(frozen=True, slots=True)
class Champion:
    model: CatBoostRegressor
    reference: pd.DataFrame
    importance: dict[str, float]
    val_mae: float


@pytest.fixture
def v1(registry: Registry, champion: ModelVersion) -> Champion:
    return Champion(
        model=registry.load(champion),
        reference=registry.reference(champion),
        importance=dict(champion.feature_importance),
        val_mae=float(champion.metrics["val_mae"]),
    )


def make_window(
    v1: Champion, spec: FeatureSpec, *, scenario: str = "none", rows: int = 3000, labelled_every: int = 2
) -> pd.DataFrame:
    """2022 traffic (the champion saw 2019–2021), all of it after the scenario's change; every
    `labelled_every`-th row has its label, the rest NaN."""
    raw = generate_transactions(
        rows, start="2022-01-01", end="2022-12-31", scenario=scenario, change_at="2022-01-01", seed=7
    )
    return served(v1, spec, raw, labelled_every=labelled_every)


def served(v1: Champion, spec: FeatureSpec, raw: pd.DataFrame, *, labelled_every: int = 2) -> pd.DataFrame:
    window = spec.coerce(raw)
    window[PREDICTION] = predict(v1.model, window, spec)
    window[spec.target] = raw[spec.target].astype(float).where(np.arange(len(raw)) % labelled_every == 0)
    return window


def drift(v1: Champion, spec: FeatureSpec, window: pd.DataFrame, **kwargs: object) -> DriftResult:
    return compute_drift(v1.reference, window, spec, importance=v1.importance, **kwargs)  # type: ignore[arg-type]


def test_a_stable_window_is_not_flagged(v1: Champion, spec: FeatureSpec) -> None:
    result = drift(v1, spec, make_window(v1, spec))

    assert result.drifted() == []
    assert (result.drift_share, result.weighted_score) == (0.0, 0.0)
    assert [(f.feature, f.method, f.threshold) for f in result.features] == [
        ("district", JS, 0.1),
        ("area_m2", WASSERSTEIN, 0.1),
        ("floor", WASSERSTEIN, 0.1),
        ("build_year", WASSERSTEIN, 0.1),
        ("households", WASSERSTEIN, 0.1),
        ("subway_distance_m", WASSERSTEIN, 0.1),
    ]
    assert all(0 <= f.score < 0.1 for f in result.features)
    assert [f.importance for f in result.features] == [v1.importance[n] for n in spec.feature_names]
    assert result.prediction is not None and not result.prediction.detected
    assert (result.rows, result.sampled_rows, result.labelled_rows) == (3000, 3000, 1500)
    assert result.accuracy is not None and result.accuracy.rows == 1500


def test_new_town_flags_the_moved_features(v1: Champion, spec: FeatureSpec) -> None:
    result = drift(v1, spec, make_window(v1, spec, scenario="new_town"))

    assert set(DRIFTED_FEATURES["new_town"]) <= set(result.drifted())
    assert {"floor", "subway_distance_m"}.isdisjoint(result.drifted())
    assert result.drift_share >= 0.5
    assert result.prediction is not None and result.prediction.detected


def test_unit_bug_flags_area_only(v1: Champion, spec: FeatureSpec) -> None:
    result = drift(v1, spec, make_window(v1, spec, scenario="unit_bug"))

    assert result.drifted() == list(DRIFTED_FEATURES["unit_bug"]) == ["area_m2"]
    assert result.drift_share == pytest.approx(1 / 6)
    assert result.weighted_score == pytest.approx(v1.importance["area_m2"] / sum(v1.importance.values()))
    assert result.prediction is not None and result.prediction.detected


def test_rate_shock_moves_no_feature_but_accuracy_drops(v1: Champion, spec: FeatureSpec) -> None:
    stable = drift(v1, spec, make_window(v1, spec))
    shocked = drift(v1, spec, make_window(v1, spec, scenario="rate_shock"))

    assert shocked.drifted() == []
    assert shocked.prediction is not None and not shocked.prediction.detected
    assert stable.accuracy is not None and shocked.accuracy is not None
    assert shocked.accuracy.mae > 1.5 * v1.val_mae
    assert shocked.accuracy.mae > 1.5 * stable.accuracy.mae
    assert shocked.accuracy.mape > 1.5 * stable.accuracy.mape
    # Prices fell under the model: it over-predicts, and its bias is most of its error.
    assert shocked.accuracy.mean_error > 0.5 * shocked.accuracy.mae
    assert abs(stable.accuracy.mean_error) < 0.5 * shocked.accuracy.mean_error


def test_accuracy_is_evidently_mae_rmse_mape_and_mean_error_on_the_labelled_rows(
    v1: Champion, spec: FeatureSpec
) -> None:
    window = make_window(v1, spec, labelled_every=3)
    result = drift(v1, spec, window)

    labelled = window[window[spec.target].notna()]
    err = labelled[PREDICTION] - labelled[spec.target]
    assert result.accuracy is not None
    assert result.labelled_rows == result.accuracy.rows == 1000
    assert result.accuracy.mae == pytest.approx(err.abs().mean())
    assert result.accuracy.rmse == pytest.approx(np.sqrt((err**2).mean()))
    assert result.accuracy.mape == pytest.approx((err / labelled[spec.target]).abs().mean() * 100)
    assert result.accuracy.mean_error == pytest.approx(err.mean())
    assert result.to_json()["accuracy"]["mean_error"] == pytest.approx(err.mean())


def test_mape_divides_by_the_size_of_each_actual_and_skips_zeros_as_validation_does(
    v1: Champion, spec: FeatureSpec
) -> None:
    """A target that goes negative (here the prices less their median), two actuals at exactly 0: Evidently's
    MAPE divided each error by max(actual, 2.2e-16), a MAPE of ~1e20 %, and counted a zero actual as 100 %,
    where the champion's validation MAPE (retrain.train.regression_metrics) skips it."""
    window = make_window(v1, spec, rows=1000, labelled_every=1)
    shift = window[spec.target].median()
    for column in (spec.target, PREDICTION):
        window[column] = window[column] - shift
    window.loc[:1, spec.target] = 0.0
    result = drift(v1, spec, window)

    actual, err = window[spec.target], window[PREDICTION] - window[spec.target]
    assert (actual < 0).sum() > 400
    nonzero = actual != 0
    assert result.accuracy is not None
    assert result.accuracy.mape == pytest.approx((err[nonzero] / actual[nonzero]).abs().mean() * 100)
    assert result.accuracy.mape == pytest.approx(regression_metrics(actual, window[PREDICTION])["mape"])
    assert result.accuracy.mae == pytest.approx(err.abs().mean())


def test_a_window_without_labels_has_no_accuracy(v1: Champion, spec: FeatureSpec) -> None:
    window = make_window(v1, spec, rows=1500)
    window[spec.target] = np.nan

    result = drift(v1, spec, window)

    assert (result.accuracy, result.labelled_rows, result.rows) == (None, 0, 1500)
    assert result.to_json()["accuracy"] is None


def test_one_labelled_row_is_enough_for_accuracy(v1: Champion, spec: FeatureSpec) -> None:
    window = make_window(v1, spec, rows=1500, labelled_every=1500)

    result = drift(v1, spec, window)

    actual, predicted = window.loc[0, spec.target], window.loc[0, PREDICTION]
    assert result.labelled_rows == 1
    assert result.accuracy is not None and result.accuracy.rows == 1
    assert result.accuracy.mae == pytest.approx(abs(predicted - actual))
    assert result.accuracy.rmse == pytest.approx(abs(predicted - actual))


def test_accuracy_is_measured_on_the_labelled_frame_when_one_is_given(
    v1: Champion, spec: FeatureSpec
) -> None:
    """The monitor's accuracy window is a frame of its own: its labelled rows are counted, not the drift
    window's."""
    window = make_window(v1, spec, rows=600, labelled_every=3)  # 200 labelled
    labelled = make_window(v1, spec, rows=500, labelled_every=1)
    result = drift(v1, spec, window, labelled=labelled)
    assert result.accuracy is not None
    assert (result.rows, result.labelled_rows, result.accuracy.rows) == (600, 500, 500)


def test_weighted_score_ranks_an_important_feature_above_an_unimportant_one(
    v1: Champion, spec: FeatureSpec
) -> None:
    assert v1.importance["area_m2"] > 10 * v1.importance["floor"]
    raw = generate_transactions(3000, start="2022-01-01", end="2022-12-31", seed=7)
    floor_moved = served(v1, spec, raw.assign(floor=(raw["floor"] + 15).clip(upper=60)))
    area_moved = served(v1, spec, raw.assign(area_m2=raw["area_m2"] * 1.5))

    floor_only = drift(v1, spec, floor_moved)
    area_only = drift(v1, spec, area_moved)

    assert floor_only.drifted() == ["floor"]
    assert area_only.drifted() == ["area_m2"]
    assert floor_only.drift_share == area_only.drift_share == pytest.approx(1 / 6)
    total = sum(v1.importance.values())
    assert floor_only.weighted_score == pytest.approx(v1.importance["floor"] / total)
    assert area_only.weighted_score == pytest.approx(v1.importance["area_m2"] / total)
    assert area_only.weighted_score > 10 * floor_only.weighted_score
    # A negative weight counts as none; no weight at all falls back to equal weights (the drift share).
    negative = compute_drift(v1.reference, area_moved, spec, importance={"area_m2": -5.0, "floor": 1.0})
    unweighted = compute_drift(v1.reference, area_moved, spec, importance={})
    assert (negative.weighted_score, unweighted.weighted_score) == (0.0, pytest.approx(1 / 6))


@pytest.mark.parametrize("scenario", ["none", "unit_bug"])
def test_a_window_over_max_rows_is_sampled_with_the_same_verdicts(
    v1: Champion, spec: FeatureSpec, scenario: str
) -> None:
    window = make_window(v1, spec, scenario=scenario, rows=4000)
    full = drift(v1, spec, window)

    sampled = drift(v1, spec, window, max_rows=1500, seed=3)
    again = drift(v1, spec, window, max_rows=1500, seed=3)

    assert (sampled.rows, sampled.sampled_rows, sampled.labelled_rows) == (4000, 1500, 2000)
    assert sampled.accuracy is not None and sampled.accuracy.rows == 1500
    assert sampled.drifted() == full.drifted() == list(DRIFTED_FEATURES[scenario])
    assert sampled == again
    assert sampled.features != full.features  # the scores did come from a sample


def test_stattest_threshold_applies_to_every_column(v1: Champion, spec: FeatureSpec) -> None:
    result = drift(v1, spec, make_window(v1, spec, rows=1500), stattest_threshold=0.001)

    assert {f.threshold for f in result.features} == {0.001}
    assert result.prediction is not None and result.prediction.threshold == 0.001
    assert result.drifted() == spec.feature_names  # any difference at all counts now


def test_missing_columns_are_named(v1: Champion, spec: FeatureSpec) -> None:
    window = make_window(v1, spec, rows=500)

    with pytest.raises(ValueError, match=r"current is missing columns: floor, prediction$"):
        drift(v1, spec, window.drop(columns=["floor", PREDICTION]))
    with pytest.raises(ValueError, match=rf"current is missing columns: {spec.target}$"):
        drift(v1, spec, window.drop(columns=[spec.target]))
    with pytest.raises(ValueError, match=r"reference is missing columns: district$"):
        compute_drift(v1.reference.drop(columns=["district"]), window, spec, importance=v1.importance)
    with pytest.raises(ValueError, match=r"current has no rows"):
        drift(v1, spec, window.iloc[:0])


def test_html_report_is_written(v1: Champion, spec: FeatureSpec, tmp_path: Path) -> None:
    path = tmp_path / "reports" / "r1.html"

    drift(v1, spec, make_window(v1, spec, scenario="unit_bug", rows=1500), html_path=path)

    page = path.read_text(encoding="utf-8")
    assert page.startswith("<html>") or page.lstrip().lower().startswith(("<!doctype", "<html"))
    for text in (
        "Drift by feature",
        "Value Drift for column area_m2",
        "Mean Absolute Error",
        "RMSE",
        "DRIFT",
    ):
        assert text in page
    for name in spec.feature_names:
        assert name in page


def test_the_page_fails_no_test_on_a_window_within_policy(
    v1: Champion, spec: FeatureSpec, tmp_path: Path
) -> None:
    """A stable window whose MAE is within the policy's ratio of the validation MAE: Evidently's accuracy
    tests held each figure to the reference's within 10 %, the champion's fit on its own training rows, and
    the page showed four failed tests (MAE, RMSE, MAPE, mean error) for a window the policy found ok."""
    path = tmp_path / "r.html"
    result = drift(v1, spec, make_window(v1, spec), html_path=path)

    assert result.drifted() == [] and result.accuracy is not None
    assert result.accuracy.mae < 1.25 * v1.val_mae
    page = path.read_text(encoding="utf-8")
    assert '"state": "fail"' not in page
    assert json.dumps({"value": "0", "label": "FAIL"}) in page
    assert "Value Drift for column area_m2" in page and "Mean Absolute Error" in page


def test_to_json_is_plain_json(v1: Champion, spec: FeatureSpec) -> None:
    result = drift(v1, spec, make_window(v1, spec, scenario="unit_bug", rows=1500))

    doc = json.loads(json.dumps(result.to_json(), allow_nan=False))

    assert list(doc["features"]) == spec.feature_names
    assert doc["drifted"] == ["area_m2"]
    assert doc["features"]["area_m2"] == {
        "method": WASSERSTEIN,
        "score": result.features[1].score,
        "threshold": 0.1,
        "detected": True,
        "importance": v1.importance["area_m2"],
    }
    assert doc["prediction"]["detected"] is True
    assert doc["accuracy"]["rows"] == 750
    assert (doc["rows"], doc["sampled_rows"], doc["labelled_rows"]) == (1500, 1500, 750)


def test_a_row_with_absurd_numbers_does_not_stop_the_report(v1: Champion, spec: FeatureSpec) -> None:
    """The service refuses numbers beyond ±1e15; a row written some other way (an old database, a direct
    insert) is clipped rather than overflowing Evidently's binning and the error statistics."""
    window = make_window(v1, spec, rows=1500, labelled_every=1)
    window.loc[0:2, "subway_distance_m"] = 1e308
    window.loc[3:5, spec.target] = 1.7e308

    result = drift(v1, spec, window)

    assert result.accuracy is not None and np.isfinite(result.accuracy.rmse)
    assert result.accuracy.mae > 1e11  # three labels at the clip bound: a breach, as it should be
    assert np.isfinite(next(f for f in result.features if f.feature == "subway_distance_m").score)


def test_a_column_with_no_values_on_one_side_has_drifted_and_stops_nothing(
    v1: Champion, spec: FeatureSpec, tmp_path: Path
) -> None:
    """A sensor that died, or one added since training: Evidently refuses an empty column, so it is judged
    here, and the rest of the report goes on."""
    window = make_window(v1, spec)
    window["subway_distance_m"] = np.nan  # died: no value in the window
    reference = v1.reference.copy()
    reference["households"] = np.nan  # added since: no value in the reference
    reference["floor"], window["floor"] = np.nan, np.nan  # never had one
    page = tmp_path / "report.html"
    result = compute_drift(reference, window, spec, importance=v1.importance, html_path=page)
    by_name = {f.feature: f for f in result.features}
    assert [(n, by_name[n].method, by_name[n].score, by_name[n].detected) for n in (
        "subway_distance_m", "households", "floor"
    )] == [
        ("subway_distance_m", "no values in the current", 1.0, True),
        ("households", "no values in the reference", 1.0, True),
        ("floor", "no values in either", 0.0, False),
    ]  # fmt: skip
    assert result.drifted() == ["households", "subway_distance_m"]
    assert by_name["area_m2"].method == WASSERSTEIN and not by_name["area_m2"].detected
    assert result.to_json()["features"]["floor"]["threshold"] is None
    assert result.accuracy is not None and page.stat().st_size > 0


def test_the_page_s_tests_count_a_column_with_no_values(
    v1: Champion, spec: FeatureSpec, tmp_path: Path
) -> None:
    """The page's tests were Evidently's alone, so a sensor that died (drifted in the report) was missing from
    them and the page counted every test passed."""
    window = make_window(v1, spec)
    window["subway_distance_m"] = np.nan
    reference = v1.reference.copy()
    reference["floor"], window["floor"] = np.nan, np.nan
    page = tmp_path / "report.html"
    result = compute_drift(reference, window, spec, importance=v1.importance, html_path=page)

    assert result.drifted() == ["subway_distance_m"]
    assert result.prediction is not None and not result.prediction.detected
    html = page.read_text(encoding="utf-8")
    tests = len(spec.feature_names) + 1
    assert json.dumps({"value": "1", "label": "FAIL"}) in html
    assert json.dumps({"value": str(tests - 1), "label": "SUCCESS"}) in html
    assert html.count('"state": "fail"') == 1
    assert "Value Drift for column subway_distance_m" in html and "Value Drift for column floor" in html


def test_the_page_shows_a_rate_s_errors_in_its_units(v1: Champion, spec: FeatureSpec, tmp_path: Path) -> None:
    """A target in [0, 1] (here the prices scaled down to one): the page's MAE and RMSE had one decimal, so
    an on-time rate's MAE of 0.0834 read 0.1 and 0.177 read 0.2."""
    window = make_window(v1, spec, rows=1000)
    reference = v1.reference.copy()
    for frame in (window, reference):
        for column in (spec.target, PREDICTION):
            if column in frame:
                frame[column] = frame[column] / 1e6
    page = tmp_path / "report.html"
    result = compute_drift(reference, window, spec, importance=v1.importance, html_path=page)
    assert result.accuracy is not None and 0.001 < result.accuracy.mae < 0.1
    html = page.read_text()
    for label, value in (("MAE", result.accuracy.mae), ("RMSE", result.accuracy.rmse)):
        assert json.dumps({"value": figure(value), "label": label}) in html


def test_a_category_the_reference_lacks_has_drifted_without_a_warning(
    v1: Champion, spec: FeatureSpec
) -> None:
    """A district first seen after training: on a small window Evidently's chi-square divides by the
    reference's zero count of it, which is drift, not something to print through a backtest's progress bar
    (pytest turns that warning into an error)."""
    reference = v1.reference[v1.reference["district"] != "Gangnam-gu"].head(500)  # chi-square's size
    window = make_window(v1, spec, rows=300)
    window.loc[:100, "district"] = "Gangnam-gu"
    result = compute_drift(reference, window, spec, importance=v1.importance)
    assert "district" in result.drifted()


def test_a_small_reference_s_categories_are_compared_as_a_sample(v1: Champion, spec: FeatureSpec) -> None:
    """Reference and window split at random from the same 3,000 rows: no district can have drifted. With a
    reference of 1,000 rows Evidently picks chi-square, which took the reference's shares as exact and
    flagged the district in all ten of these splits; the two-sample test, about 1 in 20."""
    districts = []
    for seed in range(10):
        shuffled = v1.reference.sample(frac=1, random_state=seed).reset_index(drop=True)
        result = compute_drift(shuffled.iloc[:1000], shuffled.iloc[1000:], spec, importance=v1.importance)
        districts.append(result.features[spec.feature_names.index("district")])
    assert sum(d.detected for d in districts) <= 2
    assert {(d.method, d.threshold) for d in districts} == {("chi-square p_value (two-sample)", 0.05)}


def test_a_spec_naming_chisquare_gets_the_two_sample_one(v1: Champion, spec: FeatureSpec) -> None:
    """`drift_method: chisquare` ran Evidently's, which takes the reference's shares as exact: the district
    of a reference and a window split at random from the same rows was flagged in every split."""
    from dataclasses import replace

    features = tuple(
        replace(f, drift_method="chisquare", drift_threshold=0.01) if f.name == "district" else f
        for f in spec.features
    )
    named = replace(spec, features=features, _by_name={})
    districts = []
    for seed in range(5):
        shuffled = v1.reference.sample(frac=1, random_state=seed).reset_index(drop=True)
        result = compute_drift(shuffled.iloc[:1000], shuffled.iloc[1000:], named, importance=v1.importance)
        districts.append(result.features[spec.feature_names.index("district")])
    assert {(d.method, d.threshold) for d in districts} == {("chi-square p_value (two-sample)", 0.01)}
    assert not any(d.detected for d in districts)


def test_a_feature_s_drift_test_is_the_one_its_spec_names(v1: Champion, spec: FeatureSpec) -> None:
    """drift_method and drift_threshold for one feature; every other keeps Evidently's choice and the
    configured threshold (DRIFTLOOP_DRIFT_STATTEST_THRESHOLD, here 0.2). A method named without a threshold
    takes its own default (KS: a p-value of 0.05), not the one configured for Evidently's choices."""
    from dataclasses import replace

    named = {"district": ("psi", 0.5), "area_m2": (None, 0.3), "floor": ("ks", None)}
    features = tuple(
        replace(f, drift_method=named[f.name][0], drift_threshold=named[f.name][1]) if f.name in named else f
        for f in spec.features
    )
    window = make_window(v1, spec, rows=1500)
    result = drift(v1, replace(spec, features=features, _by_name={}), window, stattest_threshold=0.2)

    tests = {f.feature: (f.method, f.threshold) for f in result.features}
    assert tests.pop("district") == ("PSI", 0.5)
    assert tests.pop("area_m2") == (WASSERSTEIN, 0.3)
    assert tests.pop("floor") == ("K-S p_value", 0.05)
    assert {threshold for _, threshold in tests.values()} == {0.2}
    assert result.prediction is not None and (result.prediction.method, result.prediction.threshold) == (
        WASSERSTEIN,
        0.2,
    )


def test_a_categorical_of_many_levels_needs_its_own_threshold() -> None:
    """Sampling alone puts the Jensen-Shannon distance of 1,000 equally likely stores near 0.2 on a stable
    5,000-row window (README: Bring your own model): over the default 0.1 in every window. Its own
    drift_threshold keeps the stable window quiet and still flags a window half of whose sales moved to ten
    stores."""
    from core.spec import Feature, FeatureType

    rng = np.random.default_rng(3)
    stores = tuple(f"s{i:04d}" for i in range(1000))

    def frame(rows: int, *, moved: float = 0.0) -> pd.DataFrame:
        store = rng.choice(stores, rows)
        store[: int(rows * moved)] = rng.choice(stores[:10], int(rows * moved))
        x = rng.normal(size=rows)
        return pd.DataFrame({"store": store, "x": x, "y": 2 * x, PREDICTION: 2 * x})

    def spec_with(threshold: float | None) -> FeatureSpec:
        store = Feature("store", FeatureType.categorical, categories=stores, drift_threshold=threshold)
        return FeatureSpec("shops", "y", (store, Feature("x", FeatureType.numeric)))

    reference, stable, moved = frame(10_000), frame(5_000), frame(5_000, moved=0.5)

    def store_drift(threshold: float | None, window: pd.DataFrame) -> tuple[str, bool, float]:
        result = compute_drift(reference, window, spec_with(threshold), importance={})
        store = result.features[0]
        return store.method, store.detected, store.score

    method, detected, score = store_drift(None, stable)
    assert (method, detected) == (JS, True) and 0.15 < score < 0.25
    assert store_drift(0.3, stable)[1] is False
    assert store_drift(0.3, moved)[1] is True


def test_a_numeric_feature_whose_missing_share_moved_has_drifted(
    v1: Champion, spec: FeatureSpec, tmp_path: Path
) -> None:
    """Evidently drops missing values before it compares a numeric column, so a sensor failing for half the
    window (its other values as before) scored as unchanged. A move of MISSING_SHARE_SHIFT (0.1) or more in
    the share of missing values is drift; less is not. Categorical columns count a missing value as a
    category of its own already."""
    from monitor.report import MISSING_SHARE_SHIFT

    window = make_window(v1, spec)
    rows = np.arange(len(window))
    window.loc[rows % 2 == 0, "subway_distance_m"] = np.nan  # half the window: 0 % to 50 %
    window.loc[rows % 20 == 1, "households"] = np.nan  # one row in twenty: 0 % to 5 %, within noise
    page = tmp_path / "report.html"
    result = compute_drift(v1.reference, window, spec, importance=v1.importance, html_path=page)

    by_name = {f.feature: f for f in result.features}
    subway, households = by_name["subway_distance_m"], by_name["households"]
    assert (subway.method, subway.score, subway.threshold, subway.detected) == (
        "missing share 0% to 50%",
        0.5,
        MISSING_SHARE_SHIFT,
        True,
    )
    assert households.method == WASSERSTEIN and not households.detected
    assert result.drifted() == ["subway_distance_m"]
    assert "Missing share 0% to 50%: drifted." in page.read_text(encoding="utf-8")


def test_importing_the_report_registers_nothing_with_evidently() -> None:
    """Nothing happens at import time (STYLE.md): the two-sample chi-square joins Evidently's process-wide
    registry of methods when a report first needs it, not when monitor.report is imported."""
    import subprocess
    import sys

    code = (
        "import monitor.report\n"
        "from evidently.legacy.calculations.stattests.registry import _registered_stat_tests\n"
        "from monitor.drift_tests import TWO_SAMPLE_CHI2\n"
        "assert TWO_SAMPLE_CHI2.name not in _registered_stat_tests\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_window_whose_labels_are_all_zero_is_measured(
    v1: Champion, spec: FeatureSpec, tmp_path: Path
) -> None:
    """A count or a delay that came out 0 for every labelled row (the first label is often one): Evidently's
    regression figures look for a non-zero actual and raised IndexError, which failed the monitor run. The
    figures are numpy's then, MAPE (over non-zero actuals) has none to measure and is stored as null."""
    window = make_window(v1, spec, rows=600, labelled_every=3)
    window.loc[window[spec.target].notna(), spec.target] = 0.0
    page = tmp_path / "report.html"
    result = drift(v1, spec, window, html_path=page)

    labelled = window[window[spec.target].notna()]
    assert result.accuracy is not None
    assert result.accuracy.to_json() == {
        "mae": pytest.approx(float(labelled[PREDICTION].abs().mean())),
        "rmse": pytest.approx(float(np.sqrt((labelled[PREDICTION] ** 2).mean()))),
        "mape": None,
        "mean_error": pytest.approx(float(labelled[PREDICTION].mean())),
        "rows": 200,
    }
    assert page.stat().st_size > 0
    accuracy = compute_accuracy(v1.reference, window, spec)
    assert accuracy is not None and accuracy.to_json() == result.accuracy.to_json()
