"""The control-plane store: SQLAlchemy 2, SQLite by default, PostgreSQL by URL.

Every query is scoped to a tenant id that comes from an authenticated key.
Changes that affect a user's decisions are not applied from here: the API
writes them to the usage log (see ``ledger.api``), in the same unit of work
that records them here, so the processor sees them in order.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from sqlalchemy import (
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ledger.control.keys import ALL_SCOPES, Scope, digest, looks_like_key, matches, new_key
from ledger.plans import Plan
from ledger.tiers import Tier

NAME_LENGTH_MAX = 128
EVENT_ID_LENGTH_MAX = 128
# Ingested event ids remembered per tenant, to answer a retry `duplicate` (the processor dedups regardless).
INGESTED_IDS_PER_TENANT_MAX = 100_000


def _now() -> datetime:
    return datetime.now(UTC)


def _id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class TenantRow(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_id)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH_MAX), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_digest: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(NAME_LENGTH_MAX), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class PlanRow(Base):
    __tablename__ = "plans"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH_MAX))
    latest_version: Mapped[int] = mapped_column(Integer)


class PlanVersionRow(Base):
    __tablename__ = "plan_versions"
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    body: Mapped[str] = mapped_column(Text)  # the Plan as JSON; money as decimal strings
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class UserRow(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "external_id"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    external_id: Mapped[str] = mapped_column(String(NAME_LENGTH_MAX))
    plan_id: Mapped[str | None] = mapped_column(ForeignKey("plans.id"), nullable=True)
    period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class TierRow(Base):
    __tablename__ = "tiers"
    __table_args__ = (UniqueConstraint("tenant_id", "tier_code"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    tier_code: Mapped[str] = mapped_column(String(NAME_LENGTH_MAX))
    body: Mapped[str] = mapped_column(Text)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"))


class IngestedRow(Base):
    """An event id the API published to the usage log, with its payload digest (newest have the highest seq)."""

    __tablename__ = "ingested_events"
    __table_args__ = (UniqueConstraint("tenant_id", "event_id"), Index("ix_ingested_tenant_seq", "tenant_id", "seq"))
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_LENGTH_MAX))
    digest: Mapped[str] = mapped_column(String(64))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant comes from the key, never from the request."""

    tenant_id: str
    tenant_name: str
    key_id: str
    scopes: frozenset[Scope]


@dataclass(frozen=True)
class User:
    id: str
    external_id: str
    plan_id: str | None
    period_start: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class Snapshot:
    plan_versions: list[tuple[str, Plan, datetime]]  # (tenant id, version, created at)
    users: list[tuple[str, User]]                     # (tenant id, user)
    tiers: list[tuple[str, str, str, Tier]]           # (tenant id, tier id, plan id, tier)


class Conflict(Exception):
    """The thing exists already (answered with 409)."""


_plan_decoder = msgspec.json.Decoder(Plan)
_tier_decoder = msgspec.json.Decoder(Tier)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands timestamps back without their zone (they are written in UTC); PostgreSQL in the session's TimeZone.
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _user(row: UserRow) -> User:
    return User(row.id, row.external_id, row.plan_id, _utc(row.period_start), _utc(row.created_at) or _now())


class ControlSession:
    """One unit of work; every method is scoped to the tenant it is given."""

    def __init__(self, session: Session) -> None:
        self.db = session

    # -- tenants and keys ----------------------------------------------------

    def create_tenant(self, name: str, live: bool = True) -> tuple[str, str]:
        """A tenant and its first key (all scopes). Returns (tenant id, key)."""
        if self.db.scalar(select(TenantRow).where(TenantRow.name == name)) is not None:
            raise Conflict(f"tenant {name!r} exists")
        tenant = TenantRow(name=name)
        self.db.add(tenant)
        try:
            self.db.flush()
        except IntegrityError:  # created by a concurrent unit of work since the check above
            raise Conflict(f"tenant {name!r} exists") from None
        return tenant.id, self.create_key(tenant.id, ALL_SCOPES, label="initial", live=live)

    def create_key(self, tenant_id: str, scopes: frozenset[Scope], label: str = "", live: bool = True) -> str:
        key = new_key(live)
        self.db.add(ApiKeyRow(tenant_id=tenant_id, key_digest=digest(key), label=label,
                              scopes=",".join(sorted(s.value for s in scopes))))
        self.db.flush()
        return key

    def revoke_key(self, tenant_id: str, key: str) -> bool:
        row = self.db.scalar(select(ApiKeyRow).where(ApiKeyRow.key_digest == digest(key),
                                                     ApiKeyRow.tenant_id == tenant_id))
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = _now()
        return True

    def tenant_id(self, name: str) -> str | None:
        return self.db.scalar(select(TenantRow.id).where(TenantRow.name == name))

    def authenticate(self, key: str) -> Principal | None:
        if not looks_like_key(key):
            return None
        found = self.db.execute(
            select(ApiKeyRow, TenantRow.name).join(TenantRow, TenantRow.id == ApiKeyRow.tenant_id)
            .where(ApiKeyRow.key_digest == digest(key))
        ).first()
        if found is None:
            return None
        row, tenant_name = found
        if row.revoked_at is not None or not matches(key, row.key_digest):
            return None
        return Principal(row.tenant_id, tenant_name, row.id, frozenset(Scope(s) for s in row.scopes.split(",") if s))

    # -- plans -----------------------------------------------------------------

    def plan_names(self, tenant_id: str) -> set[str]:
        return set(self.db.scalars(select(PlanRow.name).where(PlanRow.tenant_id == tenant_id)))

    def add_plan_version(self, tenant_id: str, plan: Plan) -> None:
        """Record a plan version; version 1 creates the plan."""
        if plan.version == 1:
            self.db.add(PlanRow(id=plan.plan_id, tenant_id=tenant_id, name=plan.name, latest_version=1))
        else:
            row = self.db.get(PlanRow, plan.plan_id)
            assert row is not None and row.tenant_id == tenant_id and row.latest_version == plan.version - 1
            row.latest_version = plan.version
        self.db.add(PlanVersionRow(plan_id=plan.plan_id, version=plan.version,
                                   body=msgspec.json.encode(plan).decode()))
        self.db.flush()

    def plans(self, tenant_id: str) -> list[Plan]:
        """The newest version of every plan of the tenant, by name."""
        rows = self.db.scalars(
            select(PlanVersionRow.body).join(PlanRow, (PlanRow.id == PlanVersionRow.plan_id)
                                             & (PlanRow.latest_version == PlanVersionRow.version))
            .where(PlanRow.tenant_id == tenant_id).order_by(PlanRow.name)
        )
        return [_plan_decoder.decode(body) for body in rows]

    def plan(self, tenant_id: str, plan_id: str, *, for_update: bool = False) -> Plan | None:
        if "\x00" in plan_id:  # PostgreSQL text cannot hold NUL, so no row has it
            return None
        query = (select(PlanVersionRow.body).join(PlanRow, (PlanRow.id == PlanVersionRow.plan_id)
                                                  & (PlanRow.latest_version == PlanVersionRow.version))
                 .where(PlanRow.tenant_id == tenant_id, PlanRow.id == plan_id))
        if for_update:
            query = query.with_for_update(of=PlanRow)
        body = self.db.scalar(query)
        return None if body is None else _plan_decoder.decode(body)

    # -- tiers -------------------------------------------------------------------

    def add_tier(self, tenant_id: str, tier: Tier, plan_id: str) -> str:
        row = TierRow(tenant_id=tenant_id, tier_code=tier.tier_code, body=msgspec.json.encode(tier).decode(),
                      plan_id=plan_id)
        self.db.add(row)
        self.db.flush()
        return row.id

    def tiers(self, tenant_id: str) -> list[tuple[str, str, Tier]]:
        """(tier id, plan id, tier) of every tier of the tenant, by code."""
        rows = self.db.scalars(select(TierRow).where(TierRow.tenant_id == tenant_id).order_by(TierRow.tier_code))
        return [(r.id, r.plan_id, _tier_decoder.decode(r.body)) for r in rows]

    def tier(self, tenant_id: str, tier_id: str) -> tuple[str, str, Tier] | None:
        if "\x00" in tier_id:  # PostgreSQL text cannot hold NUL, so no row has it
            return None
        row = self.db.scalar(select(TierRow).where(TierRow.tenant_id == tenant_id, TierRow.id == tier_id))
        return None if row is None else (row.id, row.plan_id, _tier_decoder.decode(row.body))

    # -- every tenant, for the history's copy ------------------------------------

    def snapshot(self) -> Snapshot:
        """Every plan version, user and tier of every tenant (the projector copies them into DuckDB)."""
        versions = self.db.execute(select(PlanRow.tenant_id, PlanVersionRow.body, PlanVersionRow.created_at)
                                   .join(PlanRow, PlanRow.id == PlanVersionRow.plan_id)
                                   .order_by(PlanRow.tenant_id, PlanVersionRow.plan_id, PlanVersionRow.version))
        users = self.db.scalars(select(UserRow).order_by(UserRow.tenant_id, UserRow.external_id))
        tiers = self.db.scalars(select(TierRow).order_by(TierRow.tenant_id, TierRow.tier_code))
        return Snapshot(
            plan_versions=[(tenant, _plan_decoder.decode(body), _utc(created) or created)
                           for tenant, body, created in versions],
            users=[(row.tenant_id, _user(row)) for row in users],
            tiers=[(row.tenant_id, row.id, row.plan_id, _tier_decoder.decode(row.body)) for row in tiers],
        )

    # -- users -------------------------------------------------------------------

    def create_user(self, tenant_id: str, external_id: str) -> User:
        row = UserRow(tenant_id=tenant_id, external_id=external_id)
        self.db.add(row)
        try:
            self.db.flush()
        except IntegrityError:
            raise Conflict(f"user {external_id!r} exists") from None
        return _user(row)

    def user(self, tenant_id: str, user_id: str) -> User | None:
        if "\x00" in user_id:  # PostgreSQL text cannot hold NUL, so no row has it
            return None
        row = self.db.scalar(select(UserRow).where(UserRow.tenant_id == tenant_id, UserRow.id == user_id))
        return None if row is None else _user(row)

    def set_subscription(self, tenant_id: str, user_id: str, plan_id: str, period_start: datetime) -> User:
        row = self.db.scalar(select(UserRow).where(UserRow.tenant_id == tenant_id, UserRow.id == user_id))
        if row is None:
            raise LookupError(f"no user {user_id}")
        if period_start.utcoffset() is None:
            raise ValueError("period_start must be timezone-aware")
        # SQLite's DateTime keeps the wall-clock time and drops the offset: store the instant in UTC.
        row.plan_id, row.period_start = plan_id, period_start.astimezone(UTC)
        self.db.flush()
        return _user(row)


    # -- ingested usage ----------------------------------------------------------

    def ingested(self, tenant_id: str, event_ids: list[str]) -> dict[str, str]:
        """The payload digest of each of ``event_ids`` this tenant's usage was published under, if remembered."""
        ids = [e for e in event_ids if "\x00" not in e]  # PostgreSQL text cannot hold NUL, so no row has it
        if not ids:
            return {}
        rows = self.db.execute(select(IngestedRow.event_id, IngestedRow.digest)
                               .where(IngestedRow.tenant_id == tenant_id, IngestedRow.event_id.in_(ids)))
        return {event_id: digest for event_id, digest in rows}

    def remember_ingested(self, tenant_id: str, digests: dict[str, str],
                          keep: int = INGESTED_IDS_PER_TENANT_MAX) -> None:
        """Remember published event ids (an id remembered already keeps its first digest); forget all but the
        newest ``keep`` of the tenant's."""
        if not digests:
            return
        dialect = postgresql if self.db.get_bind().dialect.name == "postgresql" else sqlite
        rows = [{"tenant_id": tenant_id, "event_id": e, "digest": d} for e, d in digests.items()]
        self.db.execute(dialect.insert(IngestedRow).values(rows).on_conflict_do_nothing())
        oldest_kept = self.db.scalar(select(IngestedRow.seq).where(IngestedRow.tenant_id == tenant_id)
                                     .order_by(IngestedRow.seq.desc()).offset(keep - 1).limit(1))
        if oldest_kept is not None:
            self.db.execute(delete(IngestedRow).where(IngestedRow.tenant_id == tenant_id,
                                                      IngestedRow.seq < oldest_kept))


class ControlStore:
    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[ControlSession]:
        """A unit of work: committed when the block ends, rolled back if it raises."""
        with self._sessions() as db, db.begin():
            yield ControlSession(db)

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
