"""A real driftloop process on a loopback port, started and stopped by a test."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.settings import Settings, to_env
from service.process import start_server as start_process

ROOT = Path(__file__).resolve().parents[1]
_SERVERS = itertools.count(1)  # names each server's log in its test's directory


@dataclass
class LiveServer:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)  # type: ignore[arg-type]

    def post(self, path: str, **kw: object) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)  # type: ignore[arg-type]

    def metric(self, name: str) -> float:
        """The value of one sample line (`name` includes labels exactly as exported)."""
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def terminate(self, timeout: float = 60) -> bool:
        """SIGTERM, as an orchestrator sends it; True when the process shut down gracefully.

        uvicorn re-raises the signal after a graceful shutdown, so the exit status is -SIGTERM, not 0.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code in (0, -signal.SIGTERM) and "Application shutdown complete" in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    settings: Settings, log_dir: Path, *, command: tuple[str, ...] = ("serve",), timeout: float = 60
) -> LiveServer:
    log_path = log_dir / f"server-{next(_SERVERS)}.log"
    try:
        proc, url = start_process(
            [sys.executable, "-m", "service.cli", *command, "--host", "127.0.0.1"],
            {**os.environ, **to_env(settings)}, cwd=ROOT, log=log_path, timeout=timeout,
        )  # fmt: skip
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}:\n{log_path.read_text(errors='replace')[-3000:]}") from None
    return LiveServer(proc, url, log_path)


def wait_until(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns a truthy value (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
