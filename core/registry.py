"""Model registry (rows in model_version) over an artifact store (a local directory).

Each version directory holds the CatBoost model, its reference snapshot (parquet) and metadata. A version is
written to a temporary directory and renamed into place, so a crash never leaves a half-written version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
from catboost import CatBoostRegressor
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.db import utcnow
from core.schema import ModelStatus, ModelVersion
from core.spec import RESERVED_NAMES, FeatureSpec

MODEL_FILE = "model.cbm"
REFERENCE_FILE = "reference.parquet"


def baseline_mae(version: ModelVersion) -> float | None:
    """The best validation MAE of the version's line of models (itself and the champions it was trained
    from, as recorded when it was trained); a version from before that record, or a bootstrap, has its own."""
    value = version.metrics.get("baseline_mae", version.metrics.get("val_mae"))
    return float(value) if value is not None else None


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked; the message says why."""


class ChampionChanged(RegistryError):
    """The champion a promotion was to replace is no longer the champion."""


class UnknownVersion(RegistryError):
    """No model version has that number."""


class ReasonRequired(RegistryError):
    """Promoting a gate-rejected version needs the operator's reason; the message says why it was rejected."""


class ArtifactIntegrityError(RegistryError):
    """A model file or reference snapshot is missing or its sha256 is not the one the registry recorded."""


class FeatureMismatchError(RegistryError):
    """A model trained on other features, or in another order, than the spec's: its predictions would be
    made from the wrong columns."""


def check_features(model: CatBoostRegressor, spec: FeatureSpec, *, version: int) -> None:
    """Raise FeatureMismatchError unless `model` was trained on exactly the spec's features, in its order,
    with the same ones categorical."""
    trained, wanted = list(model.feature_names_ or []), spec.feature_names
    if trained == wanted:
        categorical = {trained[i] for i in model.get_cat_feature_indices()}
        changed = [
            f"{name} is {'categorical' if name in categorical else 'numeric'} in the model and "
            f"{spec.feature(name).type.value} in the spec"
            for name in wanted
            if (name in categorical) != (name in spec.categorical_features)
        ]
        if not changed:
            return
        _mismatch(version, "; ".join(changed))
    missing = [f for f in wanted if f not in trained]
    extra = [f for f in trained if f not in wanted]
    if missing or extra:
        what = "; ".join(
            part for part in (
                f"the spec lists {', '.join(missing)}, which it was not trained on" if missing else "",
                f"it was trained on {', '.join(extra)}, which the spec does not list" if extra else "",
            ) if part
        )  # fmt: skip
    else:
        what = f"same features in another order: trained on {', '.join(trained)}"
    _mismatch(version, what)


def check_target(reference: pd.DataFrame, spec: FeatureSpec, *, version: int) -> None:
    """Raise FeatureMismatchError unless the version's reference snapshot holds its labels under the spec's
    target: after a renamed target the model still serves (it never sees the target), but the monitor would
    find no labels to compare with and a retrain would drop the whole reference."""
    if spec.target in reference.columns:
        return
    own = {*spec.feature_names, *RESERVED_NAMES}
    other = [str(c) for c in reference.columns if c not in own]
    held = f"holds the target {', '.join(other)}" if other else "holds no target"
    _mismatch(version, f"its reference data {held}, the spec names {spec.target}")


def _mismatch(version: int, what: str) -> NoReturn:
    raise FeatureMismatchError(
        f"v{version} does not fit the spec ({what}); restore the spec it was trained with, or start a new "
        "model line for this spec (a fresh database and artifact directory, then driftloop bootstrap)"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ArtifactStore:
    root: Path

    def version_dir(self, version: int) -> Path:
        return self.root / f"v{version}"

    def save(
        self, *, version: int, model: CatBoostRegressor, reference: pd.DataFrame, metadata: dict[str, Any]
    ) -> tuple[Path, str, Path, str]:
        """Write model + reference + metadata atomically; return the model's path and sha256, and the
        reference's."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.version_dir(version)
        if final.exists():
            raise RegistryError(f"artifact directory {final} already exists")
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=self.root))
        try:
            model.save_model(str(tmp / MODEL_FILE))
            reference.to_parquet(tmp / REFERENCE_FILE, index=False)
            digest, ref_digest = sha256_file(tmp / MODEL_FILE), sha256_file(tmp / REFERENCE_FILE)
            meta = {**metadata, "version": version, "sha256": digest, "reference_sha256": ref_digest}
            (tmp / "metadata.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final / MODEL_FILE, digest, final / REFERENCE_FILE, ref_digest

    @staticmethod
    def verify(path: str | Path, sha256: str, *, what: str = "model file") -> None:
        """Raise ArtifactIntegrityError unless the file exists and has the recorded sha256."""
        p = Path(path)
        if not p.is_file():
            raise ArtifactIntegrityError(f"{p}: the {what} is missing")
        actual = sha256_file(p)
        if actual != sha256:
            raise ArtifactIntegrityError(f"{p}: sha256 {actual} does not match the registry's {sha256}")

    @classmethod
    def load_model(cls, path: str | Path, sha256: str) -> CatBoostRegressor:
        cls.verify(path, sha256)
        model = CatBoostRegressor()
        model.load_model(str(path))
        return model

    @classmethod
    def verify_reference(cls, path: str | Path, sha256: str | None) -> None:
        """`verify` for a reference snapshot, when its sha256 was recorded (versions registered before the
        registry recorded it have none)."""
        if sha256 is not None:
            cls.verify(path, sha256, what="reference snapshot")

    @classmethod
    def load_reference(cls, path: str | Path, sha256: str | None) -> pd.DataFrame:
        cls.verify_reference(path, sha256)
        return pd.read_parquet(path)


@dataclass(frozen=True, slots=True)
class NewVersion:
    """Everything that makes a model version answerable: data, trigger, report, metrics, parent."""

    model: CatBoostRegressor
    reference: pd.DataFrame
    trigger: str
    metrics: dict[str, Any]
    params: dict[str, Any]
    train_rows: int
    train_start: datetime | None = None
    train_end: datetime | None = None
    feature_importance: dict[str, float] = field(default_factory=dict)
    data_sources: dict[str, Any] = field(default_factory=dict)
    parent_version: int | None = None
    report_id: int | None = None
    retrain_run_id: int | None = None
    note: str = ""


# pg_advisory_xact_lock key serialising registrations: the first 8 bytes of sha256("driftloop.register").
REGISTER_LOCK_ID = int.from_bytes(hashlib.sha256(b"driftloop.register").digest()[:8], "big", signed=True)


class Registry:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore) -> None:
        self.sessions = sessions
        self.store = store

    def register(self, new: NewVersion) -> ModelVersion:
        """Store the artifacts and add a `candidate` row; returns the row.

        On PostgreSQL registrations queue on a lock until the one before commits, so two processes (two
        bootstraps at once) never pick the same version number; SQLite has one writing process.
        """
        with self.sessions.begin() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": REGISTER_LOCK_ID})
            version = (session.scalar(select(func.max(ModelVersion.version))) or 0) + 1
            existing = {p.name for p in self.store.root.glob("v*")} if self.store.root.exists() else set()
            while f"v{version}" in existing:  # artifacts of a crashed registration: never reuse them
                version += 1
            meta = {
                "trigger": new.trigger,
                "metrics": new.metrics,
                "params": new.params,
                "train_rows": new.train_rows,
                "train_start": new.train_start,
                "train_end": new.train_end,
                "parent_version": new.parent_version,
            }
            model_path, digest, ref_path, ref_digest = self.store.save(
                version=version, model=new.model, reference=new.reference, metadata=meta
            )
            row = ModelVersion(
                version=version,
                created_at=utcnow(),
                status=ModelStatus.candidate,
                trigger=new.trigger,
                artifact_path=str(model_path),
                sha256=digest,
                reference_path=str(ref_path),
                reference_sha256=ref_digest,
                train_start=new.train_start,
                train_end=new.train_end,
                train_rows=new.train_rows,
                metrics=new.metrics,
                params=new.params,
                feature_importance=new.feature_importance,
                data_sources=new.data_sources,
                parent_version=new.parent_version,
                report_id=new.report_id,
                retrain_run_id=new.retrain_run_id,
                note=new.note,
            )
            session.add(row)
        return row

    def champion(self, session: Session | None = None) -> ModelVersion | None:
        if session is not None:
            return session.scalar(select(ModelVersion).where(ModelVersion.status == ModelStatus.champion))
        with self.sessions() as s:
            return s.scalar(select(ModelVersion).where(ModelVersion.status == ModelStatus.champion))

    def get(self, version: int) -> ModelVersion | None:
        with self.sessions() as s:
            return s.get(ModelVersion, version)

    def list(self) -> list[ModelVersion]:
        with self.sessions() as s:
            return list(s.scalars(select(ModelVersion).order_by(ModelVersion.version.desc())))

    def promote(
        self,
        *,
        version: int,
        reason: str = "",
        default_reason: str = "",
        replaces: int | None = None,
        first: bool = False,
    ) -> ModelVersion:
        """Make `version` the champion; the old champion is archived in the same transaction.

        A gate-rejected version needs a `reason` (ReasonRequired); for any other, `default_reason` is recorded
        when none is given. A model file or reference snapshot that is missing or not the one registered is
        refused before anything changes (ArtifactIntegrityError): no serving process could load the model,
        and all would keep the old one; no monitor could judge its traffic without the reference. Given
        `replaces`, the promotion happens only while that version is the champion (ChampionChanged); given
        `first`, only while there is no champion at all (ChampionChanged): the first model must not archive
        one that another process promoted while it trained.
        """
        reason = reason.strip()
        try:
            with self.sessions.begin() as session:
                # Promotions queue on the champion's row, so a second one archives the champion the first made
                # instead of both archiving the same one (the later commit then broke the one-champion index).
                lock_champion = (
                    select(ModelVersion.version)
                    .where(ModelVersion.status == ModelStatus.champion)
                    .with_for_update()
                )
                current = session.scalar(lock_champion)
                if current is None:  # PostgreSQL skips a row that the promotion we waited on archived: the
                    current = session.scalar(lock_champion)  # next statement sees (and locks) its champion
                row = session.get(ModelVersion, version, with_for_update=True)
                if row is None:
                    raise UnknownVersion(f"model version {version} does not exist")
                if row.status == ModelStatus.champion:  # already so (two rollbacks at once): done
                    return row
                if replaces is not None and current != replaces:
                    raise ChampionChanged(
                        f"model version {version} not promoted: it was to replace v{replaces}, "
                        f"but the champion is now {f'v{current}' if current is not None else 'none'}"
                    )
                if first and current is not None:
                    raise ChampionChanged(
                        f"model version {version} not promoted: it was to be the first champion, but "
                        f"v{current} is the champion now"
                    )
                self._promote_in(session, row, reason=reason, default_reason=default_reason)
        except IntegrityError:  # no champion to queue on, and another promotion committed first
            if first:
                raise ChampionChanged(
                    f"model version {version} not promoted: it was to be the first champion, but another "
                    "version was made champion at the same moment"
                ) from None
            raise RegistryError(
                f"model version {version} not promoted: another version was made champion at the same "
                "moment; retry"
            ) from None
        return row

    def _promote_in(self, session: Session, row: ModelVersion, *, reason: str, default_reason: str) -> None:
        if row.status == ModelStatus.rejected and not reason:
            raise ReasonRequired(
                f"model version {row.version} was rejected by the gate ({_rejection(row)}); "
                "a reason is needed to promote it anyway"
            )
        reason = reason or default_reason
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.status == ModelStatus.champion)
            .values(status=ModelStatus.archived)
        )
        session.flush()
        # The files are checked after that write: on SQLite it takes the write lock (on PostgreSQL the row
        # is locked already), so `driftloop prune --artifacts` cannot delete them between check and commit.
        try:
            self.store.verify(row.artifact_path, row.sha256)
            self.store.verify_reference(row.reference_path, row.reference_sha256)
        except ArtifactIntegrityError as exc:
            raise ArtifactIntegrityError(f"model version {row.version} not promoted: {exc}") from None
        row.status = ModelStatus.champion
        row.promoted_at = utcnow()
        if reason:
            row.note = (row.note + "\n" if row.note else "") + f"promoted: {reason}"

    def reject(self, *, version: int, reason: str) -> None:
        with self.sessions.begin() as session:
            row = session.get(ModelVersion, version)
            if row is None:
                raise UnknownVersion(f"model version {version} does not exist")
            row.status = ModelStatus.rejected
            row.note = (row.note + "\n" if row.note else "") + f"rejected: {reason}"

    def rollback(self, *, reason: str = "rollback") -> ModelVersion:
        """Re-promote the previous champion: the archived version promoted most recently."""
        with self.sessions() as s:
            current = s.scalar(select(ModelVersion).where(ModelVersion.status == ModelStatus.champion))
            previous = s.scalar(
                select(ModelVersion)
                .where(ModelVersion.status == ModelStatus.archived, ModelVersion.promoted_at.is_not(None))
                .order_by(ModelVersion.promoted_at.desc())
                .limit(1)
            )
            demoted = s.scalars(  # former champions a rollback left: never chosen by another
                select(ModelVersion.version)
                .where(ModelVersion.status == ModelStatus.archived, ModelVersion.promoted_at.is_(None))
                .order_by(ModelVersion.version)
            ).all()
        if previous is None:
            left = ", ".join(f"v{v}" for v in demoted)
            raise RegistryError(
                "no previous champion to roll back to"
                + (f": {left} {'was' if len(demoted) == 1 else 'were'} rolled back from, which a rollback "
                   "never returns to; promote one by number to serve it again" if demoted else "")
            )  # fmt: skip
        promoted = self.promote(
            version=previous.version, reason=reason, replaces=current.version if current else None
        )
        if current is not None:
            with self.sessions.begin() as session:
                row = session.get(ModelVersion, current.version)
                if row is not None:
                    # Demoted by a rollback: it must not be chosen by the next rollback.
                    row.promoted_at = None
                    row.note = (row.note + "\n" if row.note else "") + f"rolled back: {reason}"
        return promoted

    def load(self, row: ModelVersion, *, spec: FeatureSpec | None = None) -> CatBoostRegressor:
        """The version's model, its artifact checked against the recorded sha256 and, given the `spec`,
        against the columns it will be fed (FeatureMismatchError)."""
        model = self.store.load_model(row.artifact_path, row.sha256)
        if spec is not None:
            check_features(model, spec, version=row.version)
        return model

    def reference(self, row: ModelVersion, *, spec: FeatureSpec | None = None) -> pd.DataFrame:
        """The version's reference snapshot, checked against its recorded sha256 (ArtifactIntegrityError)
        and, given a spec, for the spec's target (FeatureMismatchError)."""
        reference = self.store.load_reference(row.reference_path, row.reference_sha256)
        if spec is not None:
            check_target(reference, spec, version=row.version)
        return reference


def _rejection(row: ModelVersion) -> str:
    """Why the gate rejected the version, as its note records it (the latest rejection)."""
    prefix = "rejected: "
    reasons = [line.removeprefix(prefix) for line in row.note.splitlines() if line.startswith(prefix)]
    return reasons[-1] if reasons else "no reason recorded"
