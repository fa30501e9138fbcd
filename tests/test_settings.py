"""Settings as an operator writes them: empty variables, and bad values named by their variable."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.settings import SettingsError, load_settings
from service.cli import cli


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No DRIFTLOOP_* of the caller's, and no .env: the working directory is empty."""
    import os

    for key in [k for k in os.environ if k.startswith("DRIFTLOOP_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")


def test_an_empty_optional_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SPEC_PATH", "TRAIN_WINDOW_DAYS", "WEBHOOK_URL", "SCHEDULED_RETRAIN_S", "ADMIN_TOKEN"):
        monkeypatch.setenv(f"DRIFTLOOP_{name}", "")
    settings = load_settings()
    assert settings.spec_path is None  # the shipped spec, not Path("."), a directory
    assert settings.train_window_days is None
    assert settings.webhook_url is None  # no webhook, not POSTs to ""
    assert settings.scheduled_retrain_s is None
    assert settings.admin_token is None


def test_an_empty_required_variable_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_ARTIFACT_DIR", "")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == "DRIFTLOOP_ARTIFACT_DIR is empty: give a value, or unset it for the default"


def test_bad_values_are_named_by_their_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_MONITOR_INTERVAL_S", "5m")
    monkeypatch.setenv("DRIFTLOOP_TRAIN_THREAD_COUNT", "0")  # CatBoost's 0 kills the process (SIGFPE)
    monkeypatch.setenv("DRIFTLOOP_DRIFT_STATTEST_THRESHOLD", "-0.05")  # would flag every column, or none
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).splitlines() == [
        "DRIFTLOOP_MONITOR_INTERVAL_S='5m': Input should be a valid integer, unable to parse string as an "
        "integer",
        "DRIFTLOOP_DRIFT_STATTEST_THRESHOLD='-0.05': Input should be greater than 0",
        "DRIFTLOOP_TRAIN_THREAD_COUNT='0': must be -1 (all cores) or a thread count of at least 1",
    ]


def test_a_directory_the_file_system_cannot_hold_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name longer than the file system allows (255 bytes on Linux) made every command a traceback."""
    monkeypatch.setenv("DRIFTLOOP_ARTIFACT_DIR", "x" * 300)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert (
        str(caught.value)
        == f"DRIFTLOOP_ARTIFACT_DIR='{'x' * 300}': cannot be a directory: File name too long"
    )
    result = CliRunner().invoke(cli, ["migrate"])
    assert result.exit_code == 2 and "bad setting: DRIFTLOOP_ARTIFACT_DIR=" in " ".join(result.output.split())


def test_a_directory_that_is_a_file_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The spool's was taken, and failed only when the database was down: the answers it should keep were
    dropped."""
    (tmp_path / "history.csv").write_text("a,b\n")
    monkeypatch.setenv("DRIFTLOOP_SPOOL_DIR", "history.csv")
    monkeypatch.setenv("DRIFTLOOP_REPORT_DIR", "history.csv/reports")
    monkeypatch.setenv("DRIFTLOOP_EVIDENTLY_WORKSPACE", "history.csv")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).splitlines() == [
        "DRIFTLOOP_SPOOL_DIR='history.csv': history.csv is a file, not a directory",
        "DRIFTLOOP_REPORT_DIR='history.csv/reports': history.csv is a file, not a directory",
        "DRIFTLOOP_EVIDENTLY_WORKSPACE='history.csv': history.csv is a file, not a directory",
    ]
    result = CliRunner().invoke(cli, ["serve"])
    assert result.exit_code == 2 and "DRIFTLOOP_SPOOL_DIR='history.csv'" in result.output
    monkeypatch.setenv("DRIFTLOOP_SPOOL_DIR", "not/yet/made")  # made when first needed, as before
    monkeypatch.delenv("DRIFTLOOP_REPORT_DIR")
    monkeypatch.setenv("DRIFTLOOP_EVIDENTLY_WORKSPACE", "")  # empty: none, as for the other optional paths
    assert (load_settings().spool_dir, load_settings().evidently_workspace) == (Path("not/yet/made"), None)


@pytest.mark.parametrize(
    ("minimum", "window", "rule"),
    [
        ("MIN_WINDOW_ROWS", "WINDOW_ROWS", "the monitor would never reach a verdict"),
        ("MIN_LABELLED_ROWS", "ACCURACY_WINDOW_ROWS", "the accuracy rule would never fire"),
    ],
)
def test_a_minimum_above_the_window_it_counts_in_is_refused(
    monkeypatch: pytest.MonkeyPatch, minimum: str, window: str, rule: str
) -> None:
    """Unmet for ever, it would turn its rule off without a word: MAE far over the champion's, verdict ok."""
    monkeypatch.setenv(f"DRIFTLOOP_{minimum}", "400")
    monkeypatch.setenv(f"DRIFTLOOP_{window}", "300")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == (
        f"DRIFTLOOP_{minimum}=400 is above DRIFTLOOP_{window}=300: the window never holds that many rows, "
        f"so {rule}; lower the one or raise the other"
    )
    monkeypatch.setenv(f"DRIFTLOOP_{window}", "400")
    load_settings()  # equal is fine


def refusal(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> str:
    """What load_settings says of `value` in `variable` (it must refuse it)."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    return str(caught.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgres://driftloop:hunter2@db/driftloop", "unknown database kind 'postgres'"),
        ("mysql://driftloop:hunter2@db/driftloop", "the driver of 'mysql' is not installed"),
        ("hunter2", "not a database URL"),
    ],
)
def test_a_bad_database_url_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, url: str, problem: str
) -> None:
    assert refusal(monkeypatch, "DRIFTLOOP_DATABASE_URL", url) == (
        f"DRIFTLOOP_DATABASE_URL: {problem} "
        "(e.g. sqlite:///./var/driftloop.db or postgresql+psycopg://USER:PASSWORD@HOST/DB)"
    )


NOT_A_URL = "not a URL: a bad port, a control character or an unclosed '['"
NOT_HTTP = "must be an http:// or https:// URL with a host"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://[::1/hook?key=SECRET", NOT_A_URL),
        ("http://hooks.example/x?key=SECRET\r\nX-Injected: 1", NOT_A_URL),
        ("ftp://hooks.example/x?key=SECRET", NOT_HTTP),
        ("hooks.example/x?key=SECRET", NOT_HTTP),
        ("http:///x?key=SECRET", NOT_HTTP),
        ("https://hooks.example:99999/x?key=SECRET", "its port is not 1-65535"),  # sent to 34463 otherwise
        ("https://hooks.example:0/x?key=SECRET", "its port is not 1-65535"),
    ],
)
def test_a_webhook_url_that_cannot_be_posted_to_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, url: str, problem: str
) -> None:
    assert refusal(monkeypatch, "DRIFTLOOP_WEBHOOK_URL", url) == (
        f"DRIFTLOOP_WEBHOOK_URL: {problem} (e.g. https://hooks.slack.com/services/…)"
    )
    monkeypatch.setenv("DRIFTLOOP_WEBHOOK_URL", " https://hooks.example:8443/x?key=SECRET\n")
    assert load_settings().webhook_url == "https://hooks.example:8443/x?key=SECRET"


@pytest.mark.parametrize("variable", ["DRIFTLOOP_ADMIN_TOKEN", "DRIFTLOOP_FEEDBACK_TOKEN"])
def test_a_token_no_http_header_can_carry_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """A token with a letter beyond ASCII was taken, and then refused every request (401): a header's bytes
    are read as latin-1, the token compared as UTF-8."""
    for token in ("Pässwort-SECRET", "비밀-SECRET", "tab\there-SECRET"):
        assert refusal(monkeypatch, variable, token) == (
            f"{variable}: must be printable ASCII: an HTTP header carries no other character as written, so "
            "no request could match it"
        )
    monkeypatch.setenv(variable, " s3cr3t!~ with spaces\n")
    assert load_settings().model_dump()[variable.removeprefix("DRIFTLOOP_").lower()].get_secret_value() == (
        "s3cr3t!~ with spaces"
    )


def test_a_bad_value_in_the_config_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "driftloop.yaml"
    config.write_text("gate_margin: 2\n", encoding="utf-8")
    monkeypatch.setenv("DRIFTLOOP_CONFIG", str(config))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == (
        "DRIFTLOOP_GATE_MARGIN (from .env or gate_margin in DRIFTLOOP_CONFIG)=2: Input should be less than 1"
    )
    monkeypatch.setenv("DRIFTLOOP_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match=r"^DRIFTLOOP_CONFIG=.*missing\.yaml: cannot be read as YAML: "):
        load_settings()


def test_a_config_file_that_is_not_yaml_is_refused_without_echoing_its_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PyYAML's message quotes the line at fault: a colon too many after the admin token, or an unclosed
    quote around the database URL, printed the token or the password to stderr (a container's log). The
    problem and its line and column are said, as for every other secret setting, not its text."""
    config = tmp_path / "driftloop.yaml"
    monkeypatch.setenv("DRIFTLOOP_CONFIG", str(config))
    config.write_text("window_rows: 900\nadmin_token: s3cr3t: oops\n", encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == (
        f"DRIFTLOOP_CONFIG={config}: cannot be read as YAML: mapping values are not allowed here "
        "(line 2, column 20)"
    )
    config.write_text('database_url: "postgresql+psycopg://u:pa55w0rd@db/x\nx: 1\n', encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "pa55w0rd" not in str(caught.value)
    assert str(caught.value) == (
        f"DRIFTLOOP_CONFIG={config}: cannot be read as YAML: while scanning a quoted scalar (line 1, "
        "column 15): found unexpected end of stream (line 3, column 1)"
    )


def test_the_cli_exits_2_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_WINDOW_ROWS", "-5")
    result = CliRunner().invoke(cli, ["models"], catch_exceptions=False)
    assert result.exit_code == 2
    assert (
        result.output
        == "bad setting: DRIFTLOOP_WINDOW_ROWS='-5': Input should be greater than or equal to 1\n"
    )


def test_a_misspelt_key_in_the_config_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "driftloop.yaml"
    config.write_text(
        "monitor_intervl_s: 60\nDRIFTLOOP_GATE_MARGIN: 0.05\nwindow_rows: 900\n", encoding="utf-8"
    )
    monkeypatch.setenv("DRIFTLOOP_CONFIG", str(config))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value) == (
        f"DRIFTLOOP_CONFIG={config}: unknown setting(s) "
        "'driftloop_gate_margin' (did you mean 'gate_margin'?), "
        "'monitor_intervl_s' (did you mean 'monitor_interval_s'?)"
    )
    config.write_text("Monitor_Interval_S: 60\n", encoding="utf-8")
    assert load_settings().monitor_interval_s == 60
