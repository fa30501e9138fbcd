"""Benchmark: `driftloop ingest` (every line checked against the spec, all or nothing) against a bare load.

    .venv/bin/python bench/ingest.py [--rows 100000] [--database sqlite|postgresql-url]

A CSV of generated apartment transactions is loaded into a fresh, migrated database twice, each time in its
own child process: once by core.ingest.ingest_csv (streaming in batches of 2,000: UTF-8 and field counts,
types, bounds, categories, the target, one time format, the sha256 record), and once by the baseline, the
least a loader must do: pandas reads the whole file, and the rows are inserted in the same batches with no
check at all. A third child loads the file's first half as an earlier file first, then (measured) the
whole file, overlapping it: an export of "the last N days" after the previous one; its rows already loaded
are looked up and left out. Prints, for each, seconds, rows/s (rows of the file read), the child's peak RSS
(Linux) and how long it held its write transaction on labelled_row (on SQLite, the database's one write
lock: every other writer waits that long), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BATCH = 2_000
NAMES = {
    "baseline": "baseline: pandas + bulk insert, no checks",
    "ingest": "driftloop ingest",
    "overlap": "driftloop ingest, first half loaded before",
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--database", default="sqlite", help="'sqlite' (a temp file) or a PostgreSQL URL")
    p.add_argument("--child", choices=list(NAMES), help=argparse.SUPPRESS)
    p.add_argument("--csv", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, Path(args.csv), args.database)))
        return
    _parent(args)


def _parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from rich.console import Console
    from rich.table import Table

    from core.generator import generate_transactions

    console = Console(width=120)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labelled.csv"
        with console.status(f"generating {args.rows:,} rows…"):
            frame = generate_transactions(args.rows, seed=5)
            frame.to_csv(path, index=False)
            frame.iloc[: args.rows // 2].to_csv(_earlier(path), index=False)
        results = {}
        for mode in NAMES:
            database = f"sqlite:///{Path(tmp) / f'{mode}.db'}" if args.database == "sqlite" else args.database
            with console.status(f"{mode}: loading {args.rows:,} rows…"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", mode, "--csv", str(path), "--database", database],
                    check=True, capture_output=True, text=True, cwd=ROOT,
                )  # fmt: skip
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    table = Table(title=f"Loading {args.rows:,} labelled rows ({args.database.split(':')[0]})")
    for column in ("loader", "rows loaded", "seconds", "rows/s", "peak RSS MB", "write lock s"):
        table.add_column(column, justify="right" if column != "loader" else "left")
    for mode, r in results.items():
        rate = args.rows / r["seconds"]
        table.add_row(
            NAMES[mode], f"{r['rows']:,}", f"{r['seconds']:.2f}", f"{rate:,.0f}", f"{r['peak_mb']:.0f}",
            f"{r['write_s']:.2f}",
        )  # fmt: skip
    console.print(table)
    base, ours, overlap = results["baseline"], results["ingest"], results["overlap"]
    console.print(
        f"driftloop ingest takes {ours['seconds'] / base['seconds']:.2f}× the baseline's time "
        f"and {ours['peak_mb'] / base['peak_mb']:.2f}× its peak memory, and holds the write lock "
        f"{ours['write_s'] / base['write_s']:.2f}× as long; over a file half loaded before, it takes "
        f"{overlap['seconds'] / ours['seconds']:.2f}× its own time and holds the lock "
        f"{overlap['write_s'] / ours['write_s']:.2f}× as long"
    )


def _earlier(path: Path) -> Path:
    return path.with_name("earlier.csv")


def _child(mode: str, path: Path, database: str) -> dict[str, Any]:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(ROOT))
    from core.db import make_engine, make_sessions, migrate
    from core.spec import load_spec

    migrate(database)
    engine = make_engine(database)
    sessions = make_sessions(engine)
    spec = load_spec()
    if mode == "overlap":  # not measured
        _ingest(_earlier(path), spec, sessions)
    writes = _WriteSpans(engine)
    started = time.perf_counter()
    rows = _baseline(path, spec, sessions) if mode == "baseline" else _ingest(path, spec, sessions)
    seconds = time.perf_counter() - started
    engine.dispose()
    return {"rows": rows, "seconds": seconds, "peak_mb": _peak_mb(), "write_s": writes.seconds}


def _peak_mb() -> float:
    """This process's peak RSS (VmHWM, Linux). Not getrusage's ru_maxrss: after exec it keeps the peak of
    the process that spawned it, here the parent holding the generated rows."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class _WriteSpans:
    """Seconds from a first write to labelled_row or ingested_file to the commit or rollback that ends it: on
    SQLite, how long the loader held the write lock (its temporary staging table takes none)."""

    WRITE = re.compile(r"\s*(INSERT INTO|UPDATE) (labelled_row|ingested_file)\b", re.IGNORECASE)

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.started: float | None = None
        self.seconds = 0.0
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._end)
        event.listen(engine, "rollback", self._end)

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.started is None and self.WRITE.match(statement):
            self.started = time.perf_counter()

    def _end(self, conn: Any) -> None:
        if self.started is not None:
            self.seconds += time.perf_counter() - self.started
            self.started = None


def _ingest(path: Path, spec: Any, sessions: Any) -> int:
    from core.ingest import ingest_csv

    report = ingest_csv(path, spec=spec, sessions=sessions, chunk_size=BATCH)
    assert report.bad == 0, report.rejected[:3]
    return report.loaded


def _baseline(path: Path, spec: Any, sessions: Any) -> int:
    import pandas as pd
    from sqlalchemy import insert

    from core.db import utcnow
    from core.schema import LabelledRow

    frame = pd.read_csv(path)
    times = pd.to_datetime(frame[spec.time_column], utc=True)
    features = frame[spec.feature_names].to_dict("records")
    now = utcnow()
    rows = [
        {
            "features": f,
            "target": float(t),
            "event_time": e.to_pydatetime(),
            "source": path.name,
            "ingested_at": now,
        }
        for f, t, e in zip(features, frame[spec.target], times, strict=True)
    ]
    with sessions.begin() as session:
        for start in range(0, len(rows), BATCH):
            session.execute(insert(LabelledRow), rows[start : start + BATCH])
    return len(rows)


if __name__ == "__main__":
    main()
