"""The prediction-log spool: rows kept on local disk while the database is unreachable, until replayed.

A segment is one JSON-lines file per appended batch, written under a temporary name, fsynced, then
renamed into place, so a segment is either absent or complete. `read` still tolerates a torn last line
(a file copied or edited by hand, a filesystem that broke its promise). One process owns a spool
directory (`claim` holds a lock on it); within that process the methods are thread-safe.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("driftloop.spool")

SUFFIX = ".jsonl"
TMP_PREFIX = ".tmp-"
REJECTED = "rejected"
LOCK = ".lock"  # held (flock) by the process that owns the directory; holds its pid
# <time_ns>-<sequence>-<rows>.jsonl: the name sorts oldest first and carries the row count.
_NAME = re.compile(r"^(\d{20})-(\d{9})-(\d+)\.jsonl$")


class SpoolInUse(RuntimeError):
    """Another process holds the spool directory."""


class Spool:
    """Append-only segments in `directory`; the directory is created on the first append."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._rows: int | None = None  # counted from the directory on first use
        self._last_ns = 0
        self._seq = 0
        self._lock_fd: int | None = None

    def claim(self) -> None:
        """Own the directory until `release` (or the process's end), creating it. Raises SpoolInUse, naming
        the holder's pid, when another process owns it: two processes on one spool would each count, replay
        and remove the other's segments (its gauge and /ready then report rows that are gone), and one
        starting would delete a segment the other is writing as unfinished."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolInUse(
                f"the spool directory {self.directory} is in use by another driftloop process "
                f"(pid {holder}): give each serving process its own DRIFTLOOP_SPOOL_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def release(self) -> None:
        """Let another process claim the directory."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Store `rows` durably as one new segment. Raises TypeError/ValueError for a row that is not JSON."""
        if not rows:
            return
        data = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows).encode()
        with self._lock:
            self._ensure_counted()
            now = max(time.time_ns(), self._last_ns + 1)
            self._last_ns = now
            self._seq = (self._seq + 1) % 1_000_000_000
            name = f"{now:020d}-{self._seq:09d}-{len(rows)}{SUFFIX}"
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.directory / name, data)
        with self._lock:
            self._rows = (self._rows or 0) + len(rows)

    def segments(self) -> list[Path]:
        """Complete segments, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_file() and _is_segment(p)]
        return sorted(found, key=lambda p: p.name)

    def read(self, segment: Path) -> list[dict[str, Any]]:
        """The rows of `segment`; a torn or undecodable line is skipped and logged, never misread."""
        rows: list[dict[str, Any]] = []
        lines = segment.read_bytes().split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                torn = number == len(lines)  # no newline after it: the write stopped mid-line
                log.error("spool %s line %d %s; skipped", segment.name, number, "torn" if torn else "corrupt")
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                log.error("spool %s line %d is not an object; skipped", segment.name, number)
        return rows

    def rows(self, segment: Path) -> int:
        """How many rows `segment` was written with (what `read` returns unless lines were torn)."""
        return _rows_in(segment)

    def remove(self, segment: Path) -> None:
        """Forget a replayed segment."""
        rows = _rows_in(segment)
        segment.unlink(missing_ok=True)
        with self._lock:
            self._ensure_counted()
            self._rows = max(0, (self._rows or 0) - rows)

    def pending_rows(self) -> int:
        """Rows on the spool awaiting replay; counted from the directory once, then kept."""
        with self._lock:
            self._ensure_counted()
            return self._rows or 0

    def reject(self, rows: list[dict[str, Any]], reason: str) -> Path:
        """Keep rows the database refuses (never replayed) in `rejected/` for an operator to inspect."""
        folder = self.directory / REJECTED
        folder.mkdir(parents=True, exist_ok=True)
        records = [{"reason": reason, "row": row} for row in rows]
        data = "".join(json.dumps(r, default=repr) + "\n" for r in records).encode()
        path = folder / f"{time.time_ns():020d}-{threading.get_ident()}{SUFFIX}"
        _write_atomically(path, data)
        return path

    def _ensure_counted(self) -> None:
        if self._rows is not None:
            return
        if self.directory.is_dir():
            for stale in self.directory.glob(f"{TMP_PREFIX}*"):
                # A crash before the rename: the batch never became durable, and is incomplete.
                log.warning("spool: removing unfinished segment %s", stale.name)
                stale.unlink(missing_ok=True)
        self._rows = sum(_rows_in(p) for p in self.segments())


def _is_segment(path: Path) -> bool:
    return path.name.endswith(SUFFIX) and not path.name.startswith(".")


def _rows_in(segment: Path) -> int:
    match = _NAME.match(segment.name)
    if match:
        return int(match.group(3))
    try:  # a segment not named by this class: count its lines
        data = segment.read_bytes()
    except FileNotFoundError:
        return 0
    return sum(1 for line in data.split(b"\n") if line.strip())


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(fd)
    finally:
        os.close(fd)
