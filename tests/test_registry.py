import json
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError

from core.registry import (
    ArtifactIntegrityError,
    ChampionChanged,
    FeatureMismatchError,
    NewVersion,
    ReasonRequired,
    Registry,
    RegistryError,
    UnknownVersion,
    sha256_file,
)
from core.schema import ModelStatus, ModelVersion, Trigger
from core.spec import FeatureSpec, load_spec
from retrain.bootstrap import bootstrap
from retrain.train import predict, reference_snapshot
from tests.conftest import TINY


def _candidate(registry: Registry, champion: ModelVersion, spec: FeatureSpec, **kw) -> ModelVersion:
    model = registry.load(champion)
    ref = registry.reference(champion)
    return registry.register(
        NewVersion(
            model=model,
            reference=reference_snapshot(model, ref, spec),
            trigger=kw.pop("trigger", Trigger.manual),
            metrics={"val_mae": 1.0},
            params={},
            train_rows=len(ref),
            parent_version=champion.version,
            **kw,
        )
    )


def test_bootstrap_registers_and_promotes_v1_once(registry: Registry, champion: ModelVersion, spec) -> None:
    assert champion.version == 1
    assert champion.status == ModelStatus.champion
    assert champion.trigger == Trigger.bootstrap
    assert champion.train_rows == 2400  # 80 % of 3,000, the most recent 20 % held out
    assert set(champion.metrics) == {"val_mae", "val_rmse", "val_mape", "val_rows"}
    assert champion.metrics["val_rows"] == 600
    assert sum(champion.feature_importance.values()) == pytest.approx(1.0)
    again = bootstrap(registry=registry, spec=spec, params=TINY, rows=3000, seed=1)
    assert (again.created, again.version.version) == (False, 1)
    assert [r.version for r in registry.list()] == [1]


def test_promote_first_refuses_when_a_champion_exists(registry: Registry, champion, spec) -> None:
    v2 = _candidate(registry, champion, spec)
    with pytest.raises(ChampionChanged, match="it was to be the first champion, but v1 is the champion now"):
        registry.promote(version=v2.version, first=True)
    assert registry.champion().version == 1


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_bootstraps_at_once_promote_one_first_model(registry: Registry, spec) -> None:
    """Two workers started together on an empty database, each running `driftloop bootstrap` first: both
    find no champion and train. The second to promote used to archive the first's v1 and say it had
    "trained and promoted v2"; and both could pick the same version number. One champion, one creator."""
    start = threading.Barrier(2)
    results: list[Any] = []

    def run() -> None:
        start.wait()
        try:
            results.append(bootstrap(registry=registry, spec=spec, params=TINY, rows=3000, seed=1))
        except Exception as exc:  # reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not [r for r in results if isinstance(r, Exception)], results
    champion = registry.champion()
    assert sorted(r.created for r in results) == [False, True]
    assert [r.version.version for r in results] == [champion.version, champion.version]
    statuses = {row.version: row.status for row in registry.list()}
    lost = next(r for r in results if not r.created)  # says which version of its own it left rejected
    assert lost.rejected != champion.version and statuses[lost.rejected] == ModelStatus.rejected
    assert ModelStatus.archived not in statuses.values(), statuses  # the first champion was never replaced
    assert list(statuses.values()).count(ModelStatus.champion) == 1


def test_loaded_champion_predicts_like_the_trained_model(
    registry: Registry, champion: ModelVersion, spec
) -> None:
    reference = registry.reference(champion)
    # Bootstrapped on data with a time column: each row keeps its event time (a windowed retrain reads it).
    assert list(reference.columns) == [*spec.feature_names, spec.target, "prediction", "event_time", "source"]
    again = predict(registry.load(champion), reference, spec)
    assert again.tolist() == pytest.approx(reference["prediction"].tolist())


def test_promote_archives_the_old_champion_and_rollback_restores_it(registry, champion, spec) -> None:
    v2 = _candidate(registry, champion, spec)
    assert (v2.version, v2.status, v2.parent_version) == (2, ModelStatus.candidate, 1)
    registry.promote(version=2, reason="better")
    assert registry.champion().version == 2
    assert registry.get(1).status == ModelStatus.archived
    restored = registry.rollback(reason="v2 misbehaves")
    assert restored.version == 1
    assert registry.champion().version == 1
    assert registry.get(2).status == ModelStatus.archived
    with pytest.raises(RegistryError) as refused:
        registry.rollback()  # v2 was rolled back from: never chosen again by a rollback
    assert str(refused.value) == (
        "no previous champion to roll back to: v2 was rolled back from, which a rollback never returns to; "
        "promote one by number to serve it again"
    )


def test_rollback_restores_the_champion_promoted_most_recently(registry, champion, spec) -> None:
    for _ in range(2):
        registry.promote(version=_candidate(registry, champion, spec).version, reason="better")
    assert registry.champion().version == 3
    assert registry.rollback(reason="v3 misbehaves").version == 2  # not v1, promoted before it
    assert registry.rollback(reason="v2 misbehaves").version == 1


def test_a_registration_skips_the_artifacts_a_crashed_one_left(registry, champion, spec) -> None:
    (registry.store.root / "v2").mkdir()  # saved, never committed: its files may be half written
    assert _candidate(registry, champion, spec).version == 3


def test_a_version_rejected_twice_is_refused_naming_its_latest_rejection(registry, champion, spec) -> None:
    v2 = _candidate(registry, champion, spec)
    registry.reject(version=v2.version, reason="worse than champion")
    registry.reject(version=v2.version, reason="spread too narrow")
    with pytest.raises(ReasonRequired, match=r"rejected by the gate \(spread too narrow\)"):
        registry.promote(version=v2.version)


def test_database_refuses_two_champions(registry: Registry, champion, spec) -> None:
    _candidate(registry, champion, spec)
    with pytest.raises(IntegrityError), registry.sessions.begin() as session:
        session.execute(update(ModelVersion).where(ModelVersion.version == 2).values(status="champion"))
    assert registry.champion().version == 1


def test_promoting_unknown_or_rejected_versions_is_refused(registry, champion, spec) -> None:
    with pytest.raises(UnknownVersion, match="model version 9 does not exist"):
        registry.promote(version=9)
    v2 = _candidate(registry, champion, spec)
    registry.reject(version=v2.version, reason="worse than champion")
    refusal = (
        "model version 2 was rejected by the gate (worse than champion); "
        "a reason is needed to promote it anyway"
    )
    for reason in ("", "  "):
        with pytest.raises(ReasonRequired) as refused:
            registry.promote(version=v2.version, reason=reason, default_reason="a default is not a reason")
        assert str(refused.value) == refusal
    assert registry.champion().version == 1
    forced = registry.promote(version=v2.version, reason="the gate's holdout was a holiday week")
    assert (forced.status, forced.note) == (
        ModelStatus.champion,
        "rejected: worse than champion\npromoted: the gate's holdout was a holiday week",
    )


def test_a_promotion_without_a_reason_records_the_default(registry, champion, spec) -> None:
    v2 = _candidate(registry, champion, spec)
    promoted = registry.promote(version=v2.version, default_reason="manual promote via API")
    assert (promoted.status, promoted.note) == (ModelStatus.champion, "promoted: manual promote via API")


def test_tampered_artifact_is_refused(registry: Registry, champion: ModelVersion) -> None:
    with open(champion.artifact_path, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(ArtifactIntegrityError, match="does not match"):
        registry.load(champion)


def _respec(tmp_path: Path, edit) -> FeatureSpec:  # type: ignore[no-untyped-def]
    """The shipped apartment spec with `edit` applied to its feature list, loaded from a file."""
    raw = yaml.safe_load(
        resources.files("core.specs").joinpath("apartments.yaml").read_text(encoding="utf-8")
    )
    raw["features"] = edit(raw["features"])
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_spec(path)


def test_a_model_is_refused_for_a_spec_it_was_not_trained_on(
    registry: Registry, champion: ModelVersion, spec: FeatureSpec, tmp_path: Path
) -> None:
    """Served by position, a reordered spec would feed humidity as temperature: refused, saying why."""
    assert registry.load(champion, spec=spec) is not None
    swapped = _respec(tmp_path, lambda fs: [fs[1], fs[0], *fs[2:]])
    with pytest.raises(
        FeatureMismatchError, match="same features in another order: trained on district, area_m2"
    ):
        registry.load(champion, spec=swapped)
    grown = _respec(
        tmp_path, lambda fs: [*fs, {"name": "view", "type": "categorical", "categories": ["river"]}]
    )
    with pytest.raises(FeatureMismatchError, match="the spec lists view, which it was not trained on"):
        registry.load(champion, spec=grown)
    shrunk = _respec(tmp_path, lambda fs: fs[:-1])
    with pytest.raises(
        FeatureMismatchError, match=f"it was trained on {spec.feature_names[-1]}, which the spec"
    ):
        registry.load(champion, spec=shrunk)

    # same names and order, another type: CatBoost would fail on every request, or read codes as numbers
    def retype(fs):  # type: ignore[no-untyped-def]
        district, floor = dict(fs[0]), dict(fs[2])
        del district["categories"]
        district["type"], floor["type"] = "numeric", "categorical"
        floor["categories"] = [str(n) for n in range(-3, 81)]
        del floor["min"], floor["max"]
        return [district, fs[1], floor, *fs[3:]]

    with pytest.raises(FeatureMismatchError) as refused:
        registry.load(champion, spec=_respec(tmp_path, retype))
    assert (
        "(district is categorical in the model and numeric in the spec; "
        "floor is numeric in the model and categorical in the spec)"
    ) in str(refused.value)
    # bootstrap is idempotent only for the spec the champion fits
    with pytest.raises(FeatureMismatchError, match="start a new model line for this spec"):
        bootstrap(registry=registry, spec=swapped, params=TINY, rows=500)


def test_a_missing_or_altered_model_file_is_not_promoted(registry, champion, spec) -> None:
    v2 = _candidate(registry, champion, spec)
    path = Path(v2.artifact_path)
    path.write_bytes(b"half a model")  # damaged on the shared volume
    altered = sha256_file(path)
    with pytest.raises(ArtifactIntegrityError) as refused:
        registry.promote(version=2, reason="better")
    assert str(refused.value) == (
        f"model version 2 not promoted: {path}: sha256 {altered} does not match the registry's {v2.sha256}"
    )
    path.unlink()
    with pytest.raises(ArtifactIntegrityError) as refused:
        registry.promote(version=2, reason="better")
    assert str(refused.value) == f"model version 2 not promoted: {path}: the model file is missing"
    assert (registry.champion().version, registry.get(2).status, registry.get(2).note) == (
        1,
        ModelStatus.candidate,
        "",
    )


def test_a_damaged_reference_snapshot_is_refused_by_name(registry, champion, spec) -> None:
    v2 = _candidate(registry, champion, spec)
    path = Path(v2.reference_path)
    assert v2.reference_sha256 == sha256_file(path)
    metadata = json.loads((path.parent / "metadata.json").read_text(encoding="utf-8"))
    assert metadata["reference_sha256"] == v2.reference_sha256
    registry.reference(v2)  # intact: read
    frame = pd.read_parquet(path)
    frame.iloc[:10].to_parquet(path, index=False)  # a valid parquet, but not the snapshot v2 was judged by
    altered = sha256_file(path)
    expected = f"{path}: sha256 {altered} does not match the registry's {v2.reference_sha256}"
    with pytest.raises(ArtifactIntegrityError) as refused:
        registry.reference(v2)  # what the monitor, the retrain run and the backtest read it through
    assert str(refused.value) == expected
    with pytest.raises(ArtifactIntegrityError) as refused:
        registry.promote(version=2, reason="better")
    assert str(refused.value) == f"model version 2 not promoted: {expected}"
    path.unlink()
    with pytest.raises(ArtifactIntegrityError, match="the reference snapshot is missing"):
        registry.reference(v2)
    assert (registry.champion().version, registry.get(2).status) == (1, ModelStatus.candidate)


def test_a_version_registered_before_reference_checksums_is_read_unchecked(registry, champion) -> None:
    with registry.sessions.begin() as session:
        session.execute(update(ModelVersion).where(ModelVersion.version == 1).values(reference_sha256=None))
    old = registry.get(1)
    pd.read_parquet(old.reference_path).iloc[:10].to_parquet(old.reference_path, index=False)
    assert len(registry.reference(old)) == 10  # nothing recorded to check it against: read as it is


def test_rollback_to_a_damaged_model_changes_nothing(registry, champion, spec) -> None:
    v2 = _candidate(registry, champion, spec)
    registry.promote(version=v2.version, reason="better")
    path = Path(champion.artifact_path)
    path.write_bytes(b"")
    with pytest.raises(ArtifactIntegrityError) as refused:
        registry.rollback(reason="v2 misbehaves")
    assert str(refused.value) == (
        f"model version 1 not promoted: {path}: sha256 {sha256_file(path)} "
        f"does not match the registry's {champion.sha256}"
    )
    assert (registry.champion().version, registry.get(2).note) == (2, "promoted: better")


def test_two_promotions_at_once_both_succeed_and_the_later_one_is_the_champion(
    registry, champion, spec
) -> None:
    # Both archived v1 and made theirs champion; on PostgreSQL the later commit broke the one-champion
    # index (IntegrityError, a 500 through the API). Now the later one waits and archives the earlier's.
    for _ in range(4):
        versions = [_candidate(registry, champion, spec).version for _ in range(2)]
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def promote(version: int, barrier: threading.Barrier = barrier, errors: list = errors) -> None:
            barrier.wait()
            try:
                registry.promote(version=version, reason="at once")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        statuses = sorted(registry.get(v).status for v in versions)
        assert statuses == [ModelStatus.archived, ModelStatus.champion]
        assert all(registry.get(v).promoted_at is not None for v in versions)


def test_a_promotion_that_replaces_a_version_no_longer_champion_changes_nothing(
    registry, champion, spec
) -> None:
    v2, v3 = (_candidate(registry, champion, spec) for _ in range(2))
    registry.promote(version=v2.version, reason="operator")
    with pytest.raises(
        ChampionChanged,
        match="model version 3 not promoted: it was to replace v1, but the champion is now v2",
    ):
        registry.promote(version=v3.version, reason="retrain run", replaces=1)
    assert (registry.champion().version, registry.get(3).status) == (2, ModelStatus.candidate)
    assert (
        registry.promote(version=v3.version, reason="retrain run", replaces=2).status == ModelStatus.champion
    )
    # What was asked is already so (the second of two rollbacks at once): done, not a conflict.
    assert registry.promote(version=v3.version, replaces=1).status == ModelStatus.champion


def test_a_promotion_waiting_on_another_names_the_champion_that_one_made(
    db_url: str, registry: Registry, champion: ModelVersion, spec: FeatureSpec
) -> None:
    # On PostgreSQL the waiting promotion's `FOR UPDATE` skipped the row the other had archived, found no
    # champion at all and said so ("the champion is now none"), though v2 was.
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer: a second promotion never waits on the first's row lock")
    _, v3 = (_candidate(registry, champion, spec) for _ in range(2))
    errors: list[BaseException] = []

    def promote_v3() -> None:
        try:
            registry.promote(version=v3.version, reason="retrain run", replaces=1)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=promote_v3)
    with registry.sessions.begin() as first:  # another promotion of v2, holding the champion's row
        first.execute(
            select(ModelVersion).where(ModelVersion.status == ModelStatus.champion).with_for_update()
        )
        first.execute(
            update(ModelVersion).where(ModelVersion.version == 1).values(status=ModelStatus.archived)
        )
        first.flush()
        first.execute(
            update(ModelVersion).where(ModelVersion.version == 2).values(status=ModelStatus.champion)
        )
        thread.start()
        for _ in range(600):  # until v3's promotion waits on the lock
            with registry.sessions() as probe:
                if probe.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")):
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the second promotion never waited on the first")
    thread.join(timeout=60)
    assert [str(e) for e in errors] == [
        "model version 3 not promoted: it was to replace v1, but the champion is now v2"
    ]
    assert [type(e) for e in errors] == [ChampionChanged]
    assert (registry.champion().version, registry.get(3).status) == (2, ModelStatus.candidate)
