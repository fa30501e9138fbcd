"""Feature spec: the single source of feature names, order, types, bounds and categories."""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from core.files import FORMS, read_errors, unicode_twin

# The largest magnitude a feature or target may have. Beyond it a value is a unit slip or garbage, not
# data: its square overflows float64 in the monitor's statistics and in Evidently's binning, so one such row
# would stop every report while it sits in the window. A spec's bounds must lie within it.
MAX_MAGNITUDE = 1e15

# Columns driftloop adds beside the spec's in its own frames: the model's output (retrain.train.PREDICTION),
# a window's prediction_id/created_at/model_version (monitor.window), a training set's event_time/source
# (retrain.dataset). A feature or target of one of these names would be overwritten by it.
RESERVED_NAMES = frozenset(
    {"prediction", "prediction_id", "created_at", "model_version", "event_time", "source"}
)
SPEC_KEYS = ("dataset", "description", "target", "target_min", "target_max", "time_column", "features")
FEATURE_KEYS = (
    "name", "type", "description", "min", "max", "categories", "nullable", "drift_method", "drift_threshold"
)  # fmt: skip
# Evidently's drift methods (stattests) by the column type they take; a test checks this against Evidently's
# registry, which the spec does not import (Evidently takes seconds to, and API replicas never monitor).
NUMERIC_DRIFT_METHODS = (
    "anderson", "cramer_von_mises", "ed", "empirical_mmd", "es", "hellinger", "jensenshannon", "kl_div",
    "ks", "mannw", "psi", "t_test", "wasserstein",
)  # fmt: skip
CATEGORICAL_DRIFT_METHODS = (
    "chisquare", "fisher_exact", "g_test", "hellinger", "jensenshannon", "kl_div", "psi", "TVD", "z",
)  # fmt: skip
# Those whose score is a p-value, drift below the threshold; the others' is a distance, drift at or above it
# (energy distance, `ed`: above it).
P_VALUE_DRIFT_METHODS = frozenset(
    {"anderson", "chisquare", "cramer_von_mises", "empirical_mmd", "es", "fisher_exact", "g_test", "ks",
     "mannw", "t_test", "TVD", "z"}
)  # fmt: skip
# Distances that cannot exceed a bound (Jensen-Shannon's with the natural logarithm, as Evidently takes it): a
# threshold above it would never find drift, silently turning the feature's test off.
BOUNDED_DRIFT_METHODS = {"hellinger": 1.0, "jensenshannon": math.sqrt(math.log(2))}


class FeatureType(StrEnum):
    numeric = "numeric"
    integer = "integer"
    categorical = "categorical"


def lookalike_hint(value: str, categories: tuple[str, ...]) -> str:
    """For an unknown category that is a known one with blanks around it, in another Unicode form or in
    other letter case (gangnam-gu, "Queens "): say so, as the quotes alone hide it, or hide it among a long
    list. Categories are matched as written (see README), so it is not stripped or folded silently."""
    bare = value.strip()
    if bare != value and bare in categories:
        return f" (the category {bare!r} with blanks around it)"
    twin = unicode_twin(value, categories)
    if twin is not None:
        return f" (the category {twin!r} in another Unicode form{FORMS})"
    folded = _folded(categories).get(_fold(value))
    return f" (the category is written {folded!r})" if folded is not None else ""


def _fold(text: str) -> str:
    return unicodedata.normalize("NFC", text.strip()).casefold()


@functools.lru_cache(maxsize=64)
def _folded(categories: tuple[str, ...]) -> dict[str, str]:
    """Each category by its folded form, the first of any that fold alike; built once per spec, as a file
    of bad rows asks for every one of them."""
    return {_fold(c): c for c in reversed(categories)}


class SpecError(ValueError):
    """The spec file itself is wrong; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    type: FeatureType
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] = ()
    nullable: bool = False
    description: str = ""
    # The monitor's drift test for this feature (an Evidently stattest) and its threshold; None: Evidently's
    # choice for the column and the window, and DRIFTLOOP_DRIFT_STATTEST_THRESHOLD (or the method's default).
    drift_method: str | None = None
    drift_threshold: float | None = None

    def check(self, value: Any) -> str | None:
        """Return why `value` violates this feature, or None when it is acceptable."""
        if value is None or (isinstance(value, float) and math.isnan(value) and self.nullable):
            return None if self.nullable else "is required (not nullable)"
        if self.type is FeatureType.categorical:
            if not isinstance(value, str):
                return "must be a string"
            if self.categories and value not in self.categories:
                return f"unknown category {value!r}{lookalike_hint(value, self.categories)}"
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if self.type is FeatureType.integer and float(value) != int(value):
            return "must be an integer"
        if self.min is not None and value < self.min:
            return f"must be >= {self.min:g}"
        if self.max is not None and value > self.max:
            return f"must be <= {self.max:g}"
        if abs(value) > MAX_MAGNITUDE:
            return f"must be within ±{MAX_MAGNITUDE:g}"
        return None


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    dataset: str
    target: str
    features: tuple[Feature, ...]
    time_column: str | None = None
    description: str = ""
    target_min: float | None = None
    target_max: float | None = None
    sha256: str = field(default="", compare=False)  # of the file's bytes (load_spec); "" when built in code
    _by_name: dict[str, Feature] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({f.name: f for f in self.features})

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def categorical_features(self) -> list[str]:
        return [f.name for f in self.features if f.type is FeatureType.categorical]

    @property
    def numeric_features(self) -> list[str]:
        return [f.name for f in self.features if f.type is not FeatureType.categorical]

    def feature(self, name: str) -> Feature:
        return self._by_name[name]

    @property
    def target_feature(self) -> Feature:
        """The target as a numeric Feature with its bounds, so a label is checked like a feature."""
        return Feature(
            name=self.target, type=FeatureType.numeric, min=self.target_min, max=self.target_max,
            description=f"Observed {self.target}.",
        )  # fmt: skip

    def clip(self, predictions: np.ndarray) -> np.ndarray:
        """Predictions as served: inside [target_min, target_max] where the spec sets them (NaN stays NaN).

        A label outside them is refused, so a served value moved to the nearer bound is never further from
        the truth; a regression model can still answer −1.5 for a count, which no consumer should get.
        """
        if self.target_min is None and self.target_max is None:
            return predictions
        return np.asarray(np.clip(predictions, self.target_min, self.target_max), dtype=float)

    def frame(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        """Rows of feature dicts as a DataFrame in spec order with spec dtypes."""
        df = pd.DataFrame.from_records(rows, columns=self.feature_names)
        return self.coerce(df)

    def coerce(self, df: pd.DataFrame) -> pd.DataFrame:
        """Spec column order and dtypes (categoricals as str, numbers as float)."""
        out = df[self.feature_names].copy()
        for f in self.features:
            if f.type is FeatureType.categorical:
                out[f.name] = out[f.name].astype("string").fillna("").astype(object)
            else:
                out[f.name] = pd.to_numeric(out[f.name], errors="coerce").astype(float)
        return out

    def row_errors(self, row: dict[str, Any]) -> list[str]:
        """Every violation in one raw row, each naming its field."""
        errors = [f"{name}: unknown field" for name in row if name not in self._by_name]
        for f in self.features:
            if f.name not in row:
                errors.append(f"{f.name}: missing")
                continue
            problem = f.check(row[f.name])
            if problem:
                errors.append(f"{f.name}: {problem}")
        return errors

    def request_model(self) -> type[BaseModel]:
        """A pydantic model for one instance: unknown fields are rejected, bounds enforced.

        Its fields are named f0, f1, … with the feature names as aliases, so any feature name works (pydantic
        refuses field names such as `_x` or `model_config`); dump it with `by_alias=True`."""
        fields: dict[str, Any] = {}
        for i, f in enumerate(self.features):
            fields[_field_name(i)] = spec_field(f, alias=f.name)
        model: type[BaseModel] = create_model(
            f"{_camel(self.dataset)}Features",
            __config__=ConfigDict(extra="forbid", allow_inf_nan=False, strict=False),
            __validators__={**_category_validators(self), **few_unknown_keys(self.feature_names)},
            **fields,
        )
        return model


def spec_field(f: Feature, *, alias: str | None = None) -> tuple[Any, Any]:
    """A pydantic field definition (annotation, FieldInfo) enforcing `f` as a JSON value: type, bounds."""
    if f.type is FeatureType.categorical:
        annotation: Any = Literal[tuple(f.categories)] if f.categories else str
        constraints: dict[str, Any] = {}
    else:
        annotation = int if f.type is FeatureType.integer else float
        constraints = {
            "ge": -MAX_MAGNITUDE if f.min is None else f.min,
            "le": MAX_MAGNITUDE if f.max is None else f.max,
        }
        constraints["strict"] = True  # no true -> 1.0, no "84" -> 84: JSON types as declared
    if f.nullable:
        annotation = annotation | None
    default = None if f.nullable else ...
    return annotation, Field(default, alias=alias, description=f.description or None, **constraints)


def _bounds(
    low: Any, high: Any, where: str, names: tuple[str, str] = ("min", "max")
) -> tuple[float | None, float | None]:
    """A (min, max) pair as written in the spec, checked: numbers within ±MAX_MAGNITUDE, min ≤ max."""
    lo, hi = _number(low, f"{where} {names[0]}"), _number(high, f"{where} {names[1]}")
    for name, value in zip(names, (lo, hi), strict=True):
        if value is not None and abs(value) > MAX_MAGNITUDE:
            raise SpecError(
                f"{where} {name} {value:g} is beyond ±{MAX_MAGNITUDE:g}, the largest value accepted"
            )
    if lo is not None and hi is not None and lo > hi:
        raise SpecError(f"{where} {names[0]} {lo:g} is above {names[1]} {hi:g}")
    return lo, hi


def _field_name(index: int) -> str:
    return f"f{index}"


def _category_validators(spec: FeatureSpec) -> dict[str, Any]:
    integer_names = [_field_name(i) for i, f in enumerate(spec.features) if f.type is FeatureType.integer]
    if not integer_names:
        return {}

    def _whole(cls: type, value: Any) -> Any:  # 84.0 is fine for an integer field, 84.5 is not
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    return {"_whole_numbers": field_validator(*integer_names, mode="before")(classmethod(_whole))}


# Unknown keys in one object past this many are one problem, not one each: a 2 MB body of short keys was
# 240,000 problems, and listing them held the event loop, every other request with it, for two seconds.
MAX_UNKNOWN_KEYS = 10


def few_unknown_keys(known: Iterable[str]) -> dict[str, Any]:
    """`__validators__` for a model that forbids extra keys: more than MAX_UNKNOWN_KEYS unknown ones in an
    object are refused as one problem (`too_many_unknown_keys`) before pydantic names each."""
    names = frozenset(known)
    most = len(names) + MAX_UNKNOWN_KEYS

    def _few(cls: type, value: Any) -> Any:
        if isinstance(value, dict) and len(value) > most:  # len() only: the hot path pays one comparison
            unknown = sum(1 for key in value if key not in names)
            if unknown > MAX_UNKNOWN_KEYS:
                raise PydanticCustomError(
                    "too_many_unknown_keys",
                    "{unknown} unknown fields: more than {most} are refused without naming each",
                    {"unknown": f"{unknown:,}", "most": MAX_UNKNOWN_KEYS},
                )
        return value

    return {"_few_unknown_keys": model_validator(mode="before")(_few)}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_")) or "Spec"


def parse_spec(raw: dict[str, Any], *, source: str = "<spec>", sha256: str = "") -> FeatureSpec:
    def need(mapping: dict[str, Any], key: str, where: str) -> Any:
        if key not in mapping:
            raise SpecError(f"{source}: {where} is missing '{key}'")
        return mapping[key]

    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping at the top level")
    _known_keys(raw, SPEC_KEYS, f"{source}: spec")
    raw_features = need(raw, "features", "spec")
    if not isinstance(raw_features, list) or not raw_features:
        raise SpecError(f"{source}: 'features' must be a non-empty list")
    features: list[Feature] = []
    for i, item in enumerate(raw_features):
        where = f"features[{i}]"
        if not isinstance(item, dict):
            raise SpecError(f"{source}: {where} must be a mapping with 'name' and 'type', not {item!r}")
        name = _name(need(item, "name", where), f"{source}: {where} name")
        _known_keys(item, FEATURE_KEYS, f"{source}: {where} ({name})")
        try:
            ftype = FeatureType(need(item, "type", where))
        except ValueError as exc:
            raise SpecError(
                f"{source}: {where} ({name}) type must be one of numeric, integer, categorical"
            ) from exc
        raw_categories = item.get("categories", ())
        if not isinstance(raw_categories, list | tuple):
            raise SpecError(
                f"{source}: {where} ({name}) categories must be a list (e.g. [a, b]), not {raw_categories!r}"
            )
        if any(c is None or c == "" for c in raw_categories):  # an empty cell is missing, not ''
            raise SpecError(
                f"{source}: {where} ({name}) categories: an empty or null entry; a missing value is "
                "'nullable: true', not a category"
            )
        if any(isinstance(c, bool) for c in raw_categories):
            raise SpecError(
                f"{source}: {where} ({name}) categories: YAML reads yes/no/true/false/on/off unquoted as "
                'booleans; quote them ("yes")'
            )
        numbers = [c for c in raw_categories if isinstance(c, int | float)]
        if numbers:
            raise SpecError(
                f"{source}: {where} ({name}) categories: {numbers[0]!r} is a YAML number, and a category is "
                "text as the data writes it (unquoted, YAML reads 01 as 1, 010 as 8 and 3.0 as 3.0): quote "
                'them ("01", "3")'
            )
        categories = tuple(str(c) for c in raw_categories)
        if ftype is FeatureType.categorical and not categories:
            raise SpecError(f"{source}: {where} ({name}) is categorical and needs 'categories'")
        if len(set(categories)) < len(categories):
            twice = next(c for i, c in enumerate(categories) if c in categories[:i])
            raise SpecError(f"{source}: {where} ({name}) categories: {twice!r} is listed twice")
        if twin := _twice_in_two_forms(categories, "category"):
            raise SpecError(f"{source}: {where} ({name}) categories: {twin[0]!r} is listed twice {twin[1]}")
        if ftype is not FeatureType.categorical and categories:
            raise SpecError(f"{source}: {where} ({name}) is {ftype.value}: 'categories' are for categorical")
        low, high = _bounds(item.get("min"), item.get("max"), f"{source}: {where} ({name})")
        if ftype is FeatureType.categorical and (low is not None or high is not None):
            raise SpecError(f"{source}: {where} ({name}) is categorical: 'min' and 'max' are for numbers")
        if ftype is FeatureType.integer and low is not None and high is not None and math.ceil(low) > high:
            raise SpecError(
                f"{source}: {where} ({name}) is integer, and no integer lies in [{low:g}, {high:g}]"
            )
        nullable = item.get("nullable", False)
        if not isinstance(nullable, bool):
            raise SpecError(f"{source}: {where} ({name}) nullable must be true or false, not {nullable!r}")
        method, threshold = _drift_test(item, ftype, f"{source}: {where} ({name})")
        features.append(
            Feature(
                name=name,
                type=ftype,
                min=low,
                max=high,
                categories=categories,
                nullable=nullable,
                description=str(item.get("description", "")),
                drift_method=method,
                drift_threshold=threshold,
            )
        )
    names = [f.name for f in features]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise SpecError(f"{source}: feature names must be unique; repeated: {', '.join(repeated)}")
    if twin := _twice_in_two_forms(names, "feature"):
        raise SpecError(f"{source}: feature names must be unique; repeated: {twin[0]!r} {twin[1]}")
    target = _name(need(raw, "target", "spec"), f"{source}: target")
    if target in names:
        raise SpecError(f"{source}: target '{target}' is also listed as a feature")
    if twin := _twice_in_two_forms([*names, target], "feature"):
        raise SpecError(f"{source}: target '{target}' is also listed as a feature {twin[1]}")
    time_column = raw.get("time_column")
    if time_column is not None:
        time_column = _name(time_column, f"{source}: time_column", reserved=False)
        if time_column == target or time_column in names:
            role = "the target" if time_column == target else "a feature"
            raise SpecError(
                f"{source}: time_column '{time_column}' is also {role}: it must be a column of its own"
            )
        for role, kind, known in (("the target", "target", [target]), ("a feature", "feature", names)):
            if twin := _twice_in_two_forms([*known, time_column], kind):
                raise SpecError(f"{source}: time_column '{time_column}' is also {role} {twin[1]}")
    target_min, target_max = _bounds(
        raw.get("target_min"), raw.get("target_max"), f"{source}:", ("target_min", "target_max")
    )
    return FeatureSpec(
        dataset=str(need(raw, "dataset", "spec")),
        target=target,
        features=tuple(features),
        time_column=time_column,
        description=str(raw.get("description", "")),
        target_min=target_min,
        target_max=target_max,
        sha256=sha256,
    )


def _twice_in_two_forms(names: Sequence[str], kind: str) -> tuple[str, str] | None:
    """The first of `names` that an earlier one gives in another Unicode form (macOS writes 기온 decomposed,
    NFD; most tools composed, NFC), and "(the feature '기온' in another Unicode form…)" naming that one, else
    None: the two print alike, so a name listed twice that way passed the check of names listed twice."""
    first: dict[str, str] = {}  # each name's NFC form: the first name of that form (one pass, not n²)
    for name in names:
        twin = first.setdefault(unicodedata.normalize("NFC", name), name)
        if twin != name:
            return name, f"(the {kind} {twin!r} in another Unicode form{FORMS})"
    return None


def _drift_test(item: dict[str, Any], ftype: FeatureType, where: str) -> tuple[str | None, float | None]:
    """A feature's `drift_method` (one of Evidently's for its type) and `drift_threshold` (above 0)."""
    method = item.get("drift_method")
    if method is not None:
        methods = CATEGORICAL_DRIFT_METHODS if ftype is FeatureType.categorical else NUMERIC_DRIFT_METHODS
        if method not in methods:
            close = difflib.get_close_matches(str(method), methods, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise SpecError(
                f"{where} drift_method {method!r} is not one of Evidently's for a {ftype.value} column"
                f"{hint}: {', '.join(methods)}"
            )
    threshold = _number(item.get("drift_threshold"), f"{where} drift_threshold")
    if threshold is not None and not 0 < threshold < math.inf:
        raise SpecError(f"{where} drift_threshold must be above 0, not {threshold:g}")
    if threshold is not None and threshold >= 1 and (method is None or method in P_VALUE_DRIFT_METHODS):
        named = f"{method}'s score is" if method else "the score of Evidently's choice may be"
        raise SpecError(
            f"{where} drift_threshold {threshold:g}: {named} a p-value (drift below the threshold), so 1 or "
            "more would find drift in every window; give one below 1"
            + ("" if method else ", or name a distance as drift_method")
        )
    bound = BOUNDED_DRIFT_METHODS.get(method) if method else None
    if threshold is not None and bound is not None and threshold > bound:
        raise SpecError(
            f"{where} drift_threshold {threshold:g}: {method}'s distance is at most {bound:.4g}, so it would "
            "never find drift; give a lower one"
        )
    return method, threshold


def _known_keys(mapping: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """Refuse a key the spec does not define: a typo (`nulable`) would otherwise drop its rule silently."""
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(known)}"
            raise SpecError(f"{where} has an unknown key '{key}'{hint}")


def _name(value: Any, where: str, *, reserved: bool = True) -> str:
    """A column name as written in the spec: a non-empty string, not one driftloop uses itself."""
    if isinstance(value, bool | int | float):  # `name: on` is True to YAML, `name: 010` is 8
        kind = "a boolean (yes/no/true/false/on/off)" if isinstance(value, bool) else "a number"
        raise SpecError(
            f"{where} must be a non-empty string, not {value!r}: YAML reads it unquoted as {kind}; "
            'quote it as the data\'s header writes it (name: "on")'
        )
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where} must be a non-empty string, not {value!r}")
    if control := next((c for c in value if unicodedata.category(c) == "Cc"), None):
        raise SpecError(f"{where} {value!r} holds the control character {control!r}; a column name cannot")
    if reserved and value in RESERVED_NAMES:
        raise SpecError(
            f"{where} '{value}' is a name driftloop uses for its own columns "
            f"({', '.join(sorted(RESERVED_NAMES))}); rename the column"
        )
    return value


def _number(value: Any, where: str) -> float | None:
    """A bound as written in the spec: a number or absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                pass
            else:  # YAML 1.1 reads 5e1 (no dot, no exponent sign) as text
                hint = " (YAML reads 5e1, without a dot, as text: write 50 or 5.0e+1)"
        raise SpecError(f"{where} must be a number, not {value!r}{hint}")
    if math.isnan(value):
        raise SpecError(f"{where} must be a number, not NaN")
    return value


def load_spec(path: str | Path | None = None) -> FeatureSpec:
    """Load a spec file; None means the shipped apartment spec."""
    if path is None:
        data, source = (
            resources.files("core.specs").joinpath("apartments.yaml").read_bytes(),
            "apartments.yaml",
        )
    else:
        p = Path(path)
        with read_errors(p, SpecError, kind="spec file (YAML)", missing=f"spec file not found: {p}"):
            data, source = p.read_bytes(), str(p)
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise SpecError(
            f"{source}: line {line} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from exc
    return parse_spec(raw, source=source, sha256=hashlib.sha256(data).hexdigest())
