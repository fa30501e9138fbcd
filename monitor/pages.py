"""Retention of the Evidently pages: the newest `keep` stay on disk, older ones are pruned."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.schema import DriftReport

log = logging.getLogger("driftloop.loop")


def prune_pages(sessions: sessionmaker[Session], *, report_dir: Path, keep: int) -> list[int]:
    """Delete the pages of all but the newest `keep` reports that have one and clear their html_path in the
    same transaction; returns the pruned report ids, oldest first. Report rows are never deleted (they are
    the policy's history). A page already gone counts as pruned; one that cannot be deleted keeps its path
    (retried next run); one outside `report_dir` is not deleted, only forgotten."""
    pruned: list[int] = []
    with sessions.begin() as session:
        rows = session.scalars(
            select(DriftReport)
            .where(DriftReport.html_path.is_not(None))
            .order_by(DriftReport.id.desc())
            .offset(keep)
        ).all()
        for row in rows:
            if _remove(Path(str(row.html_path)), report_dir=report_dir, report_id=row.id):
                row.html_path = None
                pruned.append(row.id)
    return sorted(pruned)


def _remove(page: Path, *, report_dir: Path, report_id: int) -> bool:
    # Pages are written straight into report_dir; unlink removes a symlink there, never what it points to.
    if page.parent.resolve() != report_dir.resolve():
        log.warning(
            "report %s: page %s is outside DRIFTLOOP_REPORT_DIR; forgotten, not deleted", report_id, page
        )
        return True
    try:
        page.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("report %s: could not prune page %s: %s", report_id, page, exc)
        return False
    return True
