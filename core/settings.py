"""Settings: environment (DRIFTLOOP_*) over an optional YAML file over defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from core.files import file_in_the_way
from core.metrics import parse_buckets


class Settings(BaseSettings):
    # An empty variable (`DRIFTLOOP_SPEC_PATH=`, a blank compose or Secret value) is unset for an optional
    # setting, as the README's "empty = …" says, and refused for a required one, not read as "" or Path(".").
    model_config = SettingsConfigDict(
        env_prefix="DRIFTLOOP_", env_file=".env", extra="ignore", env_parse_none_str=""
    )

    # --- state -------------------------------------------------------------------------
    database_url: str = "sqlite:///./var/driftloop.db"
    artifact_dir: Path = Path("./var/artifacts")
    spool_dir: Path = Path("./var/spool")
    report_dir: Path = Path("./var/reports")
    spec_path: Path | None = None  # None: the shipped apartment spec
    admin_token: SecretStr | None = None
    # When set, POST /feedback needs it (or the admin token) as a bearer token; None: labels are open.
    feedback_token: SecretStr | None = None
    auto_migrate: bool = True  # serve/worker/bootstrap upgrade the schema; off when a migrate job does it

    # --- serving -----------------------------------------------------------------------
    max_batch_size: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=2_000_000, ge=1024)
    # CatBoost threads per predict call (-1: all cores). One row gains nothing from a pool, whose
    # spinning workers would take a core from the event loop and the log writer.
    predict_threads: int = Field(default=1, ge=-1)
    # Upper bounds of driftloop_prediction_value's buckets, comma-separated; None: from the spec (see
    # core.metrics.prediction_buckets).
    prediction_buckets: str | None = None
    champion_poll_s: float = Field(default=2.0, gt=0)
    log_queue_size: int = Field(default=100_000, ge=100)
    log_batch_size: int = Field(default=500, ge=1)
    log_flush_interval_s: float = Field(default=0.2, gt=0)
    spool_replay_interval_s: float = Field(default=2.0, gt=0)

    # --- monitor -----------------------------------------------------------------------
    scheduler: bool = True  # run the monitor scheduler in this process (embedded mode)
    lease_ttl_s: float = Field(default=30.0, gt=0)  # the scheduler lease; renewed every third of it
    monitor_interval_s: int = Field(default=300, ge=1)
    window_rows: int = Field(default=5000, ge=1)
    window_seconds: int | None = Field(default=None, ge=1)
    min_window_rows: int = Field(default=500, ge=1)
    accuracy_window_rows: int = Field(default=500, ge=1)  # the newest labelled rows unseen by the champion
    evidently_max_rows: int = Field(default=50_000, ge=100)
    drift_stattest_threshold: float | None = Field(default=None, gt=0, le=1)
    sample_seed: int = 0
    # Evidently pages kept on disk (the newest; each run prunes the rest, whose report rows stay); 0: none
    # are written. 288 is one day at the default interval.
    report_html_keep: int = Field(default=288, ge=0)
    # A local Evidently workspace each judged run's snapshots go to, for `evidently ui --workspace DIR`;
    # None: none. It keeps the newest `evidently_workspace_keep` snapshots (two a run with labels: drift
    # and accuracy; 576 is a day at the default interval: Evidently's UI holds every one in memory).
    evidently_workspace: Path | None = None
    evidently_workspace_keep: int = Field(default=576, ge=1)

    # --- policy ------------------------------------------------------------------------
    drift_share_threshold: float = Field(default=0.5, gt=0, le=1)
    weighted_drift_threshold: float = Field(default=0.3, gt=0, le=1)
    mae_degradation_ratio: float = Field(default=1.25, gt=1)
    min_labelled_rows: int = Field(default=200, ge=1)
    consecutive_breaches: int = Field(default=2, ge=1)
    retrain_cooldown_s: int = Field(default=3600, ge=0)
    max_retrains_per_day: int = Field(default=4, ge=0)
    auto_retrain: bool = True
    # Also hold the champion to the best validation MAE of its line of models (see monitor/policy.py).
    lineage_baseline: bool = True

    # --- notifications -----------------------------------------------------------------
    webhook_url: str | None = None
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    webhook_max_attempts: int = Field(default=5, ge=1)
    webhook_backoff_s: float = Field(default=1.0, ge=0)

    # --- retraining --------------------------------------------------------------------
    train_iterations: int = Field(default=300, ge=1)
    train_depth: int = Field(default=6, ge=1, le=16)
    train_learning_rate: float = Field(default=0.1, gt=0)
    train_task_type: Literal["CPU", "GPU"] = "CPU"
    train_thread_count: int = Field(default=1, ge=-1)
    train_window_days: int | None = Field(default=None, ge=1)
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    # Share of the training weight carried by new labelled rows (production + ingested) when the champion's
    # reference outnumbers them; 0 trains on the plain union. Lets a candidate learn a changed market.
    new_data_weight_share: float = Field(default=0.7, ge=0, lt=1)
    # A training row's weight halves for every this many days it is older than the newest; None: no decay.
    train_half_life_days: float | None = Field(default=None, gt=0)
    gate_margin: float = Field(default=0.02, ge=0, lt=1)
    # After the gate passes, train once more on every row, holdout included, and promote that model.
    refit: bool = True
    retrain_timeout_s: int = Field(default=1800, ge=1)
    # A retrain run (trigger "schedule") this often, whatever the monitor says; None: drift/accuracy only.
    scheduled_retrain_s: int | None = Field(default=None, ge=1)

    @field_validator("admin_token", "feedback_token", mode="before")
    @classmethod
    def _token(cls, value: Any) -> Any:
        """An empty token (`DRIFTLOOP_ADMIN_TOKEN=` from an unset compose variable) is no token: admin
        endpoints stay disabled (403, saying how to enable them) rather than refusing every token (401),
        and /feedback stays open. Whitespace around one (a Secret file's newline) is dropped: no
        Authorization header can carry it. Nor can it carry a letter beyond ASCII as written (servers read
        header bytes as latin-1), so a token holding one would refuse every request: it is refused here."""
        if not isinstance(value, str):
            return value
        token = value.strip()
        if any(not " " <= c <= "~" for c in token):
            raise ValueError(
                "must be printable ASCII: an HTTP header carries no other character as written, so no "
                "request could match it"
            )
        return token or None

    @field_validator("prediction_buckets")
    @classmethod
    def _buckets(cls, value: str | None) -> str | None:
        if value is not None and value.strip():
            parse_buckets(value)  # raises, naming the problem
            return value
        return None

    @field_validator("artifact_dir", "spool_dir", "report_dir", "evidently_workspace")
    @classmethod
    def _directory(cls, value: Path | None) -> Path | None:
        """A directory that is a file, or lies under one, is refused here by name: the spool's would
        otherwise fail only in a database outage, dropping the answers it was there to keep."""
        if value is None:
            return None
        try:
            blocked = file_in_the_way(value)
        except OSError as exc:  # a name too long for the file system, say: named, not a traceback
            raise ValueError(f"cannot be a directory: {exc.strerror or exc}") from None
        if blocked is not None:
            raise ValueError(f"{blocked} is a file, not a directory")
        return value

    @field_validator("predict_threads", "train_thread_count")
    @classmethod
    def _threads(cls, value: int) -> int:
        if value == 0:  # CatBoost's thread_count=0 kills the process with SIGFPE
            raise ValueError("must be -1 (all cores) or a thread count of at least 1")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        """A URL SQLAlchemy cannot parse, or a dialect it does not know, is refused here by name rather
        than as a traceback from the first connection."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        example = "e.g. sqlite:///./var/driftloop.db or postgresql+psycopg://USER:PASSWORD@HOST/DB"
        try:
            url = make_url(value)  # its message would echo the password: not passed on
        except ArgumentError:
            raise ValueError(f"not a database URL ({example})") from None
        try:
            dialect = url.get_dialect()
        except NoSuchModuleError:
            raise ValueError(f"unknown database kind {url.drivername!r} ({example})") from None
        try:
            dialect.import_dbapi()
        except ImportError:  # mysql://, postgresql+psycopg2://: drivers driftloop does not install
            raise ValueError(f"the driver of {url.drivername!r} is not installed ({example})") from None
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        """A URL httpx cannot POST to is refused here, by name and not echoed (it may hold a key), rather
        than at the first notification: httpx's InvalidURL escaped every delivery run, and the row ended
        failed as if its worker had died."""
        if value is None:
            return None
        import httpx

        value = value.strip()  # a Secret file's newline is no part of it, as for the tokens
        example = "e.g. https://hooks.slack.com/services/…"
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL:  # its message can quote the URL: not passed on
            raise ValueError(
                f"not a URL: a bad port, a control character or an unclosed '[' ({example})"
            ) from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"must be an http:// or https:// URL with a host ({example})")
        if url.port is not None and not 1 <= url.port <= 65535:  # httpx would post to it mod 65536
            raise ValueError(f"its port is not 1-65535 ({example})")
        return value

    @model_validator(mode="after")
    def _reachable_minimums(self) -> Settings:
        """A minimum above the window it is counted in is never met, and would turn its rule off unnoticed:
        every monitor run "insufficient", or an "ok" verdict whatever the accuracy window's MAE."""
        for minimum, window, rule in (
            ("min_window_rows", "window_rows", "the monitor would never reach a verdict"),
            ("min_labelled_rows", "accuracy_window_rows", "the accuracy rule would never fire"),
        ):
            low, high = getattr(self, minimum), getattr(self, window)
            if low > high:
                raise ValueError(
                    f"DRIFTLOOP_{minimum.upper()}={low} is above DRIFTLOOP_{window.upper()}={high}: the "
                    f"window never holds that many rows, so {rule}; lower the one or raise the other"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            _YamlSource(settings_cls),
            file_secret_settings,
        )


class SettingsError(ValueError):
    """A setting with a bad value, named as the operator wrote it (DRIFTLOOP_…, or the config file)."""


def load_settings() -> Settings:
    """Settings from the environment, .env and DRIFTLOOP_CONFIG; a bad value is a SettingsError naming
    the variable, rather than pydantic's report on a field name."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError("\n".join(_describe(error) for error in exc.errors())) from None


def _describe(error: Any) -> str:
    if not error["loc"]:  # settings that do not fit together: the message names each variable
        return str(error["msg"]).removeprefix("Value error, ")
    field = str(error["loc"][0])
    name = f"DRIFTLOOP_{field.upper()}"
    where = name if name in os.environ else f"{name} (from .env or {field} in DRIFTLOOP_CONFIG)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["input"] is None:  # an empty value: env_parse_none_str
        return f"{where} is empty: give a value, or unset it for the default"
    if field in _SECRET:  # may hold a password or a webhook's key: not echoed
        return f"{where}: {message}"
    return f"{where}={error['input']!r}: {message}"


_SECRET = frozenset({"database_url", "admin_token", "feedback_token", "webhook_url"})


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the file named by DRIFTLOOP_CONFIG, if any; keys are the field names."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("DRIFTLOOP_CONFIG")
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise SettingsError(
                f"DRIFTLOOP_CONFIG={path}: cannot be read as YAML: {_yaml_problem(exc)}"
            ) from None
        if not isinstance(data, dict):
            raise SettingsError(f"DRIFTLOOP_CONFIG={path}: expected a mapping of setting names to values")
        values = {str(k).lower(): v for k, v in data.items()}
        unknown = sorted(set(values) - set(self.settings_cls.model_fields))
        if unknown:  # a misspelt key would otherwise leave its setting at the default, unnoticed
            raise SettingsError(
                f"DRIFTLOOP_CONFIG={path}: unknown setting(s) " + ", ".join(map(_near, unknown))
            )
        return values


def _yaml_problem(exc: Exception) -> str:
    """What is wrong with a config file, and where, without PyYAML's quote of the line at fault: that line
    may hold the admin token or the database password, and the message goes to stderr (a container's log)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)
    parts = []
    for what, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark)):
        if what:
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            parts.append(f"{what}{where}")
    return ": ".join(parts) or type(exc).__name__


def _near(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key.removeprefix("driftloop_"), Settings.model_fields, n=1)
    return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)


def misspelt_variables(environ: Mapping[str, str | None]) -> list[str]:
    """Warnings for DRIFTLOOP_* names in `environ` (the environment, or .env's keys) that are no setting but
    nearly spell one (DRIFTLOOP_MIN_LABELED_ROWS): read by nobody, they leave the setting at its default.
    Warned, not refused as a YAML key is: other DRIFTLOOP_* variables are legitimate (Kubernetes' service
    links for a Service named driftloop-…, the retrain child's own), and only a near miss is named."""
    import difflib

    warnings = []
    for name in sorted(environ):
        field = name.removeprefix("DRIFTLOOP_").lower()
        if not name.startswith("DRIFTLOOP_") or field in Settings.model_fields:
            continue
        close = difflib.get_close_matches(field, Settings.model_fields, n=1, cutoff=0.85)
        if close:
            hint = f"did you mean DRIFTLOOP_{close[0].upper()}?"
            warnings.append(f"{name} is not a driftloop setting and is ignored: {hint}")
    return warnings


def to_env(settings: Settings) -> dict[str, str]:
    """The DRIFTLOOP_* environment that reproduces `settings` in a child process."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        secret = getattr(settings, name)
        if isinstance(secret, SecretStr):
            value = secret.get_secret_value()
        env[f"DRIFTLOOP_{name.upper()}"] = value if isinstance(value, str) else _json(value)
    return env


def _json(value: Any) -> str:
    import json

    return json.dumps(value) if not isinstance(value, bool) else ("true" if value else "false")
