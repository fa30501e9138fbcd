"""A throwaway PostgreSQL cluster in a temp directory, run from the machine's server binaries.

Under root (as in CI) the cluster runs as the `postgres` OS user, because initdb and pg_ctl refuse root.
The port is chosen once, so `stop()` then `start()` comes back on the same port with the same data.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from service.process import free_port

PG_ROOT = Path("/usr/lib/postgresql")
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
RUN_AS_ROOT_USER = "postgres"
STOP_MODES = ("smart", "fast", "immediate")
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PgClusterError(RuntimeError):
    """initdb, pg_ctl or the server failed; the message carries the command output and the log tail."""


def find_pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin holding the server binaries, else pg_ctl's dir on PATH."""
    candidates = sorted(
        (p for p in PG_ROOT.glob("*/bin") if p.parent.name.isdigit() and _has_server(p)),
        key=lambda p: int(p.parent.name),
    )
    if candidates:
        return candidates[-1]
    on_path = shutil.which("pg_ctl")
    if on_path and _has_server(Path(on_path).parent):
        return Path(on_path).parent
    return None


def _has_server(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in SERVER_BINARIES)


class PgCluster:
    """One postmaster on 127.0.0.1:<port>, trust auth, fsync off; its data, sockets and log in `base_dir`.

    Nothing happens until `start()`. `cleanup()` stops the server and removes `base_dir`; an atexit hook
    does the same if the caller never gets to it, so no postmaster outlives the test process.
    """

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        port: int | None = None,
        parent_dir: Path | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        found = bin_dir or find_pg_bin()
        if found is None:
            raise PgClusterError("PostgreSQL server binaries not found (initdb, pg_ctl, postgres)")
        self.bin_dir = found
        self._fixed_port = port
        self._port = port
        self._parent_dir = parent_dir
        self._base_dir: Path | None = None
        self._started = False
        self.start_timeout = start_timeout
        self.os_user = RUN_AS_ROOT_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    # -- paths and addresses -------------------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        if self._base_dir is None:
            raise PgClusterError("cluster not initialised: call start() first")
        return self._base_dir

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise PgClusterError("no port yet: call start() first")
        return self._port

    def url(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) for `database`, as superuser `postgres` over TCP."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        """libpq connection string, for psycopg.connect()."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def connect(self, database: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.conninfo(database), connect_timeout=5, **kwargs)

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a postmaster owns the data directory (pg_ctl status)."""
        if self._base_dir is None or not (self.data_dir / "PG_VERSION").exists():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.data_dir), check=False).returncode == 0

    def start(self) -> None:
        """Start (initialising on first use) and return once the server accepts TCP connections."""
        if self._base_dir is None:
            self._init()
        if self.running:
            return
        for attempt in range(3):
            try:
                self._start_postmaster()
                break
            except PgClusterError:
                # A port we picked can be taken between free_port() and bind(); pick another only before
                # the first successful start, since URLs handed out afterwards name this port.
                if self._fixed_port is not None or self._started or attempt == 2 or not self._port_taken():
                    raise
                self._port = free_port()
                self._write_config()
        self._wait_until_accepting()
        self._started = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` disconnects clients (they see the database go away), data is kept."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {STOP_MODES}, not {mode!r}")
        if not self.running:
            return
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "60")

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP the postmaster and its backends: connections open and queries sent get no reply (a hung
        server, a stalled disk), unlike stop(), which refuses them at once. SIGCONT on the way out."""
        pids = self._server_pids()
        for pid in pids:
            _signal(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                _signal(pid, signal.SIGCONT)

    def _server_pids(self) -> list[int]:
        postmaster = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended while we looked
                continue
            if int(fields[1]) == postmaster:
                children.append(int(stat.parent.name))
        return [postmaster, *children]

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server and remove the temp directory; safe to call more than once."""
        if self._base_dir is None:
            return
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = None
            self._started = False
            self._port = self._fixed_port
            atexit.unregister(self.cleanup)

    def __enter__(self) -> PgCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    # -- databases -----------------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (lower-case identifier); returns its SQLAlchemy URL."""
        with self.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(_checked(name))))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS, disconnecting any sessions still attached to it."""
        with self.connect(autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(_checked(name)))
            )

    # -- internals -----------------------------------------------------------------------------------

    def _init(self) -> None:
        base = Path(tempfile.mkdtemp(prefix="driftloop-pg-", dir=self._parent_dir))
        self._base_dir = base
        atexit.register(self.cleanup)
        if os.geteuid() == 0:
            _ensure_os_user(self.os_user)
            shutil.chown(base, user=self.os_user, group=pwd.getpwnam(self.os_user).pw_gid)
        self._run(
            "initdb",
            "-D", str(self.data_dir),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        if self._port is None:
            self._port = free_port()
        self._write_config()

    def _write_config(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base_dir}'",
            "max_connections": "200",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
        }
        lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# driftloop test cluster\n" + lines)
        # initdb's default pg_hba.conf already trusts local sockets and 127.0.0.1/::1 given --auth=trust.

    def _start_postmaster(self) -> None:
        # pg_ctl -w notices a postmaster that exits during startup (port taken, bad config) and fails fast.
        result = self._run(
            "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path),
            "-w", "-t", str(int(self.start_timeout)),
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise PgClusterError(
                f"pg_ctl start failed (exit {result.returncode}) on port {self.port}:\n"
                f"{result.stdout}{result.stderr}\n--- server log tail ---\n{self.log_tail()}"
            )

    def _wait_until_accepting(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with psycopg.connect(self.conninfo(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise PgClusterError(
                        f"server on port {self.port} did not accept connections within "
                        f"{self.start_timeout:.0f}s: {exc}\n--- server log tail ---\n{self.log_tail()}"
                    ) from exc
                time.sleep(0.05)

    def _port_taken(self) -> bool:
        return "Address already in use" in self.log_tail()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no server log: {exc})"

    def _run(self, binary: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / binary), *args]
        result = subprocess.run(
            _as_user(self.os_user, command) if os.geteuid() == 0 else command,
            cwd=self._base_dir,  # the postgres user cannot read root's working directory
            capture_output=True,
            text=True,
            timeout=self.start_timeout + 60,
            check=False,
        )
        if check and result.returncode != 0:
            raise PgClusterError(
                f"{binary} {shlex.join(args)} failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )
        return result


def _checked(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"database name must match {_NAME.pattern}: {name!r}")
    return name


def _as_user(user: str, command: list[str]) -> list[str]:
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *command]
    return ["su", user, "-s", "/bin/sh", "-c", shlex.join(command)]


def _ensure_os_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", user], check=True)


def _signal(pid: int, signum: int) -> None:
    """A backend may end between the look at /proc and the signal: one exiting then is reaped by the
    postmaster as soon as it runs again (seen once: ProcessLookupError on SIGCONT)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
