"""Child-process entry: `python -m retrain.child RUN_ID` does one run started by retrain.process.launch.

Settings come from the parent as JSON in DRIFTLOOP_RETRAIN_SETTINGS, so the child sees exactly the
parent's configuration (not whatever .env or DRIFTLOOP_CONFIG its working directory happens to hold).
Exit code 0 when the run's row was finished (promoted, rejected or failed; by this process or, found by its
heartbeat, another), 1 when it could not be, 2 on bad usage; the parent marks an unfinished run failed from
the exit code.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from core.db import make_engine, make_sessions, utcnow
from core.registry import ArtifactStore, Registry
from core.settings import Settings
from core.spec import FeatureSpec, SpecError, load_spec
from retrain import RETRAIN_LOGGER
from retrain.process import SETTINGS_ENV, SPEC_SHA256_ENV
from retrain.runner import execute_run
from retrain.runs import Heartbeat, fail_run

log = logging.getLogger(RETRAIN_LOGGER)


def settings_from_env(environ: Mapping[str, str]) -> Settings:
    raw = environ.get(SETTINGS_ENV)
    if raw is None:
        raise RuntimeError(f"{SETTINGS_ENV} is not set; start runs with retrain.process.launch")
    return Settings(_env_file=None, **json.loads(raw))  # type: ignore[call-arg]


def check_spec_unchanged(spec: FeatureSpec, expected: str, settings: Settings) -> None:
    """Raise SpecError when the spec file is no longer the one the launching process read: the service
    would go on validating and serving by the old one while this run trained and gated by the new."""
    if expected and spec.sha256 != expected:
        raise SpecError(
            f"the spec file {settings.spec_path or 'apartments.yaml'} changed since the process that "
            f"launched this run read it (sha256 {expected[:12]}…, now {spec.sha256[:12]}…): restart the "
            "service and the worker so that serving, monitoring and retraining all use one spec"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m retrain.child RUN_ID", file=sys.stderr)
        return 2
    run_id = int(args[0])
    settings = settings_from_env(os.environ)
    engine = make_engine(settings.database_url)
    try:
        registry = Registry(make_sessions(engine), ArtifactStore(settings.artifact_dir))
        try:
            spec = load_spec(settings.spec_path)
            check_spec_unchanged(spec, os.environ.get(SPEC_SHA256_ENV, ""), settings)
        except Exception as exc:
            fail_run(registry.sessions, run_id, error=f"{type(exc).__name__}: {exc}", now=utcnow())
            return 0
        with Heartbeat(
            registry.sessions, run_id, interval_s=settings.lease_ttl_s / 3, on_lost=lambda: _stop(run_id)
        ):
            execute_run(run_id, settings=settings, spec=spec, registry=registry)
        return 0
    finally:
        engine.dispose()


def _stop(run_id: int) -> None:
    """Another process ended this run (the leader, past any timeout, once its launcher was gone): nothing this
    process does can be recorded now, and training holds the main thread in CatBoost, so exit from here."""
    log.warning(
        "retrain run %s was ended by another process; stopping its child process %s", run_id, os.getpid()
    )
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
