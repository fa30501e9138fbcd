"""The command line, in-process through typer's runner, against a real SQLite file."""

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from core.db import utcnow
from core.generator import generate_transactions
from core.schema import RetrainRun
from core.settings import Settings
from service.cli import cli
from service.cli.common import open_registry, open_sessions
from tests.conftest import register_copy


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "DRIFTLOOP_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "DRIFTLOOP_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "DRIFTLOOP_TRAIN_ITERATIONS": "30",
        "DRIFTLOOP_TRAIN_THREAD_COUNT": "2",
        "COLUMNS": "250",  # rich wraps at the terminal width; keep messages on one line
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def bootstrap_refused(path: Path) -> str:
    """`bootstrap --csv path` refused (exit 2); its output on one line, as the terminal wraps it."""
    result = run("bootstrap", "--csv", str(path))
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def test_bootstrap_is_idempotent_and_models_lists_v1(env) -> None:
    first = run("bootstrap", "--rows", "2000")
    assert first.exit_code == 0
    assert "trained and promoted v1" in first.output
    again = run("bootstrap", "--rows", "2000")
    assert "already the champion: v1" in again.output
    listing = run("models")
    assert "v1" in listing.output and "champion" in listing.output


def test_ingest_with_a_bad_line_loads_nothing_and_exits_1_unless_skip_bad(env, tmp_path: Path) -> None:
    frame = generate_transactions(30, seed=9)
    frame["floor"] = frame["floor"].astype(object)
    frame.loc[4, "floor"] = "tenth"
    path = tmp_path / "new.csv"
    frame.to_csv(path, index=False)
    result = run("ingest", str(path))
    assert result.exit_code == 1
    assert (
        "nothing loaded: 1 of 30 line(s) are bad (listed below). Fix them and run again, or pass "
        "--skip-bad to load the 29 good row(s) only." in result.output
    )
    assert "line 6: floor: 'tenth' is not a number" in result.output
    skipped = run("ingest", str(path), "--skip-bad")
    assert skipped.exit_code == 0
    assert "29 row(s) loaded as source 'new.csv', 1 bad line(s) skipped (listed below)." in skipped.output
    assert (
        "To load those, fix them and ingest the file again: the rows loaded now are known by their "
        "contract_date, features and price_10k_krw, and are not loaded a second time." in skipped.output
    )
    assert "line 6: floor: 'tenth' is not a number" in skipped.output
    frame.loc[4, "floor"] = 10
    frame.to_csv(path, index=False)
    fixed = run("ingest", str(path))
    assert (fixed.exit_code, "1 row(s) loaded as source 'new.csv'" in fixed.output) == (0, True)
    assert (
        "29 row(s) an earlier file loaded (the same contract_date, features and price_10k_krw) were not "
        "loaded again; --force loads them a second time." in fixed.output
    )


def test_ingest_without_a_time_column_says_a_fixed_file_would_load_its_good_rows_twice(
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "meters.yaml"
    spec.write_text("dataset: meters\ntarget: kwh\nfeatures:\n  - {name: hour, type: integer, max: 23}\n")
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(spec))
    path = tmp_path / "meters.csv"
    path.write_text("hour,kwh\n3,1.5\n99,2.5\n")
    skipped = run("ingest", str(path), "--skip-bad")
    assert skipped.exit_code == 0
    assert (
        "To load those, put them, fixed, in a new file under the same header and ingest that: with no time "
        "column in the spec, ingesting this file again, fixed, would load its 1 good row(s) a second time."
    ) in " ".join(skipped.output.split())  # as the terminal wraps it


def test_ingest_of_a_file_already_loaded_loads_nothing_unless_forced(env, tmp_path: Path) -> None:
    path = tmp_path / "jan.csv"
    generate_transactions(10, seed=9).to_csv(path, index=False)
    assert "10 row(s) loaded as source 'jan.csv'" in run("ingest", str(path)).output
    again = run("ingest", str(path), "--source", "other")
    assert again.exit_code == 0
    assert f"{path} was already loaded as source 'jan.csv', last on " in again.output
    assert (
        ": 10 good row(s) in it (those an earlier file had loaded stay under that file's source)"
        in again.output
    )
    assert "source). Nothing loaded now.\n--force loads it again: its rows then count twice" in again.output
    forced = run("ingest", str(path), "--force")
    assert (forced.exit_code, "10 row(s) loaded" in forced.output) == (0, True)


def test_ingest_names_the_columns_it_does_not_load(env, tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    frame = generate_transactions(10, seed=9).assign(agent="Kim", notes="", lat=37.5)
    frame.to_csv(path, index=False)
    result = run("ingest", str(path))
    assert result.exit_code == 0
    assert "10 row(s) loaded as source 'wide.csv'" in result.output
    assert "column(s) the spec does not read, not loaded: 'agent', 'notes', 'lat'" in result.output
    plain = tmp_path / "plain.csv"
    generate_transactions(10, seed=8).to_csv(plain, index=False)
    assert "not loaded:" not in run("ingest", str(plain)).output


def test_ingest_prints_the_file_s_own_text_as_written_brackets_included(env, tmp_path: Path) -> None:
    """A live ingest of a line whose district was '[/]' ended in a rich MarkupError traceback, and one of
    '[bold]Foo-gu' was listed as 'Foo-gu': values, column names and the source came from the file."""
    frame = generate_transactions(5, seed=9).assign(**{"[/]note": "x"})
    frame["district"] = frame["district"].astype(object)
    frame.loc[1, "district"] = "[bold]Foo-gu"
    frame.loc[3, "district"] = "[/]"
    path = tmp_path / "[q1].csv"
    frame.to_csv(path, index=False)
    result = CliRunner().invoke(cli, ["ingest", str(path), "--skip-bad", "--source", "[red]crm"])
    assert result.exception is None, result.output
    text = " ".join(result.output.split())
    assert "3 row(s) loaded as source '[red]crm', 2 bad line(s) skipped" in text
    assert "column(s) the spec does not read, not loaded: '[/]note'" in text
    assert "line 3: district: unknown category '[bold]Foo-gu'" in text
    assert "line 5: district: unknown category '[/]'" in text
    again = CliRunner().invoke(cli, ["ingest", str(path)])
    assert again.exception is None, again.output
    said = " ".join(again.output.split())
    assert f"{path} was already loaded as source '[red]crm', last on " in said
    assert "UTC: 3 good row(s) in it" in said


def test_ingest_of_a_missing_file_or_header_is_a_clear_error(env, tmp_path: Path) -> None:
    missing = run("ingest", str(tmp_path / "nope.csv"))
    assert (missing.exit_code, "file not found" in missing.output) == (2, True)
    directory = run("ingest", str(tmp_path))
    assert (directory.exit_code, "is a directory; give the CSV file in it" in directory.output) == (2, True)
    utf16 = tmp_path / "utf16.csv"
    generate_transactions(3).to_csv(utf16, index=False, encoding="utf-16")
    result = run("ingest", str(utf16))
    assert (result.exit_code, "is UTF-16 text; save it as UTF-8" in result.output) == (2, True)
    path = tmp_path / "short.csv"
    generate_transactions(3).drop(columns=["district"]).to_csv(path, index=False)
    result = run("ingest", str(path))
    assert result.exit_code == 2
    assert "header is missing column(s): district" in result.output


def test_promote_and_rollback_explain_refusals(env) -> None:
    run("bootstrap", "--rows", "2000")
    assert "model version 5 does not exist" in run("promote", "5").output
    for beyond in ("0", "2147483648", "99999999999999999999", "v0", "two", "-1", "²"):  # never sent to the DB
        result = run("promote", "--", beyond)
        assert result.exit_code == 2, beyond
        assert f"{beyond!r} is not a model version: give its number, 2 or v2" in result.output, beyond
    assert "model version 5 does not exist" in run("promote", "v5").output  # as `driftloop models` lists it
    assert "v1 is the champion" in run("promote", "v1").output
    assert "no previous champion to roll back to" in run("rollback").output


def test_a_rejected_version_needs_a_reason_to_be_promoted(env) -> None:
    run("bootstrap", "--rows", "2000")
    with open_registry(Settings()) as registry:
        v2 = register_copy(registry, registry.champion())
        registry.reject(version=v2.version, reason="worse than champion")
    refused = run("promote", "2")
    assert refused.exit_code == 1
    assert (
        "model version 2 was rejected by the gate (worse than champion); a reason is needed to promote it "
        "anyway: pass --reason TEXT"
    ) in refused.output
    forced = run("promote", "2", "--reason", "holdout was a holiday week")
    assert (forced.exit_code, "v2 is the champion" in forced.output) == (0, True)
    with open_registry(Settings()) as registry:
        assert registry.get(2).note.endswith("\npromoted: holdout was a holiday week")
        v3 = register_copy(registry, registry.champion())
    assert run("promote", str(v3.version)).exit_code == 0
    with open_registry(Settings()) as registry:
        assert registry.get(3).note == "promoted: manual promote via CLI"


def test_retrain_without_a_champion_is_refused_before_any_run(env) -> None:
    result = run("retrain")
    assert result.exit_code == 1
    assert "no champion to retrain against: run `driftloop bootstrap` (or promote a version)" in result.output
    with open_sessions(Settings()) as sessions, sessions() as session:
        assert session.scalars(select(RetrainRun)).all() == []


def test_without_auto_migrate_a_schema_behind_is_named_not_a_traceback(env, monkeypatch) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory

    from core.db import _alembic_config

    head = ScriptDirectory.from_config(_alembic_config(env["DRIFTLOOP_DATABASE_URL"])).get_current_head()
    monkeypatch.setenv("DRIFTLOOP_AUTO_MIGRATE", "false")
    advice = "DRIFTLOOP_AUTO_MIGRATE is false: run `driftloop migrate` (or wait for the migrate job)"
    empty = run("models")
    assert empty.exit_code == 2
    assert (
        f"the database has no driftloop schema yet, and this driftloop needs revision {head}. {advice}"
        in (empty.output)
    )
    command.upgrade(_alembic_config(env["DRIFTLOOP_DATABASE_URL"]), "0004")  # an image ahead of its migration
    behind = run("bootstrap", "--rows", "2000")
    assert behind.exit_code == 2
    assert (
        f"the database is at schema revision 0004, and this driftloop needs revision {head}." in behind.output
    )
    migrated = run("migrate")
    assert (migrated.exit_code, migrated.output) == (0, f"migrated the schema from revision 0004 to {head}\n")
    assert run("models").exit_code == 0
    assert run("migrate").output == f"schema is up to date (revision {head})\n"


def test_migrate_says_it_created_the_schema_of_an_empty_database(env) -> None:
    from alembic.script import ScriptDirectory

    from core.db import _alembic_config

    head = ScriptDirectory.from_config(_alembic_config(env["DRIFTLOOP_DATABASE_URL"])).get_current_head()
    created = run("migrate")
    assert (created.exit_code, created.output) == (0, f"created the schema (revision {head})\n")


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_without_auto_migrate_serve_and_worker_refuse_a_database_with_no_schema(env, command: str) -> None:
    """The README says every command that opens the database refuses a schema that is not the newest when
    DRIFTLOOP_AUTO_MIGRATE is false. serve and worker used to start anyway, logging a 'no such table'
    traceback every registry poll and lease renewal until the migrate job ran. A subprocess, so that a
    server that does start fails the test by its timeout instead of blocking it."""
    from service.process import free_port

    result = subprocess.run(
        [sys.executable, "-m", "service.cli", command, "--port", str(free_port())],
        env={**os.environ, "DRIFTLOOP_AUTO_MIGRATE": "false"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = " ".join(result.stderr.split())
    assert result.returncode == 2, output
    assert "the database has no driftloop schema yet" in output
    assert "DRIFTLOOP_AUTO_MIGRATE is false: run `driftloop migrate`" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(("command", "port"), [("serve", "70000"), ("worker", "65536"), ("serve", "0")])
def test_a_port_outside_1_to_65535_is_refused_not_served_on_another(env, command: str, port: str) -> None:
    """uvicorn took 70000 as 70000 mod 65536 = 4464, listening there while its log said :70000. A
    subprocess, so that a server that does start fails the test by its timeout instead of blocking it."""
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", command, "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = " ".join(result.stderr.split())
    assert result.returncode == 2, output
    assert "Invalid value for '--port':" in output  # its wording differs between typer releases


def test_serve_on_a_spool_directory_another_process_owns_is_refused(env, tmp_path: Path) -> None:
    """A second `driftloop serve` started from the same working directory (the default var/spool) exits 2
    naming the directory and its owner, rather than share the spool with the first."""
    from service.process import free_port
    from service.spool import Spool

    owner = Spool(tmp_path / "spool")
    owner.claim()  # as the first replica's prediction logger holds it
    try:
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(free_port())],
            env={**os.environ, "DRIFTLOOP_SPOOL_DIR": str(tmp_path / "spool")},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        owner.release()
    output = " ".join(result.stderr.split())
    assert result.returncode == 2, output
    assert (
        f"DRIFTLOOP_SPOOL_DIR: the spool directory {tmp_path / 'spool'} is in use by another driftloop "
        f"process (pid {os.getpid()}): give each serving process its own DRIFTLOOP_SPOOL_DIR"
    ) in output
    assert "Traceback" not in output


@pytest.mark.parametrize("auto_migrate", ["true", "false"])
def test_a_database_that_cannot_be_opened_is_named_not_a_traceback(
    env, tmp_path: Path, monkeypatch, auto_migrate: str
) -> None:
    from service.process import free_port

    monkeypatch.setenv("DRIFTLOOP_AUTO_MIGRATE", auto_migrate)
    not_a_database = tmp_path / "history.csv"
    generate_transactions(10, seed=9).to_csv(not_a_database, index=False)
    refused = f"postgresql+psycopg://driftloop:s3cret-pw@127.0.0.1:{free_port()}/driftloop"
    for url, problem in (
        (f"sqlite:///{not_a_database}", "DatabaseError: file is not a database"),
        (refused, "OperationalError: connection failed"),
    ):
        monkeypatch.setenv("DRIFTLOOP_DATABASE_URL", url)
        for args in (("models",), ("migrate",), ("ingest", str(not_a_database)), ("monitor",)):
            result = run(*args)
            assert result.exit_code == 2, (args, result.output)
            output = " ".join(result.output.split())
            assert f"cannot open the database (DRIFTLOOP_DATABASE_URL): {problem}" in output, output
            assert "Traceback" not in output and "s3cret-pw" not in output


def test_settings_read_a_yaml_file_under_the_environment(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "driftloop.yaml"
    config.write_text("monitor_interval_s: 60\nwindow_rows: 1234\nWEBHOOK_URL: http://127.0.0.1:9/hook\n")
    monkeypatch.setenv("DRIFTLOOP_CONFIG", str(config))
    monkeypatch.setenv("DRIFTLOOP_WINDOW_ROWS", "999")
    settings = Settings(_env_file=None)
    assert (settings.monitor_interval_s, settings.window_rows) == (60, 999)  # the environment wins
    assert settings.webhook_url == "http://127.0.0.1:9/hook"


def test_bootstrap_from_a_csv_trains_on_it_and_records_where_it_came_from(env, tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    generate_transactions(800, start="2020-01-01", end="2021-12-31", seed=4).to_csv(path, index=False)
    result = run("bootstrap", "--csv", str(path))
    assert result.exit_code == 0, result.output
    assert "trained and promoted v1" in result.output
    from core.db import make_engine, make_sessions
    from core.registry import ArtifactStore, Registry

    engine = make_engine(env["DRIFTLOOP_DATABASE_URL"])
    v1 = Registry(make_sessions(engine), ArtifactStore(Path(env["DRIFTLOOP_ARTIFACT_DIR"]))).champion()
    engine.dispose()
    assert v1 is not None
    assert (v1.version, v1.trigger, v1.train_rows) == (1, "bootstrap", 640)  # 80 % of 800, by time
    assert v1.data_sources == {"bootstrap": str(path)}
    assert v1.train_start is not None and v1.train_start.year == 2020
    # With a champion in place the CSV is not read, and the output says how to learn from it instead.
    again = run("bootstrap", "--csv", str(path))
    assert again.exit_code == 0
    assert "already the champion: v1 (validation MAE" in again.output
    said = " ".join(again.output.split())
    assert "was not read: bootstrap only trains the first model. To learn from it, `driftloop ingest" in said
    assert "`, then `driftloop retrain`." in said


def test_bootstrap_from_a_csv_refuses_rows_and_seed_as_the_backtest_does(env, tmp_path: Path) -> None:
    """--rows and --seed make generated data; with --csv they were dropped in silence, and `--rows 100`
    trained v1 on every row of the file. Nothing is trained."""
    path = tmp_path / "history.csv"
    generate_transactions(800, start="2020-01-01", end="2021-12-31", seed=4).to_csv(path, index=False)
    for option in ("--rows", "--seed"):
        result = run("bootstrap", "--csv", str(path), option, "100")
        assert result.exit_code == 2, result.output
        assert (
            f"bootstrap: {option} makes generated data (bootstrap without --csv); {path} is read as it is, "
            "every row"
        ) in " ".join(result.output.split())
    assert "trained and promoted v1" in run("bootstrap", "--csv", str(path)).output  # none was before


def test_bootstrap_from_a_csv_without_a_spec_column_is_refused(env, tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    generate_transactions(100, seed=4).drop(columns=["households"]).to_csv(path, index=False)
    result = run("bootstrap", "--csv", str(path))
    assert result.exit_code == 2
    assert f"bootstrap: {path}: missing column(s): households" in result.output
    assert "Traceback" not in result.output


def test_bootstrap_from_a_directory_or_a_csv_the_shipped_spec_does_not_fit_says_so(
    env, tmp_path: Path
) -> None:
    result = run("bootstrap", "--csv", str(tmp_path))
    assert result.exit_code == 2
    assert f"bootstrap: {tmp_path} is a directory; give the CSV file in it" in result.output
    path = tmp_path / "history.csv"
    generate_transactions(100, seed=4).rename(columns={"floor": "Floor"}).to_csv(path, index=False)
    assert (
        f"bootstrap: {path}: missing column(s): floor (the header has 'Floor'); the spec used was the "
        "shipped apartment spec: set DRIFTLOOP_SPEC_PATH to a spec describing your data's columns"
    ) in bootstrap_refused(path)


def test_bootstrap_from_a_csv_with_values_the_spec_refuses_names_them(env, tmp_path: Path) -> None:
    frame = generate_transactions(100, seed=4)
    frame.loc[6, "district"] = "Atlantis-gu"
    frame["build_year"] = frame["build_year"].astype(float)
    frame.loc[9, "build_year"] = 1999.5
    path = tmp_path / "history.csv"
    frame.to_csv(path, index=False)
    output = bootstrap_refused(path)
    assert (
        "column 'district' has 1 row(s) with unknown categories (the spec's: Gangnam-gu, Seocho-gu, "
        "Songpa-gu, Yongsan-gu, Seongdong-gu, Mapo-gu, Gwangjin-gu, Yangcheon-gu, Jongno-gu, Jung-gu, …), "
        "first at line 8 ('Atlantis-gu')"
    ) in output
    assert "column 'build_year' has 1 row(s) with values that are not whole numbers, first at line 11" in (
        output
    )


def test_bootstrap_from_too_few_rows_or_a_constant_target_says_so_instead_of_a_traceback(
    env, tmp_path: Path
) -> None:
    path = tmp_path / "history.csv"
    generate_transactions(5, seed=4).to_csv(path, index=False)
    assert (
        f"bootstrap: {path}: 5 labelled row(s), of which 4 to train v1 on (the rest validate it); it needs "
        "at least 10"
    ) in bootstrap_refused(path)
    generate_transactions(100, seed=4).assign(price_10k_krw=50_000).to_csv(path, index=False)
    assert (
        f"bootstrap: {path}: target 'price_10k_krw' is 50000 in every one of v1's 80 training rows: a model "
        "cannot learn from a target that never varies"
    ) in bootstrap_refused(path)
    assert run("models").output.count("champion") == 0


def test_bootstrap_from_a_csv_dated_ahead_of_now_is_refused_as_ingest_refuses_it(env, tmp_path: Path) -> None:
    """v1's train_end in 2099 would keep every label until then out of the accuracy window."""
    frame = generate_transactions(100, start="2020-01-01", end="2021-12-31", seed=4)
    frame["contract_date"] = frame["contract_date"].astype(str)
    frame.loc[[6, 40], "contract_date"] = "2099-01-01"
    path = tmp_path / "history.csv"
    frame.to_csv(path, index=False)
    output = bootstrap_refused(path)
    assert f"bootstrap: {path}: column 'contract_date' has 2 time(s) more than a day ahead of now (" in output
    assert "UTC), first at line 8 (2099-01-01 00:00)" in output
    assert run("models").output.count("champion") == 0


def test_bootstrap_of_a_spec_of_ones_own_without_a_csv_asks_for_one(env, tmp_path: Path, monkeypatch) -> None:
    spec = tmp_path / "bikes.yaml"
    spec.write_text("dataset: bikes\ntarget: rentals\nfeatures: [{name: temp_c, type: numeric}]\n")
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(spec))
    result = run("bootstrap")
    assert result.exit_code == 2
    assert (
        "no --csv given, and the generated apartment data has no column(s) temp_c, rentals of spec 'bikes': "
        "train v1 on your own labelled data with --csv FILE" in result.output
    )


def test_the_demo_runs_the_apartment_example_whatever_the_caller_set(tmp_path: Path, monkeypatch) -> None:
    from service.demo import demo_env, demo_settings

    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(tmp_path / "bikes.yaml"))
    monkeypatch.setenv("DRIFTLOOP_WINDOW_SECONDS", "60")
    monkeypatch.setenv("PATH_FOR_TEST", "kept")
    env = demo_env(demo_settings(tmp_path, "http://127.0.0.1:9/hook"))
    assert "DRIFTLOOP_SPEC_PATH" not in env and "DRIFTLOOP_WINDOW_SECONDS" not in env
    assert env["PATH_FOR_TEST"] == "kept"
    assert env["DRIFTLOOP_MONITOR_INTERVAL_S"] == "3"
    assert os.environ["DRIFTLOOP_WINDOW_SECONDS"] == "60"  # the caller's own environment is left as it was


def test_retrain_waits_and_says_what_the_run_did_and_why(env) -> None:
    assert run("bootstrap", "--rows", "2000").exit_code == 0
    result = run("retrain")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "driftloop retrain run #1 (trigger: manual): candidate v2" in text
    assert "Reason: manual trigger via CLI" in text
    with open_sessions(Settings()) as sessions, sessions() as session:
        status = session.get(RetrainRun, 1).status
    assert ("Gate: " in text) == (status == "rejected")  # a rejection names the gate's reasons


def test_a_retrain_run_that_fails_exits_1(env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`driftloop retrain && deploy-something` must not go on after a failed run."""
    assert run("bootstrap", "--rows", "2000").exit_code == 0
    shipped = (Path(__file__).parents[1] / "core" / "specs" / "apartments.yaml").read_text(encoding="utf-8")
    grown = tmp_path / "grown.yaml"  # a feature added: the champion does not fit, and the run fails
    grown.write_text(shipped + "  - {name: view, type: numeric, nullable: true}\n", encoding="utf-8")
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(grown))
    result = run("retrain")
    text = " ".join(result.output.split())
    assert "driftloop retrain run #1 (trigger: manual): failed; v1 stays champion." in text
    assert "FeatureMismatchError: v1 does not fit the spec" in text
    assert result.exit_code == 1


def test_the_monitor_under_a_spec_the_champion_does_not_fit_names_the_difference(
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As bootstrap, /ready and a retrain run say it, not as 'reference is missing columns' in a traceback."""
    from core.schema import PredictionLog
    from core.spec import load_spec

    assert run("bootstrap", "--rows", "2000").exit_code == 0
    spec = load_spec()
    rows = generate_transactions(20, seed=5)[spec.feature_names].to_dict("records")
    with open_sessions(Settings()) as sessions, sessions.begin() as session:
        for features in rows:  # served by v1 before the spec file changed
            session.add(PredictionLog(
                id=str(uuid4()), created_at=utcnow(), model_version=1, features=features, prediction=1.0,
                latency_ms=1.0,
            ))  # fmt: skip
    shipped = (Path(__file__).parents[1] / "core" / "specs" / "apartments.yaml").read_text(encoding="utf-8")
    grown = tmp_path / "grown.yaml"
    grown.write_text(shipped + "  - {name: view, type: numeric, nullable: true}\n", encoding="utf-8")
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(grown))
    monkeypatch.setenv("DRIFTLOOP_MIN_WINDOW_ROWS", "10")
    result = CliRunner().invoke(cli, ["monitor"])
    assert result.exit_code == 2, result.output
    assert (
        "the monitor cannot run: v1 does not fit the spec (the spec lists view, which it was not trained on)"
        in " ".join(result.output.split())
    )


def test_the_monitor_under_a_spec_the_champion_does_not_fit_refuses_even_with_no_traffic_to_judge(
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas under the changed spec are not ready, so no answer arrives: a report of "window has 0 rows"
    would hide why, run after run."""
    from core.schema import DriftReport

    assert run("bootstrap", "--rows", "2000").exit_code == 0
    shipped = (Path(__file__).parents[1] / "core" / "specs" / "apartments.yaml").read_text(encoding="utf-8")
    grown = tmp_path / "grown.yaml"
    grown.write_text(shipped + "  - {name: view, type: numeric, nullable: true}\n", encoding="utf-8")
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(grown))
    result = CliRunner().invoke(cli, ["monitor"])
    assert result.exit_code == 2, result.output
    assert (
        "the monitor cannot run: v1 does not fit the spec (the spec lists view, which it was not trained on)"
        in " ".join(result.output.split())
    )
    with open_sessions(Settings()) as sessions, sessions() as session:
        assert session.scalar(select(func.count()).select_from(DriftReport)) == 0


def test_a_spec_whose_target_was_renamed_is_refused_by_the_monitor_and_a_retrain_naming_both_names(
    env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The features still fit, so the model serves; but the champion's reference holds its labels under the
    old name. The monitor crashed on it ('reference is missing columns'), and a retrain dropped every
    reference row without a word and trained on the new labels alone."""
    from core.schema import ModelVersion

    assert run("bootstrap", "--rows", "2000").exit_code == 0
    shipped = (Path(__file__).parents[1] / "core" / "specs" / "apartments.yaml").read_text(encoding="utf-8")
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text(shipped.replace("target: price_10k_krw", "target: price_krw"), encoding="utf-8")
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(renamed))
    monkeypatch.setenv("DRIFTLOOP_MIN_LABELLED_ROWS", "10")
    rows = tmp_path / "new.csv"
    generate_transactions(60, start="2022-02-01", end="2022-03-01", seed=7).rename(
        columns={"price_10k_krw": "price_krw"}
    ).to_csv(rows, index=False)
    assert run("ingest", str(rows)).exit_code == 0
    why = (
        "v1 does not fit the spec (its reference data holds the target price_10k_krw, the spec names "
        "price_krw)"
    )
    monitor = CliRunner().invoke(cli, ["monitor"])
    assert monitor.exit_code == 2, monitor.output
    assert f"the monitor cannot run: {why}" in " ".join(monitor.output.split())
    retrain = run("retrain")
    assert retrain.exit_code == 1
    assert f"FeatureMismatchError: {why}" in " ".join(retrain.output.split())
    with open_sessions(Settings()) as sessions, sessions() as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 1


def test_the_monitor_while_another_process_runs_it_says_so(env) -> None:
    """The worker's scheduled run (or a replica's POST /monitor/run) holds the monitor lease: refused by
    name, exit 1, no report, not a traceback."""
    from core.lease import try_acquire
    from core.schema import DriftReport
    from monitor.jobs import MONITOR_LEASE

    assert run("bootstrap", "--rows", "2000").exit_code == 0
    with open_sessions(Settings()) as sessions:
        assert try_acquire(sessions, name=MONITOR_LEASE, holder="worker-0:7:abc123", ttl_s=600, now=utcnow())
        result = CliRunner().invoke(cli, ["monitor"])
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(DriftReport)) == 0
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "a monitor run is already in progress in worker-0:7:abc123 (its lease expires" in text
    assert "try again when it has finished" in text and "Traceback" not in text


@pytest.mark.parametrize("command", [["ingest", "rows.csv"], ["monitor"], ["retrain"], ["serve"], ["worker"]])
def test_a_bad_spec_is_named_by_every_command_that_reads_it(
    env, tmp_path: Path, monkeypatch, command
) -> None:
    spec = tmp_path / "bikes.yaml"
    spec.write_text(
        "dataset: bikes\ntarget: rentals\nfeatures: [{name: temp_c, type: numeric, nulable: true}]\n"
    )
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(spec))
    result = CliRunner().invoke(cli, command)  # not caught by the runner: a traceback would be an exception
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 2
    assert "features[0] (temp_c) has an unknown key 'nulable' (did you mean 'nullable'?)" in " ".join(
        result.output.split()
    )


@pytest.mark.parametrize(
    "command", [["bootstrap"], ["ingest", "rows.csv"], ["monitor"], ["retrain"], ["serve"], ["worker"]]
)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "DRIFTLOOP_SPEC_PATH: spec file not found: "),
        (
            "dataset: b\ntarget: r\nfeatures: [{name: s, type: categorical, categories: 5}]\n",
            "DRIFTLOOP_SPEC_PATH: {spec}: features[0] (s) categories must be a list (e.g. [a, b]), not 5",
        ),
    ],
    ids=["missing", "brackets"],
)
def test_a_bad_spec_is_refused_naming_the_setting_and_its_message_whole(
    env, tmp_path: Path, monkeypatch, command, text: str | None, expected: str
) -> None:
    """A live `serve` with a spec file that was not there said "spec file not found: …", naming no setting,
    and one whose message holds brackets lost them to the console's markup ("(e.g. ), not 5")."""
    spec = tmp_path / "bikes.yaml"
    if text is not None:
        spec.write_text(text)
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(spec))
    result = CliRunner().invoke(cli, command)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 2
    assert expected.format(spec=spec) in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(
    ("setting", "flags", "expected"),
    [(None, [], True), ("false", [], False), ("true", ["--no-scheduler"], False)],
)
def test_serve_runs_the_scheduler_as_driftloop_scheduler_and_no_scheduler_say(
    env,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: str | None,
    flags: list[str],
    expected: bool,
) -> None:
    import uvicorn
    from fastapi.testclient import TestClient

    monkeypatch.setenv("DRIFTLOOP_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("DRIFTLOOP_REPORT_DIR", str(tmp_path / "reports"))
    assert run("bootstrap", "--rows", "2000").exit_code == 0
    if setting is not None:
        monkeypatch.setenv("DRIFTLOOP_SCHEDULER", setting)
    started: list[bool] = []

    def serve_briefly(app, **_: object) -> None:  # the app's whole life, without a socket
        with TestClient(app):
            started.append(app.state.ctx.loop._scheduler is not None)

    monkeypatch.setattr(uvicorn, "run", serve_briefly)
    assert run("serve", *flags).exit_code == 0
    assert started == [expected]


def test_a_rate_model_s_validation_mae_reads_in_its_units(env, tmp_path: Path, monkeypatch) -> None:
    """An on-time rate in [0, 1]: bootstrap said "validation MAE 0.0" and `models` listed 0.0, one decimal as
    for a price."""
    import numpy as np
    import pandas as pd

    from core.figures import figure

    rng = np.random.default_rng(5)
    couriers = rng.integers(1, 20, 600)
    rate = np.clip(0.5 + 0.02 * couriers + rng.normal(0, 0.04, 600), 0, 1)
    days = pd.date_range("2023-01-01", periods=600, freq="h").strftime("%Y-%m-%dT%H:%M:%S")
    path, spec = tmp_path / "ontime.csv", tmp_path / "ontime.yaml"
    pd.DataFrame({"slot": days, "couriers": couriers, "rate": rate}).to_csv(path, index=False)
    spec.write_text(
        "dataset: ontime\ntarget: rate\ntarget_min: 0\ntarget_max: 1\ntime_column: slot\n"
        "features:\n  - {name: couriers, type: integer, min: 1, max: 100}\n"
    )
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(spec))
    result = run("bootstrap", "--csv", str(path))
    assert result.exit_code == 0, result.output
    with open_registry(Settings()) as registry:
        v1 = registry.champion()
        assert v1 is not None
        mae = v1.metrics["val_mae"]
    assert 0.01 < mae < 0.1
    assert f"trained and promoted v1 (validation MAE {figure(mae)})" in result.output
    assert f"│ {figure(mae)} " in run("models").output


def test_python_m_service_cli_runs_a_backtest_to_its_end(env, tmp_path: Path) -> None:
    """`python -m service.cli` (how the tests start servers) runs the package's __main__, which CliRunner
    never imports, and a command there reaches its end."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "backtest", "--data", "generated:none", "--rows", "2000",
         "--policies", "never", "--step", "30d", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "v1 trains before 2022-01-01;" in result.stdout + result.stderr
    assert (out / "summary.json").is_file()


def test_the_backtest_header_names_a_cut_inside_a_day_to_the_second() -> None:
    """'v1 trains before 2023-07-04' for a cut at 18:46 that day would hide 18 hours of training rows."""
    from service.cli.replay import _instant

    assert _instant(datetime(2022, 1, 1, tzinfo=UTC)) == "2022-01-01"
    assert _instant(datetime(2023, 7, 4, 18, 46, 12, tzinfo=UTC)) == "2023-07-04 18:46:12+00:00"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["generate", "out.csv", "--scenario", "rate-shock"],
            "generate: unknown scenario 'rate-shock'; choose one of",
        ),
        (["generate", "out.csv", "--rows", "-5"], "Invalid value for '--rows'"),
        (
            ["generate", "out.csv", "--start", "2022-01-01", "--end", "2021-01-01"],
            "generate: end must be after start",
        ),
        (
            ["generate", "out.csv", "--start", "soon"],
            "generate: Unknown datetime string format, unable to parse: soon",
        ),
        (
            ["generate", "out.csv", "--scenario", "unit_bug", "--change-at", "2023-01-01"],
            "generate: change_at 2023-01-01 00:00 is not before end: no row would change",
        ),
        (["generate", "."], "generate: cannot write .: . is a directory; give the CSV file to write in it"),
        (["demo", "--scenario", "rate-shock"], "demo: unknown scenario 'rate-shock'; choose one of"),
        (["ingest", "missing.csv", "--show", "-1"], "Invalid value for '--show'"),
        (["serve", "--log-level", "loud"], "Invalid value for '--log-level': 'loud' is not a log level"),
        (["worker", "--log-level", "loud"], "Invalid value for '--log-level': 'loud' is not a log level"),
    ],
)
def test_a_bad_option_is_a_message_and_exit_2_not_a_traceback(env, tmp_path: Path, args, message) -> None:
    os.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out.csv").exists()


def test_demo_refuses_to_wipe_a_state_directory_it_did_not_make(env, tmp_path: Path) -> None:
    """--state var would have deleted the real database beside the demo's (var/driftloop.db)."""
    from service.demo import STATE_MARKER, state_problem

    state = tmp_path / "var"
    state.mkdir()
    (state / "driftloop.db").write_text("the production database")
    result = CliRunner().invoke(cli, ["demo", "--state", str(state)])
    assert result.exit_code == 2
    assert f"demo: {state} holds files the demo did not make" in result.output
    assert (state / "driftloop.db").read_text() == "the production database"

    assert state_problem(tmp_path / "new") is None
    (tmp_path / "empty").mkdir()
    assert state_problem(tmp_path / "empty") is None
    (state / STATE_MARKER).touch()  # a directory an earlier demo made is the demo's to wipe
    assert state_problem(state) is None


def test_a_variable_that_nearly_spells_a_setting_is_named_not_silently_ignored(
    env, tmp_path: Path, monkeypatch
) -> None:
    """DRIFTLOOP_MIN_LABELED_ROWS (the US spelling) was read by nobody, unnoticed: the setting stayed at its
    default. A YAML key is refused; a variable is warned of, since other DRIFTLOOP_* variables are legitimate
    (Kubernetes' service links for the driftloop-api Service), and only near misses are named."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DRIFTLOOP_MIN_LABELED_ROWS", "50")
    monkeypatch.setenv("DRIFTLOOP_API_SERVICE_HOST", "10.0.0.1")
    (tmp_path / ".env").write_text("DRIFTLOOP_MONITOR_INTERVAL=60\n")
    result = run("models")
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    near_misses = (("MIN_LABELED_ROWS", "MIN_LABELLED_ROWS"), ("MONITOR_INTERVAL", "MONITOR_INTERVAL_S"))
    for wrong, right in near_misses:
        assert (
            f"warning: DRIFTLOOP_{wrong} is not a driftloop setting and is ignored: did you mean "
            f"DRIFTLOOP_{right}?"
        ) in output
    assert "API_SERVICE_HOST" not in output


def test_generate_prints_the_path_it_wrote_as_given(env, tmp_path: Path) -> None:
    """The path is the user's text: '[/]' in it ended a written file's command in a rich MarkupError
    traceback (exit 1), and '[b]jan[/b].csv' was reported as 'jan.csv'."""
    for name in ("[b]jan[/b].csv", "[/]feb.csv"):
        out = tmp_path / name
        result = run("generate", str(out), "--rows", "5")
        assert result.exit_code == 0, result.output
        assert result.output == f"wrote 5 rows to {out}\n"
        assert out.is_file()


def test_bootstrap_names_a_csv_it_did_not_read_as_given(env, tmp_path: Path) -> None:
    """The path is the user's text: '[/]' in it ended the command, v1 being the champion already, in a rich
    MarkupError traceback (exit 1) instead of saying the file was not read."""
    assert run("bootstrap").exit_code == 0
    csv = tmp_path / "[/]" / "[b]cars[/b].csv"
    csv.parent.mkdir(parents=True)
    generate_transactions(50).to_csv(csv, index=False)
    result = run("bootstrap", "--csv", str(csv))
    assert result.exit_code == 0, result.output
    said = "".join(result.output.splitlines())
    assert f"{csv} was not read: bootstrap only trains the first model" in said
    assert f"`driftloop ingest {csv}`, then `driftloop retrain`." in said


def test_ingest_names_the_spec_s_columns_as_written(env, tmp_path: Path, monkeypatch) -> None:
    """A spec's names are the user's text: a target 'price[krw]' was said as 'price ' (rich took '[krw]' for
    a style), and a time column 'sold[/]' ended the ingest, its rows loaded, in a MarkupError traceback."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "dataset: x\ntarget: price[krw]\ntime_column: sold[/]\nfeatures: [{name: a, type: numeric}]\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("DRIFTLOOP_SPEC_PATH", str(spec))
    assert run("migrate").exit_code == 0
    rows = [f"2024-01-{d:02d},{d},{d * 10}" for d in range(1, 6)]
    jan = tmp_path / "jan.csv"
    jan.write_text("sold[/],a,price[krw]\n" + "\n".join([*rows, "2024-01-09,x,90"]) + "\n", encoding="utf-8")
    result = run("ingest", str(jan), "--skip-bad")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "known by their sold[/], features and price[krw], and are not loaded a second time" in said
    feb = tmp_path / "feb.csv"
    feb.write_text("sold[/],a,price[krw]\n" + "\n".join([*rows, "2024-02-01,7,70"]) + "\n", encoding="utf-8")
    result = run("ingest", str(feb))
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "5 row(s) an earlier file loaded (the same sold[/], features and price[krw]) were not" in said
