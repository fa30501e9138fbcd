"""Loading labelled transactions (a CSV) into labelled_row, row by row against the spec."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from core.db import utcnow
from core.schema import LabelledRow
from core.spec import FeatureSpec, FeatureType


class IngestError(ValueError):
    """The file as a whole cannot be ingested (unreadable, header lacks columns)."""


@dataclass(slots=True)
class IngestReport:
    accepted: int = 0
    rejected: list[tuple[int, list[str]]] = field(default_factory=list)  # (CSV line number, problems)

    @property
    def total(self) -> int:
        return self.accepted + len(self.rejected)


def parse_row(
    raw: dict[str, str], spec: FeatureSpec
) -> tuple[dict[str, Any], float, datetime | None, list[str]]:
    """CSV strings -> typed features, target and event time, plus every problem found (naming the column)."""
    features: dict[str, Any] = {}
    problems: list[str] = []
    for f in spec.features:
        text = (raw.get(f.name) or "").strip()
        if text == "":
            value: Any = None
        elif f.type is FeatureType.categorical:
            value = text
        else:
            try:
                value = float(text)
            except ValueError:
                problems.append(f"{f.name}: {text!r} is not a number")
                continue
            if f.type is FeatureType.integer and value.is_integer():
                value = int(value)
        why = f.check(value)
        if why:
            problems.append(f"{f.name}: {why}")
        features[f.name] = value
    target = math.nan
    text = (raw.get(spec.target) or "").strip()
    try:
        target = float(text)
    except ValueError:
        problems.append(f"{spec.target}: {text!r} is not a number")
    else:
        why = spec.target_feature.check(target)
        if why:
            problems.append(f"{spec.target}: {why}")
    event_time = None
    if spec.time_column:
        stamp = pd.to_datetime((raw.get(spec.time_column) or "").strip() or None, errors="coerce", utc=True)
        if pd.isna(stamp):
            problems.append(f"{spec.time_column}: missing or not a date/time")
        else:
            event_time = stamp.to_pydatetime()
    return features, target, event_time, problems


def ingest_csv(
    path: Path,
    *,
    spec: FeatureSpec,
    sessions: sessionmaker[Session],
    source: str | None = None,
    chunk_size: int = 2000,
    on_progress: Callable[[int], None] | None = None,
) -> IngestReport:
    """Insert every valid row; report each invalid one with its line number. Valid rows of a file with
    some invalid ones are still loaded: the report says exactly which were not."""
    report = IngestReport()
    source = source or Path(path).name
    batch: list[dict[str, Any]] = []
    for line, raw in _read(path, spec):
        features, target, event_time, problems = parse_row(raw, spec)
        if problems:
            report.rejected.append((line, problems))
        else:
            now = utcnow()
            batch.append(
                {
                    "features": features,
                    "target": target,
                    "event_time": event_time or now,
                    "source": source,
                    "ingested_at": now,
                }
            )
        if len(batch) >= chunk_size:
            report.accepted += _flush(sessions, batch)
        if on_progress:
            on_progress(1)
    report.accepted += _flush(sessions, batch)
    return report


def _flush(sessions: sessionmaker[Session], batch: list[dict[str, Any]]) -> int:
    if not batch:
        return 0
    with sessions.begin() as session:
        session.execute(insert(LabelledRow), batch)
    n = len(batch)
    batch.clear()
    return n


def count_rows(path: Path) -> int:
    with Path(path).open(encoding="utf-8", newline="") as fh:
        return max(sum(1 for _ in fh) - 1, 0)


def _read(path: Path, spec: FeatureSpec) -> Iterator[tuple[int, dict[str, str]]]:
    if not Path(path).is_file():
        raise IngestError(f"file not found: {path}")
    with Path(path).open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        required = [*spec.feature_names, spec.target] + ([spec.time_column] if spec.time_column else [])
        missing = [c for c in required if c not in header]
        if missing:
            raise IngestError(f"{path}: header is missing column(s): {', '.join(missing)}")
        for raw in reader:
            yield reader.line_num, raw
