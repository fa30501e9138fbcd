"""A named lease in the database: one holder at a time, taken over only after it expires."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.schema import Lease


def try_acquire(
    sessions: sessionmaker[Session], *, name: str, holder: str, ttl_s: float, now: datetime
) -> bool:
    """Take or renew the lease; True while `holder` has it. Atomic on SQLite and PostgreSQL."""
    expires = now + timedelta(seconds=ttl_s)
    with sessions.begin() as session:
        taken = session.execute(
            update(Lease)
            .where(Lease.name == name, (Lease.holder == holder) | (Lease.expires_at < now))
            .values(holder=holder, acquired_at=now, expires_at=expires)
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            return True
        if session.get(Lease, name) is not None:
            return False
    try:
        with sessions.begin() as session:
            session.add(Lease(name=name, holder=holder, acquired_at=now, expires_at=expires))
    except IntegrityError:
        return False
    return True


def release(sessions: sessionmaker[Session], *, name: str, holder: str) -> None:
    with sessions.begin() as session:
        lease = session.get(Lease, name)
        if lease is not None and lease.holder == holder:
            session.delete(lease)


def current_holder(sessions: sessionmaker[Session], *, name: str) -> Lease | None:
    """The lease row (its holder and expiry), or None when nobody holds it."""
    with sessions() as session:
        return session.get(Lease, name)
