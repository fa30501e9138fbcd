import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from core.spec import RESERVED_NAMES, Feature, FeatureSpec, FeatureType, SpecError, load_spec
from monitor.window import CREATED_AT, MODEL_VERSION, PREDICTION_ID
from retrain.dataset import EVENT_TIME, SOURCE
from retrain.train import PREDICTION

# 기온 as macOS writes it (decomposed, NFD): it prints as the composed (NFC) 기온 the rest of the specs use.
NFD_TEMP = unicodedata.normalize("NFD", "기온")
FORMS = "in another Unicode form: NFD and NFC look alike but differ; write both in one"


def test_default_spec_is_the_apartment_dataset(spec: FeatureSpec) -> None:
    assert spec.dataset == "seoul_apartments"
    assert spec.target == "price_10k_krw"
    assert spec.time_column == "contract_date"
    assert spec.feature_names == [
        "district",
        "area_m2",
        "floor",
        "build_year",
        "households",
        "subway_distance_m",
    ]
    assert spec.categorical_features == ["district"]
    assert len(spec.feature("district").categories) == 25


def test_request_model_enforces_bounds_types_and_extra_fields(spec: FeatureSpec, make_features) -> None:
    model = spec.request_model()
    ok = model(**make_features(floor=12.0)).model_dump(by_alias=True)
    assert ok["floor"] == 12 and isinstance(ok["floor"], int)
    cases = {
        "area_m2": make_features(area_m2=351),
        "floor": make_features(floor=3.5),
        "district": make_features(district="Atlantis-gu"),
        "households": make_features(households="many"),
        "extra": make_features(extra=1),
        "subway_distance_m": make_features(subway_distance_m=float("nan")),
    }
    for field, payload in cases.items():
        with pytest.raises(ValidationError) as info:
            model(**payload)
        assert info.value.errors()[0]["loc"] == (field,)


def test_row_errors_name_every_field(spec: FeatureSpec, make_features, DROP) -> None:
    row = make_features(floor=DROP, area_m2=-1, build_year=1999.5, colour="red")
    assert spec.row_errors(row) == [
        "colour: unknown field",
        "area_m2: must be >= 5",
        "floor: missing",
        "build_year: must be an integer",
    ]
    assert spec.row_errors(make_features()) == []
    # The bounds themselves are inside them.
    assert spec.row_errors(make_features(area_m2=5)) == spec.row_errors(make_features(area_m2=350)) == []


def test_a_nan_is_a_missing_value_for_a_nullable_feature_only() -> None:
    """A CSV's empty cell reads as NaN: null for a nullable feature, not a number for any other."""
    nullable = Feature(name="hour", type=FeatureType.integer, min=0, max=23, nullable=True)
    required = Feature(name="hour", type=FeatureType.integer, min=0, max=23)
    assert nullable.check(float("nan")) is None
    assert required.check(float("nan")) == "must be a finite number"
    assert required.check(None) == "is required (not nullable)"


def test_users_bring_their_own_spec(tmp_path: Path) -> None:
    path = tmp_path / "bikes.yaml"
    path.write_text(
        "dataset: bike_rentals\ntarget: rentals\nfeatures:\n"
        "  - {name: temp_c, type: numeric, min: -30, max: 50}\n"
        "  - {name: weekday, type: categorical, categories: [mon, tue]}\n"
        "  - {name: hour, type: integer, min: 0, max: 23, nullable: true}\n"
    )
    spec = load_spec(path)
    assert [f.type for f in spec.features] == [
        FeatureType.numeric,
        FeatureType.categorical,
        FeatureType.integer,
    ]
    model = spec.request_model()
    assert model(temp_c=20, weekday="mon").model_dump(by_alias=True) == {
        "temp_c": 20,
        "weekday": "mon",
        "hour": None,
    }


def test_numbers_without_bounds_are_still_bounded_by_the_largest_magnitude(tmp_path: Path) -> None:
    """A finite 1e308 would overflow the monitor's statistics: refused where a spec gives no bound."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "dataset: s\ntarget: y\ntarget_min: 0\ntarget_max: 500\nfeatures: [{name: a, type: numeric}]\n"
    )
    spec = load_spec(path)
    model = spec.request_model()
    assert model(a=-1e15).model_dump(by_alias=True) == {"a": -1e15}
    with pytest.raises(ValueError, match="less than or equal to 1000000000000000"):
        model(a=1e308)
    with pytest.raises(ValueError, match="greater than or equal to -1000000000000000"):
        model(a=-1e308)
    a = spec.feature("a")
    assert (a.check(1e15), a.check(-1e16)) == (None, "must be within ±1e+15")
    target = spec.target_feature
    assert (target.name, target.min, target.max) == ("y", 0, 500)
    assert (target.check(500), target.check(501), target.check("5")) == (
        None,
        "must be <= 500",
        "must be a number",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dataset: x\ntarget: y\n", "spec is missing 'features'"),
        ("dataset: x\ntarget: y\nfeatures: [{name: a, type: text}]\n", "type must be one of numeric"),
        ("dataset: x\ntarget: y\nfeatures: [{name: a, type: categorical}]\n", "(a) is categorical and needs"),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: categorical, categories: [b, c, b]}]\n",
            "(a) categories: 'b' is listed twice",
        ),
        ("dataset: x\ntarget: a\nfeatures: [{name: a, type: numeric}]\n", "target 'a' is also listed"),
        ("dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric}, {name: a, type: numeric}]\n", "unique"),
        ("dataset: [unclosed\n", "not valid YAML"),
        (
            'dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, min: "-30"}]\n',
            "(a) min must be a number",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, min: 5, max: 1}]\n",
            "min 5 is above max 1",
        ),
        (
            "dataset: x\ntarget: y\ntarget_min: zero\nfeatures: [{name: a, type: numeric}]\n",
            "target_min must be",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, min: .nan}]\n",
            "(a) min must be a number, not NaN",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: categorical, categories: [b, null]}]\n",
            "(a) categories: an empty or null entry; a missing value is 'nullable: true', not a category",
        ),
        (  # an empty cell is a missing value, never this category: every such row would be refused
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: categorical, categories: ['', b]}]\n",
            "(a) categories: an empty or null entry; a missing value is 'nullable: true', not a category",
        ),
        (
            "dataset: x\ntarget: y\ntarget_min: 10\ntarget_max: 1\nfeatures: [{name: a, type: numeric}]\n",
            "target_min 10 is above target_max 1",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, max: 1.0e+20}]\n",
            "(a) max 1e+20 is beyond ±1e+15, the largest value accepted",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, min: -2.0e+15}]\n",
            "(a) min -2e+15 is beyond ±1e+15, the largest value accepted",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: categorical, categories: [yes, no]}]\n",
            'YAML reads yes/no/true/false/on/off unquoted as booleans; quote them ("yes")',
        ),
        # a typo would otherwise drop its rule without a word
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, nulable: true}]\n",
            "features[0] (a) has an unknown key 'nulable' (did you mean 'nullable'?)",
        ),
        (
            "dataset: x\ntarget: y\ntarget_mn: 0\nfeatures: [{name: a, type: numeric}]\n",
            "spec has an unknown key 'target_mn' (did you mean 'target_min'?)",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: categorical, categories: clear}]\n",
            "(a) categories must be a list (e.g. [a, b]), not 'clear'",
        ),
        (
            'dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, nullable: "no"}]\n',
            "(a) nullable must be true or false, not 'no'",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: null, type: numeric}]\n",
            "name must be a non-empty string",
        ),
        # a column named on/off/yes/no, or 2020, 010: YAML reads the unquoted name as True or a number
        (
            "dataset: x\ntarget: y\nfeatures: [{name: on, type: numeric}]\n",
            "name must be a non-empty string, not True: YAML reads it unquoted as a boolean",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: 010, type: numeric}]\n",
            "name must be a non-empty string, not 8: YAML reads it unquoted as a number; quote it",
        ),
        (
            "dataset: x\ntarget: no\nfeatures: [{name: a, type: numeric}]\n",
            "target must be a non-empty string, not False: YAML reads it unquoted as a boolean",
        ),
        (
            'dataset: x\ntarget: ""\nfeatures: [{name: a, type: numeric}]\n',
            "target must be a non-empty string",
        ),
        (
            'dataset: x\ntarget: y\nfeatures: [{name: "  ", type: numeric}]\n',
            "name must be a non-empty string, not '  '",
        ),
        (
            'dataset: x\ntarget: y\nfeatures: [{name: "a\\0b", type: numeric}]\n',
            "name 'a\\x00b' holds the control character '\\x00'; a column name cannot",
        ),
        (
            'dataset: x\ntarget: "y\\n"\nfeatures: [{name: a, type: numeric}]\n',
            "target 'y\\n' holds the control character '\\n'",
        ),
        ("dataset: x\ntarget: y\nfeatures: [a, b]\n", "features[0] must be a mapping with 'name' and 'type'"),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: integer, min: 0.5, max: 0.9}]\n",
            "(a) is integer, and no integer lies in [0.5, 0.9]",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: categorical, categories: [01, 02]}]\n",
            "(a) categories: 1 is a YAML number, and a category is text as the data writes it",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, categories: [b]}]\n",
            "(a) is numeric: 'categories' are for categorical",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: categorical, categories: [b], min: 0}]\n",
            "(a) is categorical: 'min' and 'max' are for numbers",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: categorical, categories: [b], max: 9}]\n",
            "(a) is categorical: 'min' and 'max' are for numbers",
        ),
        (
            "dataset: x\ntarget: y\ntime_column: y\nfeatures: [{name: a, type: numeric}]\n",
            "time_column 'y' is also the target: it must be a column of its own",
        ),
        (
            "dataset: x\ntarget: y\ntime_column: a\nfeatures: [{name: a, type: numeric}]\n",
            "time_column 'a' is also a feature",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric}, {name: a, type: integer}]\n",
            "feature names must be unique; repeated: a",
        ),
        (
            "dataset: x\ntarget: y\n"
            "features: [{name: a, type: categorical, categories: [b], drift_method: ks}]\n",
            "(a) drift_method 'ks' is not one of Evidently's for a categorical column: chisquare, "
            "fisher_exact",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, drift_method: wasserstien}]\n",
            "drift_method 'wasserstien' is not one of Evidently's for a numeric column (did you mean "
            "'wasserstein'?)",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, drift_threshold: 0}]\n",
            "(a) drift_threshold must be above 0, not 0",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, drift_threshold: high}]\n",
            "(a) drift_threshold must be a number, not 'high'",
        ),
        (
            "dataset: x\ntarget: y\n"
            "features: [{name: a, type: integer, drift_method: ks, drift_threshold: 5}]\n",
            "(a) drift_threshold 5: ks's score is a p-value (drift below the threshold), so 1 or more would "
            "find drift in every window; give one below 1",
        ),
        (
            "dataset: x\ntarget: y\n"
            "features: [{name: a, type: numeric, drift_method: hellinger, drift_threshold: 1.5}]\n",
            "(a) drift_threshold 1.5: hellinger's distance is at most 1, so it would never find drift; "
            "give a lower one",
        ),
        (
            "dataset: x\ntarget: y\n"
            "features: [{name: a, type: categorical, categories: [b], drift_method: jensenshannon, "
            "drift_threshold: 0.9}]\n",
            "(a) drift_threshold 0.9: jensenshannon's distance is at most 0.8326, so it would never find "
            "drift; give a lower one",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, drift_threshold: 1}]\n",
            "the score of Evidently's choice may be a p-value (drift below the threshold), so 1 or more "
            "would find drift in every window; give one below 1, or name a distance as drift_method",
        ),
        (
            "dataset: x\ntarget: y\nfeatures: [{name: a, type: numeric, drift_treshold: 0.2}]\n",
            "unknown key 'drift_treshold' (did you mean 'drift_threshold'?)",
        ),
        # One name in two Unicode forms prints as one: a column listed twice, or a category, slipped through.
        (
            f"dataset: x\ntarget: y\n"
            f"features: [{{name: 기온, type: numeric}}, {{name: {NFD_TEMP}, type: numeric}}]\n",
            f"feature names must be unique; repeated: '{NFD_TEMP}' (the feature '기온' {FORMS})",
        ),
        (
            f"dataset: x\ntarget: {NFD_TEMP}\nfeatures: [{{name: 기온, type: numeric}}]\n",
            f"target '{NFD_TEMP}' is also listed as a feature (the feature '기온' {FORMS})",
        ),
        (
            f"dataset: x\ntarget: y\ntime_column: {NFD_TEMP}\nfeatures: [{{name: 기온, type: numeric}}]\n",
            f"time_column '{NFD_TEMP}' is also a feature (the feature '기온' {FORMS})",
        ),
        (
            f"dataset: x\ntarget: 기온\ntime_column: {NFD_TEMP}\nfeatures: [{{name: a, type: numeric}}]\n",
            f"time_column '{NFD_TEMP}' is also the target (the target '기온' {FORMS})",
        ),
        (
            f"dataset: x\ntarget: y\n"
            f"features: [{{name: a, type: categorical, categories: [기온, b, {NFD_TEMP}]}}]\n",
            f"(a) categories: '{NFD_TEMP}' is listed twice (the category '기온' {FORMS})",
        ),
    ],
)
def test_bad_spec_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"spec\.yaml") as info:
        load_spec(path)
    assert message in str(info.value)


def test_a_spec_may_pin_a_feature_to_one_value_and_take_its_time_from_a_reserved_name(tmp_path: Path) -> None:
    """min = max is a bound, not a contradiction; the time column gives each row its time and is no column of
    driftloop's frames, so it may bear one of the names they use."""
    path = tmp_path / "spec.yaml"
    path.write_text(
        "dataset: x\ntarget: y\ntime_column: event_time\n"
        "features: [{name: a, type: integer, min: 3, max: 3}]\n"
    )
    spec = load_spec(path)
    assert (spec.time_column, spec.feature("a").min, spec.feature("a").max) == ("event_time", 3, 3)


def test_missing_spec_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_a_spec_that_is_a_directory_or_not_utf8_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=f"^{tmp_path} is a directory; give the spec file"):
        load_spec(tmp_path)
    path = tmp_path / "spec.yaml"
    path.write_bytes("dataset: x\ndescription: café\n".encode("latin-1"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: line 2 is not UTF-8 text (byte 0xe9); save it as UTF-8"


@pytest.mark.parametrize("name", sorted(RESERVED_NAMES))
@pytest.mark.parametrize("role", ["feature", "target"])
def test_a_name_driftloop_uses_for_its_own_columns_is_refused(tmp_path: Path, name: str, role: str) -> None:
    """Such a column would be overwritten in the monitor's window or the training frame, or crash them."""
    path = tmp_path / "spec.yaml"
    feature, target = (name, "y") if role == "feature" else ("a", name)
    path.write_text(f"dataset: x\ntarget: {target}\nfeatures: [{{name: {feature}, type: numeric}}]\n")
    with pytest.raises(SpecError, match=f"'{name}' is a name driftloop uses for its own columns"):
        load_spec(path)


def test_the_reserved_names_are_the_columns_driftloop_adds() -> None:
    assert {PREDICTION, PREDICTION_ID, CREATED_AT, MODEL_VERSION, EVENT_TIME, SOURCE} == RESERVED_NAMES


@pytest.mark.parametrize("name", ["_temp", "model_config", "model_dump", "schema", "copy", "기온°C"])
def test_any_other_feature_name_is_served(tmp_path: Path, name: str) -> None:
    """Names pydantic would refuse as field names, or that shadow its methods, are only aliases."""
    path = tmp_path / "spec.yaml"
    path.write_text(f'dataset: x\ntarget: y\nfeatures: [{{name: "{name}", type: integer, min: 0}}]\n')
    model = load_spec(path).request_model()
    assert model.model_validate({name: 3}).model_dump(by_alias=True) == {name: 3}
    with pytest.raises(ValidationError) as info:
        model.model_validate({name: -1})
    assert info.value.errors()[0]["loc"] == (name,)
    assert list(model.model_json_schema()["properties"]) == [name]


def test_a_feature_names_its_own_drift_test(tmp_path: Path) -> None:
    """A distance may take a threshold above 1 (PSI, Kullback-Leibler); the rest keep Evidently's choice."""
    path = tmp_path / "spec.yaml"
    path.write_text(
        "dataset: x\ntarget: y\nfeatures:\n"
        "  - {name: store, type: categorical, categories: [a, b], drift_method: psi, drift_threshold: 1.5}\n"
        "  - {name: km, type: numeric, drift_threshold: 0.2}\n"
        "  - {name: n, type: integer}\n"
    )
    spec = load_spec(path)
    tests = [(f.drift_method, f.drift_threshold) for f in spec.features]
    assert tests == [("psi", 1.5), (None, 0.2), (None, None)]


# Evidently's Anderson-Darling calls scipy's anderson_ksamp as scipy 1.17 deprecates, and scipy says its
# p-value is capped; its empirical MMD calls numpy's percentile as numpy 1.22–1.x deprecates: not ours.
@pytest.mark.filterwarnings("ignore:Parameter `variant` has been introduced:UserWarning")
@pytest.mark.filterwarnings("ignore:p-value capped:UserWarning")
@pytest.mark.filterwarnings("ignore:the `interpolation=` argument to percentile:DeprecationWarning")
def test_the_spec_knows_evidently_s_drift_methods_by_column_type() -> None:
    """core.spec lists them without importing Evidently: the lists must be the installed Evidently's."""
    from evidently.legacy.calculations.stattests.registry import _registered_stat_tests, get_stattest
    from evidently.legacy.core import ColumnType

    from core.spec import CATEGORICAL_DRIFT_METHODS, NUMERIC_DRIFT_METHODS, P_VALUE_DRIFT_METHODS
    from monitor.drift_tests import TWO_SAMPLE_CHI2

    def taking(kind: ColumnType) -> set[str]:  # Evidently's own: not the one monitor.drift_tests registers
        return {n for n, by_type in _registered_stat_tests.items() if kind in by_type} - {
            TWO_SAMPLE_CHI2.name
        }

    assert set(NUMERIC_DRIFT_METHODS) == taking(ColumnType.Numerical)
    assert set(CATEGORICAL_DRIFT_METHODS) == taking(ColumnType.Categorical)
    # Which score is a p-value, by what each method makes of a sample against itself: a p-value near 1
    # (Anderson-Darling's is capped at 0.25), a distance of 0. Two categories: the z-test and Fisher's
    # exact test take no more.
    rng = np.random.default_rng(0)
    numbers, letters = pd.Series(rng.normal(size=300)), pd.Series(rng.choice(list("ab"), 300))
    scores = {
        name: get_stattest(sample, sample, kind, name)(sample, sample, kind, None).drift_score
        for methods, kind, sample in (
            (NUMERIC_DRIFT_METHODS, ColumnType.Numerical, numbers),
            (CATEGORICAL_DRIFT_METHODS, ColumnType.Categorical, letters),
        )
        for name in methods
    }
    assert {name for name, score in scores.items() if score >= 0.2} == P_VALUE_DRIFT_METHODS
    assert all(score < 1e-6 for name, score in scores.items() if name not in P_VALUE_DRIFT_METHODS)


def test_a_feature_of_many_categories_is_checked_for_unicode_twins_in_linear_time(tmp_path: Path) -> None:
    """Each category was compared with every earlier one (NFC of each, each time): 20,000 store ids took
    about 8 s to load, 50,000 about a minute, at every process start. The twin is still named."""
    import time

    stores = [f"store-{i:05d}" for i in range(20_000)]
    path = tmp_path / "spec.yaml"
    path.write_text(
        "dataset: x\ntarget: y\nfeatures: [{name: store, type: categorical, categories: ["
        + ", ".join(stores)
        + "]}]\n"
    )
    started = time.perf_counter()
    assert load_spec(path).feature("store").categories == tuple(stores)
    assert time.perf_counter() - started < 2.5  # a few tenths of a second, even under load
    path.write_text(path.read_text().replace("store-19999", NFD_TEMP).replace("store-00007", "기온"))
    twin = f"'{NFD_TEMP}' is listed twice (the category '기온' {FORMS})"
    with pytest.raises(SpecError, match=re.escape(twin)):
        load_spec(path)
