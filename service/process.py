"""Starting local server processes: a free loopback port, and waiting until one answers."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], *, timeout: float) -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g} s")


def start_server(
    cmd: list[str], env: dict[str, str], *, cwd: Path, log: Path | None = None, timeout: float = 60
) -> tuple[subprocess.Popen[bytes], str]:
    """Run `cmd --port N` on a free loopback port and wait until its /health answers 200; its URL.

    Output goes to `log` when given (the child keeps its own descriptor), else to this process's.
    """
    port = free_port()
    argv = [*cmd, "--port", str(port)]
    if log is None:
        proc = subprocess.Popen(argv, env=env, cwd=cwd)
    else:
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(url + "/health", proc, timeout=timeout)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def stop_server(proc: subprocess.Popen[bytes], *, timeout: float = 60) -> None:
    """SIGTERM, as an orchestrator sends it (driftloop drains its prediction log); killed after `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
