"""The Evidently HTML page of a monitor run: summary, drift table, per-column distributions, accuracy
figures and the drift tests, those of columns judged outside Evidently included."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evidently.core.metric_types import MetricConfig, MetricTestResult, metric_tests_widget, render_widgets
from evidently.core.report import Snapshot, metric_tests_stats
from evidently.legacy.renderers.html_widgets import (
    CounterData,
    WidgetSize,
    counter,
    group_widget,
    table_data,
)
from evidently.legacy.tests.base_test import TestStatus
from evidently.metrics import ValueDrift

from core.figures import figure

if TYPE_CHECKING:
    from monitor.report import DriftResult, FeatureDrift

DRIFT_TEST_ID = "drift"  # the test Evidently attaches to ValueDrift when include_tests=True


def save_page(path: Path, result: DriftResult, drift: Snapshot, accuracy: Snapshot | None) -> None:
    """One page: summary, drift table, per-column distributions, accuracy figures, the drift tests."""
    snapshots = [s for s in (drift, accuracy) if s is not None]
    tests: list[MetricTestResult] = [t for s in snapshots for t in s.tests_results]
    tests += [_page_test(f) for f in result.features if f.judged_here]
    widgets = [
        group_widget(title="Summary", widgets=[_summary_widget(result), _drift_table(result)]),
        group_widget(title="Drift by column", widgets=_widgets(drift)),
    ]
    if accuracy is not None:
        widgets.append(group_widget(title="Accuracy on labelled rows", widgets=_widgets(accuracy)))
    widgets += [metric_tests_stats(tests), metric_tests_widget(tests)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_widgets(widgets, as_iframe=False), encoding="utf-8")


def _page_test(feature: FeatureDrift) -> MetricTestResult:
    """The drift test of a column judged here (`_empty_drift`, `_missing_share_drift`), which Evidently
    never ran, so the page's tests count it as the report does."""
    metric = ValueDrift(column=feature.feature)
    return MetricTestResult(
        id=DRIFT_TEST_ID,
        name=f"Value Drift for column {feature.feature}",
        description=f"{feature.method.capitalize()}: {'drifted' if feature.detected else 'unchanged'}.",
        metric_config=MetricConfig(metric_id=metric.metric_id, params=metric.dict(exclude_none=True)),
        test_config={},
        status=TestStatus.FAIL if feature.detected else TestStatus.SUCCESS,
    )


def _widgets(snapshot: Snapshot) -> list[Any]:
    return [w for result in snapshot.metric_results.values() for w in result.get_widgets()]


def _summary_widget(result: DriftResult) -> Any:
    acc = result.accuracy
    counters = [
        CounterData("rows (sampled)", f"{result.rows:,} ({result.sampled_rows:,})"),
        CounterData("labelled rows", f"{result.labelled_rows:,}"),
        CounterData("drift share", f"{result.drift_share:.2f}"),
        CounterData("weighted drift score", f"{result.weighted_score:.3f}"),
        CounterData("MAE", figure(acc.mae) if acc else "n/a"),
        CounterData("RMSE", figure(acc.rmse) if acc else "n/a"),
        CounterData("MAPE %", f"{acc.mape:.2f}" if acc and math.isfinite(acc.mape) else "n/a"),
    ]
    return counter(title="Window", counters=counters, size=WidgetSize.FULL)


def _drift_table(result: DriftResult) -> Any:
    rows = [*result.features, *([result.prediction] if result.prediction else [])]
    return table_data(
        title="Drift by feature",
        column_names=["column", "method", "score", "threshold", "drift", "importance"],
        data=[
            [f.feature, f.method, f"{f.score:.4f}", f"{f.threshold:g}", "DRIFT" if f.detected else "ok",
             f"{f.importance:.3f}" if f is not result.prediction else "-"]
            for f in rows
        ],
    )  # fmt: skip
