"""The PostgreSQL test cluster: a real server that can be stopped mid-test and come back on its port."""

from __future__ import annotations

import errno
import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, text

from tests.pgcluster import PgCluster, PgClusterError, find_pg_bin

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def pg_bin() -> Path:
    found = find_pg_bin()
    if found is None:
        pytest.skip("PostgreSQL server binaries not found (.ci/run installs the 'postgresql' package)")
    return found


@pytest.fixture(scope="module")
def cluster(pg_bin: Path) -> Iterator[PgCluster]:
    """This module's own cluster: these tests stop and restart it, which must not disturb other modules."""
    cluster = PgCluster(bin_dir=pg_bin)
    cluster.start()
    yield cluster
    cluster.cleanup()


def tcp_connect_errno(port: int) -> int:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port))


def test_find_pg_bin_holds_the_server_binaries(pg_bin: Path) -> None:
    assert all((pg_bin / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def test_server_runs_the_found_binaries_with_test_settings(cluster: PgCluster, pg_bin: Path) -> None:
    # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" -> "15.18"
    binary_version = subprocess.run(
        [str(pg_bin / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[2]
    with cluster.connect() as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('listen_addresses', 'port', 'unix_socket_directories', 'fsync', 'max_connections', "
                "'server_version')"
            ).fetchall()
        )
        user = conn.execute("SELECT current_user").fetchone()
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "port": str(cluster.port),
        "unix_socket_directories": str(cluster.base_dir),
        "fsync": "off",
        "max_connections": "200",
        "server_version": settings["server_version"],
    }
    assert settings["server_version"].split()[0] == binary_version
    assert user == ("postgres",)


def test_cluster_files_belong_to_the_os_user_that_runs_it(cluster: PgCluster) -> None:
    expected = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    assert cluster.os_user == expected
    assert pwd.getpwuid(cluster.data_dir.stat().st_uid).pw_name == expected
    assert cluster.log_path.is_file()


def test_create_database_returns_a_working_sqlalchemy_url(cluster: PgCluster) -> None:
    url = cluster.create_database("created_db")
    assert url == f"postgresql+psycopg://postgres@127.0.0.1:{cluster.port}/created_db"
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_database()")).scalar_one() == "created_db"
    finally:
        engine.dispose()


def test_drop_database_removes_it_even_with_a_session_attached(cluster: PgCluster) -> None:
    cluster.create_database("dropped_db")
    with cluster.connect("dropped_db") as attached:
        cluster.drop_database("dropped_db")
        with pytest.raises(psycopg.OperationalError):
            attached.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError, match='database "dropped_db" does not exist'):
        cluster.connect("dropped_db")
    cluster.drop_database("dropped_db")  # IF EXISTS: a second drop is a no-op


def test_database_names_must_be_plain_identifiers(cluster: PgCluster) -> None:
    with pytest.raises(ValueError, match="database name must match"):
        cluster.create_database('x"; DROP DATABASE postgres; --')


def test_stop_refuses_connections_and_start_brings_back_same_port_and_data(cluster: PgCluster) -> None:
    cluster.create_database("survives")
    with cluster.connect("survives", autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, label text)")
        conn.execute("INSERT INTO kept VALUES (1, 'before stop'), (2, 'also')")
    port = cluster.port

    cluster.stop()

    assert cluster.running is False
    assert tcp_connect_errno(port) == errno.ECONNREFUSED
    with pytest.raises(psycopg.OperationalError, match="Connection refused"):
        cluster.connect("survives")

    cluster.start()

    assert cluster.running is True
    assert cluster.port == port
    with cluster.connect("survives") as conn:
        rows = conn.execute("SELECT id, label FROM kept ORDER BY id").fetchall()
    assert rows == [(1, "before stop"), (2, "also")]


def test_stop_fast_disconnects_open_sessions(cluster: PgCluster) -> None:
    with cluster.connect() as conn:
        cluster.stop("fast")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    cluster.start()
    assert cluster.running is True


def test_restart_keeps_data(cluster: PgCluster) -> None:
    cluster.create_database("restarted")
    with cluster.connect("restarted", autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT 42 AS answer")
    cluster.restart()
    with cluster.connect("restarted") as conn:
        assert conn.execute("SELECT answer FROM t").fetchall() == [(42,)]


def test_stop_and_start_are_idempotent(cluster: PgCluster) -> None:
    cluster.start()
    assert cluster.running is True
    cluster.stop()
    cluster.stop()
    assert cluster.running is False
    cluster.start()
    assert cluster.running is True


def test_stop_rejects_an_unknown_mode(cluster: PgCluster) -> None:
    with pytest.raises(ValueError, match="stop mode must be one of"):
        cluster.stop("abrupt")


def test_start_failure_reports_the_server_log(cluster: PgCluster, pg_bin: Path) -> None:
    clash = PgCluster(bin_dir=pg_bin, port=cluster.port)
    try:
        with pytest.raises(PgClusterError) as failure:
            clash.start()
        message = str(failure.value)
        assert f"pg_ctl start failed (exit 1) on port {cluster.port}" in message
        assert "--- server log tail ---" in message
        assert "Address already in use" in message
        assert clash.running is False
    finally:
        clash.cleanup()
    assert cluster.running is True


def test_cleanup_stops_the_server_and_removes_its_directory(pg_bin: Path) -> None:
    cluster = PgCluster(bin_dir=pg_bin)
    cluster.start()
    base_dir, port = cluster.base_dir, cluster.port

    cluster.cleanup()

    assert base_dir.exists() is False
    assert cluster.running is False
    assert tcp_connect_errno(port) == errno.ECONNREFUSED
    cluster.cleanup()  # a second cleanup is a no-op
