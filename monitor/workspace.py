"""Each judged monitor run's Evidently snapshots in a local Evidently workspace
(DRIFTLOOP_EVIDENTLY_WORKSPACE), so Evidently's own UI lists them and plots them over time:
`evidently ui --workspace DIR`.

One project per spec (named after its dataset), created with a dashboard: each feature's drift score, the
prediction's, and the accuracy window's MAE and mean error. A run adds its drift snapshot and, when it
measured labels, its accuracy one, named after the report (`report 12 · v3 · breach: drift`); the newest
`keep` snapshots stay. Only the process holding the monitor lease runs the monitor, so one writer at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.spec import FeatureSpec
from monitor import LOOP_LOGGER
from retrain.train import PREDICTION

if TYPE_CHECKING:
    from evidently.core.report import Snapshot
    from evidently.ui.workspace import Workspace

log = logging.getLogger(LOOP_LOGGER)


@dataclass(slots=True)
class EvidentlyWorkspace:
    path: Path
    spec: FeatureSpec
    keep: int
    _project_id: str | None = field(default=None, init=False)

    @property
    def project_name(self) -> str:
        return f"driftloop: {self.spec.dataset}"

    def add(
        self, snapshots: tuple[Snapshot, ...], *, report_id: int, champion_version: int, verdict: str
    ) -> None:
        """Add a run's snapshots (drift, then accuracy) and prune the oldest; a failure is logged, not raised:
        the report is stored already, and the workspace is a view of it."""
        try:
            workspace = self._open()
            project_id = self._project(workspace)
            for snapshot, kind in zip(snapshots, ("drift", "accuracy"), strict=False):
                name = f"report {report_id} · v{champion_version} · {verdict}: {kind}"
                workspace.add_run(project_id, snapshot, name=name)
            self._prune(workspace, project_id)
        except Exception as exc:  # a full disk, a directory made read-only: named, and the run goes on
            log.warning(
                "could not add report %s to the Evidently workspace %s: %s: %s",
                report_id, self.path, type(exc).__name__, exc,
            )  # fmt: skip

    def _open(self) -> Workspace:
        """Evidently's local workspace, reading no snapshot: `Workspace(dir)` also builds the UI's project
        manager, which reads and parses every snapshot kept (11 s and 1.1 GB for 600) and fails on one a full
        disk left half-written. What this adds, lists and prunes goes through `state`, which reads none."""
        from evidently.ui.storage.local.base import LocalState  # Evidently's UI: imported when first used
        from evidently.ui.workspace import Workspace

        self.path.mkdir(parents=True, exist_ok=True)
        workspace = Workspace.__new__(Workspace)
        workspace.path = str(self.path)
        workspace.state = LocalState(str(self.path))
        return workspace

    def _project(self, workspace: Workspace) -> str:
        """The spec's project, created with its dashboard when the workspace has none of that name."""
        if self._project_id is not None and workspace.get_project(self._project_id) is not None:
            return self._project_id
        found = workspace.search_project(self.project_name)
        if found:
            project = found[0]
        else:
            project = workspace.create_project(
                self.project_name,
                description=self.spec.description or f"driftloop monitor runs: {self.spec.dataset}",
            )
            for panel in _panels(self.spec):
                project.dashboard.add_panel(panel)
        self._project_id = str(project.id)
        return self._project_id

    def _prune(self, workspace: Workspace, project_id: str) -> None:
        # Evidently's snapshot ids are UUIDv7, so their order is the order they were added in.
        runs = sorted(str(run) for run in workspace.list_runs(project_id))
        for run in runs[: max(len(runs) - self.keep, 0)]:
            workspace.delete_run(project_id, run)


def _panels(spec: FeatureSpec) -> list[object]:
    from evidently.sdk.models import DashboardPanelPlot, PanelMetric

    def line(title: str, size: str, values: list[PanelMetric]) -> DashboardPanelPlot:
        return DashboardPanelPlot(
            title=title, subtitle=None, size=size, values=values, plot_params={"plot_type": "line"}
        )

    drift = [
        PanelMetric(legend=name, metric="ValueDrift", metric_labels={"column": name})
        for name in spec.feature_names
    ]
    prediction = PanelMetric(legend=PREDICTION, metric="ValueDrift", metric_labels={"column": PREDICTION})
    return [
        line("Drift score by feature (the method's own scale: a distance, or a p-value)", "full", drift),
        line("Drift score of the prediction", "half", [prediction]),
        line(
            "Accuracy window: MAE and mean error (prediction − actual)",
            "half",
            [
                PanelMetric(legend="MAE", metric="MAE", metric_labels={"value_type": "mean"}),
                PanelMetric(legend="mean error", metric="MeanError", metric_labels={"value_type": "mean"}),
            ],
        ),
    ]
