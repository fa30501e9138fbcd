"""Which test judges a column's drift: the spec's `drift_method` where it names one, else Evidently's choice,
but for Evidently's chi-square, replaced by the two-sample one (`TWO_SAMPLE_CHI2`).

Evidently's chi-square tests the window against the reference's shares as if they were exact, and on stable
data it flagged about half the windows of 2,000 rows or more against a reference of 1,000.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
from evidently.legacy.calculations.stattests import chi_stat_test
from evidently.legacy.calculations.stattests.registry import (
    StatTest,
    _registered_stat_tests,
    get_stattest,
    register_stattest,
)
from evidently.legacy.core import ColumnType
from evidently.metrics import ValueDrift
from scipy.stats import chi2_contingency

from core.spec import FeatureSpec, FeatureType
from retrain.train import PREDICTION


def _two_sample_chi2(
    reference: pd.Series, current: pd.Series, feature_type: ColumnType, threshold: float
) -> tuple[float, bool]:
    """p-value of the chi-square test of independence on the 2 × k table of both sides' counts: the
    reference is a sample too. Evidently's chi-square takes the reference's shares as the truth, so its
    p-values shrink with the window's size alone."""
    counts = pd.concat([reference.value_counts(), current.value_counts()], axis=1).fillna(0)
    p_value = float(chi2_contingency(counts.to_numpy().T, correction=False)[1])
    return p_value, p_value < threshold


TWO_SAMPLE_CHI2 = StatTest(
    name="chi-square p_value (two-sample)",  # the name is what a report shows as the method
    display_name="chi-square p_value (two-sample)",
    allowed_feature_types=[ColumnType.Categorical, ColumnType.Numerical],
)


@functools.cache
def register_two_sample_chi2() -> None:
    """Evidently finds a method by name in its process-wide registry: registered there when a report first
    needs it, not at import (nothing happens at import time)."""
    register_stattest(TWO_SAMPLE_CHI2, default_impl=_two_sample_chi2)


def value_drift(
    column: str, reference: pd.DataFrame, current: pd.DataFrame, spec: FeatureSpec, threshold: float | None
) -> ValueDrift:
    """The column's drift test: the spec's `drift_method` (`chisquare`: `TWO_SAMPLE_CHI2`) and
    `drift_threshold` where it names them, else `_method`'s choice. A feature that names either is judged by
    its own threshold, or the method's default: `threshold` (DRIFTLOOP_DRIFT_STATTEST_THRESHOLD, set for
    Evidently's choices) may mean nothing for the method named (0.05 set for p-values, taken by a PSI)."""
    feature = spec.feature(column) if column != PREDICTION else None
    method = feature.drift_method if feature else None
    if method == "chisquare":  # named, it is the two-sample one too: Evidently's flags stable windows
        method = TWO_SAMPLE_CHI2.name
    elif method is None:
        categorical = feature is not None and feature.type is FeatureType.categorical
        method = _method(reference[column], current[column], categorical=categorical)
    if feature is not None and (feature.drift_method is not None or feature.drift_threshold is not None):
        threshold = feature.drift_threshold
    return ValueDrift(column=column, method=method, threshold=threshold)


def _method(reference: pd.Series, current: pd.Series, *, categorical: bool) -> str | None:
    """None (Evidently's own choice for the column, on its values as Evidently cleans them) unless that is
    its chi-square: then the two-sample one (`TWO_SAMPLE_CHI2`)."""
    kind = ColumnType.Categorical if categorical else ColumnType.Numerical
    ref, cur = (side.replace([-np.inf, np.inf], np.nan).dropna() for side in (reference, current))
    return TWO_SAMPLE_CHI2.name if get_stattest(ref, cur, kind, None) is chi_stat_test else None


def display_name(method: str) -> str:
    """How a report shows `method` as Evidently resolved it: a method the spec names is configured by name
    ("psi"), and shown as Evidently displays it ("PSI")."""
    if method in _registered_stat_tests:
        return str(next(iter(_registered_stat_tests[method].values())).display_name)
    return method
