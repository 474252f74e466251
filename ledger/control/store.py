"""The control-plane store: SQLAlchemy 2, SQLite by default, PostgreSQL by URL.

Every query is scoped to a tenant id that comes from an authenticated key.
Changes that affect a user's decisions are not applied from here: the unit of
work that records one also puts its commands in the outbox (same transaction),
and ``ledger.control.outbox`` publishes them to the usage log after the commit,
in outbox order, so no transaction is ever held across a Kafka publish.
Transient lock errors are retried by :meth:`ControlStore.transact`.
"""

from __future__ import annotations

import enum
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import msgspec
from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, Result, Row
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql import Select

from ledger.control import quotas
from ledger.control.keys import ALL_SCOPES, Scope, digest, looks_like_key, matches, new_key, new_webhook_secret
from ledger.plans import Plan
from ledger.tiers import Tier

NAME_LENGTH_MAX = 128
EVENT_ID_LENGTH_MAX = 128
# Ingested event ids remembered per tenant, to answer a retry `duplicate` (the processor dedups regardless).
INGESTED_IDS_PER_TENANT_MAX = 100_000
WEBHOOK_URL_LENGTH_MAX = 2048
WEBHOOK_DESCRIPTION_LENGTH_MAX = 256
WEBHOOKS_PER_TENANT_MAX = quotas.WEBHOOKS_PER_TENANT.value
DELIVERY_ERROR_LENGTH_MAX = 500
DELIVERIES_PAGE_MAX = 1000
# SQLite: how long a writer waits for another's lock before "database is locked" (sqlite3's busy timeout).
SQLITE_BUSY_TIMEOUT_S = 10.0
# Transient database errors (SQLite busy, PostgreSQL serialization failures and deadlocks): attempts of one
# unit of work in all, and the first backoff (doubled each time, with jitter, at most DB_RETRY_WAIT_S_MAX).
DB_ATTEMPTS_MAX = 6
DB_RETRY_FIRST_S = 0.05
DB_RETRY_WAIT_S_MAX = 2.0
PG_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03"})  # serialization, deadlock, lock not available
SQLITE_TRANSIENT_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
OUTBOX_LEASE_NAME = "outbox"

T = TypeVar("T")
log = logging.getLogger(__name__)


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


class TenantLimitsRow(Base):
    """A tenant's own request rate per API key, where it differs from the settings' defaults."""

    __tablename__ = "tenant_limits"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    requests_per_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    burst: Mapped[int | None] = mapped_column(Integer, nullable=True)


class OutboxRow(Base):
    """A command for the usage log, recorded with the change that caused it and deleted once published."""

    __tablename__ = "outbox"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    command: Mapped[str] = mapped_column(Text)  # the command as the log carries it (JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class RelayLeaseRow(Base):
    """Who publishes the outbox now: one relay at a time keeps the log in outbox order across processes."""

    __tablename__ = "relay_leases"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(36))
    until: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IngestedRow(Base):
    """An event id the API published to the usage log, with its payload digest (newest have the highest seq)."""

    __tablename__ = "ingested_events"
    __table_args__ = (UniqueConstraint("tenant_id", "event_id"), Index("ix_ingested_tenant_seq", "tenant_id", "seq"))
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_LENGTH_MAX))
    digest: Mapped[str] = mapped_column(String(64))


class WebhookRow(Base):
    """An endpoint that receives the tenant's gate events, signed with its own secret."""

    __tablename__ = "webhooks"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    url: Mapped[str] = mapped_column(String(WEBHOOK_URL_LENGTH_MAX))
    description: Mapped[str] = mapped_column(String(WEBHOOK_DESCRIPTION_LENGTH_MAX), default="")
    # Kept as it is (not hashed): the delivery process signs with it. Shown to the tenant once, at creation.
    secret: Mapped[str] = mapped_column(String(128))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class DeliveryState(enum.StrEnum):
    pending = "pending"        # waiting for its next attempt (next_attempt_at)
    delivered = "delivered"    # an attempt was answered 2xx
    failed = "failed"          # every attempt failed; no more will be made


class DeliveryRow(Base):
    """One gate event for one endpoint: the delivery log, and the queue of retries."""

    __tablename__ = "webhook_deliveries"
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id"), primary_key=True)
    # The gate event's id: the `webhook-id` of every attempt, so receivers can deduplicate retries.
    event_id: Mapped[str] = mapped_column(String(NAME_LENGTH_MAX), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    payload: Mapped[str] = mapped_column(Text)  # the exact body every attempt sends
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.pending.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(DELIVERY_ERROR_LENGTH_MAX), nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant comes from the key, never from the request."""

    tenant_id: str
    tenant_name: str
    key_id: str
    scopes: frozenset[Scope]
    # The tenant's own request rate per key (None: the settings' default).
    requests_per_s: int | None = None
    burst: int | None = None


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


@dataclass(frozen=True)
class Webhook:
    id: str
    url: str
    description: str
    enabled: bool
    created_at: datetime


@dataclass(frozen=True)
class Delivery:
    webhook_id: str
    event_id: str
    state: DeliveryState
    attempts: int
    last_status: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class Outbound:
    """A gate event to deliver: ``written_at`` is when it entered the log (endpoints created later skip it)."""

    tenant_id: str
    event_id: str
    payload: str
    written_at: datetime


@dataclass(frozen=True)
class DueDelivery:
    """A delivery claimed for one attempt, with what the attempt needs."""

    webhook_id: str
    event_id: str
    url: str
    secret: str
    payload: str
    attempts: int
    tenant_id: str = ""


class Conflict(Exception):
    """The thing exists already (answered with 409)."""


class LimitExceeded(Conflict):
    """A named per-tenant quota is full (answered with 409, naming the limit and its value)."""

    def __init__(self, limit: quotas.Limit, extra: str = "") -> None:
        self.limit = limit
        super().__init__(f"{limit.name}: a tenant has at most {limit.value} {limit.what}{extra}")


_plan_decoder = msgspec.json.Decoder(Plan)
_tier_decoder = msgspec.json.Decoder(Tier)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands timestamps back without their zone (they are written in UTC); PostgreSQL in the session's TimeZone.
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _webhook(row: WebhookRow) -> Webhook:
    return Webhook(row.id, row.url, row.description, row.enabled, _utc(row.created_at) or _now())


def _delivery(row: DeliveryRow) -> Delivery:
    return Delivery(row.webhook_id, row.event_id, DeliveryState(row.state), row.attempts, row.last_status,
                    row.last_error, _utc(row.next_attempt_at), _utc(row.delivered_at), _utc(row.created_at) or _now())


def _user(row: UserRow) -> User:
    return User(row.id, row.external_id, row.plan_id, _utc(row.period_start), _utc(row.created_at) or _now())


# A key with its tenant and the tenant's rate: columns, not ORM objects, since the API reads this on every
# request (77 µs through Core against 378 µs loading the rows through a session, SQLite).
_KeyRow = tuple[str, str, str, str, datetime | None, str, int | None, int | None]
_KEYS: Select[*_KeyRow] = (
    select(ApiKeyRow.id, ApiKeyRow.tenant_id, ApiKeyRow.key_digest, ApiKeyRow.scopes, ApiKeyRow.revoked_at,
           TenantRow.name.label("tenant_name"), TenantLimitsRow.requests_per_s, TenantLimitsRow.burst)
    .join(TenantRow, TenantRow.id == ApiKeyRow.tenant_id)
    .outerjoin(TenantLimitsRow, TenantLimitsRow.tenant_id == ApiKeyRow.tenant_id)
)
_KEY_BY_DIGEST = _KEYS.where(ApiKeyRow.key_digest == bindparam("digest"))  # built once: its cache key is kept


def _principal(found: Row[*_KeyRow]) -> Principal:
    return Principal(found.tenant_id, found.tenant_name, found.id,
                     frozenset(Scope(s) for s in found.scopes.split(",") if s), found.requests_per_s, found.burst)


def _key_holder(execute: Callable[[Select[*_KeyRow], dict[str, str]], Result[*_KeyRow]], key: str) -> Principal | None:
    """Who holds ``key``: None for what is not a key, an unknown key, or a revoked one."""
    if not looks_like_key(key):
        return None
    found = execute(_KEY_BY_DIGEST, {"digest": digest(key)}).first()
    if found is None or found.revoked_at is not None or not matches(key, found.key_digest):
        return None
    return _principal(found)


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
        return _key_holder(self.db.execute, key)

    def principal(self, key_id: str) -> Principal | None:
        """The principal of a key by its id, while the key is not revoked (the console's sessions re-check it)."""
        found = self.db.execute(_KEYS.where(ApiKeyRow.id == key_id)).first()
        return None if found is None or found.revoked_at is not None else _principal(found)

    def set_rate(self, tenant_id: str, requests_per_s: int | None, burst: int | None) -> None:
        """The tenant's own request rate per key and burst (None: back to the settings' default)."""
        for name, value in (("requests_per_s", requests_per_s), ("burst", burst)):
            if value is not None and not 1 <= value <= quotas.RATE_VALUE_MAX:
                raise ValueError(f"{name} must be between 1 and {quotas.RATE_VALUE_MAX}, got {value}")
        row = self.db.get(TenantLimitsRow, tenant_id)
        if row is None:
            self.db.add(TenantLimitsRow(tenant_id=tenant_id, requests_per_s=requests_per_s, burst=burst))
        else:
            row.requests_per_s, row.burst = requests_per_s, burst
        self.db.flush()

    # -- concurrency -------------------------------------------------------------

    def lock_tenant(self, tenant_id: str) -> None:
        """Serialise this tenant's configuration writes until the unit of work ends.

        A write to the tenant's row takes PostgreSQL's row lock and SQLite's write lock, so the counts
        behind a quota and the plan version a PATCH builds on cannot change under this unit of work.
        Other tenants are not blocked on PostgreSQL (SQLite has one writer at a time anyway).
        """
        self.db.execute(update(TenantRow).where(TenantRow.id == tenant_id).values(name=TenantRow.name)
                        .execution_options(synchronize_session=False))

    def _check_quota(self, limit: quotas.Limit, count: int) -> None:
        """Room for one more under ``limit``, given ``count`` there are."""
        if count + 1 > limit.value:
            raise LimitExceeded(limit)

    # -- the outbox ----------------------------------------------------------------

    def enqueue(self, tenant_id: str, commands: Sequence[bytes]) -> list[int]:
        """Put encoded commands in the outbox, in this order; returns their sequence numbers."""
        rows = [OutboxRow(tenant_id=tenant_id, command=c.decode(), created_at=_now()) for c in commands]
        self.db.add_all(rows)
        self.db.flush()
        return [r.seq for r in rows]

    def outbox(self, limit: int) -> list[tuple[int, bytes]]:
        """The oldest commands not yet published, in outbox order."""
        rows = self.db.execute(select(OutboxRow.seq, OutboxRow.command).order_by(OutboxRow.seq).limit(limit))
        return [(seq, command.encode()) for seq, command in rows]

    def unpublished(self, seqs: Sequence[int]) -> set[int]:
        if not seqs:
            return set()
        return set(self.db.scalars(select(OutboxRow.seq).where(OutboxRow.seq.in_(seqs))))

    def forget_published(self, seqs: Sequence[int]) -> None:
        self.db.execute(delete(OutboxRow).where(OutboxRow.seq.in_(seqs)).execution_options(synchronize_session=False))

    def take_relay_lease(self, holder: str, now: datetime, until: datetime) -> bool:
        """Hold (or renew) the outbox relay's lease until ``until``; False while another holder's lease runs."""
        taken = self.db.execute(
            update(RelayLeaseRow)
            .where(RelayLeaseRow.name == OUTBOX_LEASE_NAME, (RelayLeaseRow.holder == holder) | (RelayLeaseRow.until < now))
            .values(holder=holder, until=until).execution_options(synchronize_session=False))
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            return True
        if self.db.get(RelayLeaseRow, OUTBOX_LEASE_NAME) is not None:
            return False
        dialect = postgresql if self.db.get_bind().dialect.name == "postgresql" else sqlite
        added = self.db.execute(dialect.insert(RelayLeaseRow)
                                .values(name=OUTBOX_LEASE_NAME, holder=holder, until=until).on_conflict_do_nothing())
        return bool(added.rowcount == 1)  # type: ignore[attr-defined]

    def release_relay_lease(self, holder: str) -> None:
        self.db.execute(update(RelayLeaseRow)
                        .where(RelayLeaseRow.name == OUTBOX_LEASE_NAME, RelayLeaseRow.holder == holder)
                        .values(until=datetime(2000, 1, 1, tzinfo=UTC)).execution_options(synchronize_session=False))

    # -- plans -----------------------------------------------------------------

    def plan_names(self, tenant_id: str) -> set[str]:
        return set(self.db.scalars(select(PlanRow.name).where(PlanRow.tenant_id == tenant_id)))

    def add_plan_version(self, tenant_id: str, plan: Plan) -> None:
        """Record a plan version; version 1 creates the plan. Quotas: plans per tenant, versions per plan.

        Callers that read before they write (a PATCH, a quota) hold :meth:`lock_tenant` first.
        """
        if plan.version == 1:
            count = self.db.scalar(select(func.count()).select_from(PlanRow).where(PlanRow.tenant_id == tenant_id))
            self._check_quota(quotas.PLANS_PER_TENANT, count or 0)
            self.db.add(PlanRow(id=plan.plan_id, tenant_id=tenant_id, name=plan.name, latest_version=1))
        else:
            self._check_quota(quotas.VERSIONS_PER_PLAN, plan.version - 1)
            # The processor keeps every version of a plan in one state value: their sum must fit in a record.
            stored = self.db.scalar(select(func.sum(func.length(PlanVersionRow.body)))
                                    .where(PlanVersionRow.plan_id == plan.plan_id)) or 0
            if stored + len(msgspec.json.encode(plan)) > quotas.PLAN_HISTORY_BYTES.value:
                raise LimitExceeded(quotas.PLAN_HISTORY_BYTES)
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

    def plan_versions(self, tenant_id: str, plan_id: str) -> list[tuple[Plan, datetime]]:
        """Every version of one plan of the tenant, oldest first, with when it was recorded."""
        rows = self.db.execute(
            select(PlanVersionRow.body, PlanVersionRow.created_at).join(PlanRow, PlanRow.id == PlanVersionRow.plan_id)
            .where(PlanRow.tenant_id == tenant_id, PlanRow.id == plan_id).order_by(PlanVersionRow.version))
        return [(_plan_decoder.decode(body), _utc(created) or created) for body, created in rows]

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
        count = self.db.scalar(select(func.count()).select_from(TierRow).where(TierRow.tenant_id == tenant_id))
        self._check_quota(quotas.TIERS_PER_TENANT, count or 0)
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
        count = self.db.scalar(select(func.count()).select_from(UserRow).where(UserRow.tenant_id == tenant_id))
        self._check_quota(quotas.USERS_PER_TENANT, count or 0)
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

    def users(self, tenant_id: str, *, search: str = "", offset: int = 0, limit: int = 20) -> tuple[list[User], int]:
        """One page of the tenant's users by external id (those containing ``search``), and how many match."""
        query = select(UserRow).where(UserRow.tenant_id == tenant_id)
        if search:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            query = query.where(func.lower(UserRow.external_id).like(pattern.lower(), escape="\\"))
        total = self.db.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = self.db.scalars(query.order_by(UserRow.external_id).offset(offset).limit(limit))
        return [_user(row) for row in rows], total

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
        # Sorted, so two concurrent batches sharing ids take their index locks in one order (no deadlock).
        rows = [{"tenant_id": tenant_id, "event_id": e, "digest": d} for e, d in sorted(digests.items())]
        self.db.execute(dialect.insert(IngestedRow).values(rows).on_conflict_do_nothing())
        oldest_kept = self.db.scalar(select(IngestedRow.seq).where(IngestedRow.tenant_id == tenant_id)
                                     .order_by(IngestedRow.seq.desc()).offset(keep - 1).limit(1))
        if oldest_kept is not None:
            self.db.execute(delete(IngestedRow).where(IngestedRow.tenant_id == tenant_id,
                                                      IngestedRow.seq < oldest_kept))
    # -- webhooks ------------------------------------------------------------------------

    def create_webhook(self, tenant_id: str, url: str, description: str = "") -> tuple[Webhook, str]:
        """A new endpoint and its signing secret (returned here only)."""
        count = self.db.scalar(select(func.count()).select_from(WebhookRow).where(WebhookRow.tenant_id == tenant_id))
        if (count or 0) >= quotas.WEBHOOKS_PER_TENANT.value:
            raise LimitExceeded(quotas.WEBHOOKS_PER_TENANT, "; delete one first")
        secret = new_webhook_secret()
        row = WebhookRow(tenant_id=tenant_id, url=url, description=description, secret=secret, enabled=True,
                         created_at=_now())
        self.db.add(row)
        self.db.flush()
        return _webhook(row), secret

    def webhooks(self, tenant_id: str) -> list[Webhook]:
        rows = self.db.scalars(select(WebhookRow).where(WebhookRow.tenant_id == tenant_id)
                               .order_by(WebhookRow.created_at, WebhookRow.id))
        return [_webhook(r) for r in rows]

    def _webhook_row(self, tenant_id: str, webhook_id: str) -> WebhookRow | None:
        if "\x00" in webhook_id:  # PostgreSQL text cannot hold NUL, so no row has it
            return None
        return self.db.scalar(select(WebhookRow).where(WebhookRow.tenant_id == tenant_id, WebhookRow.id == webhook_id))

    def webhook(self, tenant_id: str, webhook_id: str) -> Webhook | None:
        row = self._webhook_row(tenant_id, webhook_id)
        return None if row is None else _webhook(row)

    def delete_webhook(self, tenant_id: str, webhook_id: str) -> bool:
        """Remove the endpoint and its delivery log; its pending retries are never attempted."""
        row = self._webhook_row(tenant_id, webhook_id)
        if row is None:
            return False
        self.db.execute(delete(DeliveryRow).where(DeliveryRow.webhook_id == row.id))
        self.db.delete(row)
        self.db.flush()
        return True

    def deliveries(self, tenant_id: str, webhook_id: str, limit: int = 100) -> list[Delivery]:
        """The endpoint's delivery log, newest first."""
        rows = self.db.scalars(select(DeliveryRow)
                               .where(DeliveryRow.tenant_id == tenant_id, DeliveryRow.webhook_id == webhook_id)
                               .order_by(DeliveryRow.created_at.desc(), DeliveryRow.event_id)
                               .limit(min(limit, DELIVERIES_PAGE_MAX)))
        return [_delivery(r) for r in rows]

    # The delivery process works across tenants: these are the only queries not scoped to one.

    def record_deliveries(self, events: Sequence[Outbound], now: datetime) -> int:
        """One pending delivery per event and enabled endpoint of its tenant; those that exist are kept as they are.

        Idempotent, so a batch read again after a crash adds nothing. Returns how many were added.
        """
        tenants = {e.tenant_id for e in events}
        if not tenants:
            return 0
        endpoints = self.db.execute(select(WebhookRow.id, WebhookRow.tenant_id, WebhookRow.created_at)
                                    .where(WebhookRow.tenant_id.in_(tenants), WebhookRow.enabled.is_(True))).all()
        if not endpoints:
            return 0
        existing = set(self.db.execute(
            select(DeliveryRow.webhook_id, DeliveryRow.event_id)
            .where(DeliveryRow.event_id.in_({e.event_id for e in events}))).tuples())
        added = 0
        for e in events:
            for webhook_id, tenant_id, created_at in endpoints:
                created = _utc(created_at)
                if tenant_id != e.tenant_id or (webhook_id, e.event_id) in existing or (created and created > e.written_at):
                    continue
                existing.add((webhook_id, e.event_id))
                self.db.add(DeliveryRow(webhook_id=webhook_id, event_id=e.event_id, tenant_id=tenant_id,
                                        payload=e.payload, state=DeliveryState.pending.value, attempts=0,
                                        next_attempt_at=now, created_at=now))
                added += 1
        self.db.flush()
        return added

    def claim_due(self, now: datetime, lease_until: datetime, limit: int, *, tenant_limit: int | None = None,
                  busy: Mapping[str, int] | None = None) -> list[DueDelivery]:
        """Pending deliveries due by ``now``, each moved to ``lease_until`` so no other claimant takes it meanwhile.

        One UPDATE that re-checks the due time on every row it changes: a concurrent claimant that got
        a row first has moved it into the future, so the row is not claimed twice. A claimant that dies
        mid-attempt leaves the delivery due again when the lease ends.

        With ``tenant_limit``, fair between tenants: no tenant gets more than ``tenant_limit`` less what it
        has ``busy`` (attempts in flight), and the claim goes round the tenants (every tenant's oldest due
        delivery, then every tenant's second, ...), so one tenant's backlog never queues another's.
        """
        pending = DeliveryState.pending.value
        is_due = (DeliveryRow.state == pending, DeliveryRow.next_attempt_at <= now, WebhookRow.enabled.is_(True))
        due: Select[str, str] | list[tuple[str, str]]
        if tenant_limit is None:
            due = (select(DeliveryRow.webhook_id, DeliveryRow.event_id)
                   .join(WebhookRow, WebhookRow.id == DeliveryRow.webhook_id)
                   .where(*is_due).order_by(DeliveryRow.next_attempt_at).limit(limit))
        else:
            busy = busy or {}
            rank = func.row_number().over(partition_by=DeliveryRow.tenant_id,
                                          order_by=(DeliveryRow.next_attempt_at, DeliveryRow.webhook_id,
                                                    DeliveryRow.event_id)).label("rank")
            ranked = (select(DeliveryRow.webhook_id, DeliveryRow.event_id, DeliveryRow.tenant_id,
                             DeliveryRow.next_attempt_at, rank)
                      .join(WebhookRow, WebhookRow.id == DeliveryRow.webhook_id).where(*is_due).subquery())
            # Rows of busy tenants beyond their share are skipped below: fetch enough to fill ``limit`` anyway.
            candidates = self.db.execute(
                select(ranked.c.webhook_id, ranked.c.event_id, ranked.c.tenant_id).where(ranked.c.rank <= tenant_limit)
                .order_by(ranked.c.rank, ranked.c.next_attempt_at).limit(limit + sum(busy.values()))).all()
            taken: dict[str, int] = {}
            chosen: list[tuple[str, str]] = []
            for webhook_id, event_id, tenant_id in candidates:
                if len(chosen) >= limit:
                    break
                if taken.get(tenant_id, 0) + busy.get(tenant_id, 0) < tenant_limit:
                    taken[tenant_id] = taken.get(tenant_id, 0) + 1
                    chosen.append((webhook_id, event_id))
            if not chosen:
                return []
            due = chosen
        claimed = self.db.execute(
            update(DeliveryRow)
            .where(tuple_(DeliveryRow.webhook_id, DeliveryRow.event_id).in_(due),
                   DeliveryRow.state == pending, DeliveryRow.next_attempt_at <= now)
            .values(next_attempt_at=lease_until)
            .returning(DeliveryRow.webhook_id, DeliveryRow.event_id, DeliveryRow.payload, DeliveryRow.attempts,
                       DeliveryRow.tenant_id)
            .execution_options(synchronize_session=False)).all()
        if not claimed:
            return []
        targets = {r.id: (r.url, r.secret) for r in self.db.execute(
            select(WebhookRow.id, WebhookRow.url, WebhookRow.secret)
            .where(WebhookRow.id.in_({c.webhook_id for c in claimed})))}
        return [DueDelivery(c.webhook_id, c.event_id, *targets[c.webhook_id], c.payload, c.attempts, c.tenant_id)
                for c in sorted(claimed, key=lambda c: (c.webhook_id, c.event_id))]

    def disable_webhook(self, webhook_id: str, reason: str) -> int:
        """Stop delivering to an endpoint (it answered 410 Gone): its pending deliveries fail with ``reason``."""
        self.db.execute(update(WebhookRow).where(WebhookRow.id == webhook_id).values(enabled=False)
                        .execution_options(synchronize_session=False))
        failed = self.db.execute(
            update(DeliveryRow)
            .where(DeliveryRow.webhook_id == webhook_id, DeliveryRow.state == DeliveryState.pending.value)
            .values(state=DeliveryState.failed.value, next_attempt_at=None, last_error=reason[:DELIVERY_ERROR_LENGTH_MAX])
            .execution_options(synchronize_session=False))
        return int(failed.rowcount)  # type: ignore[attr-defined]

    def prune_deliveries(self, finished_before: datetime, limit: int) -> int:
        """Forget at most ``limit`` delivered or failed deliveries created before ``finished_before``."""
        old = (select(DeliveryRow.webhook_id, DeliveryRow.event_id)
               .where(DeliveryRow.state != DeliveryState.pending.value, DeliveryRow.created_at < finished_before)
               .limit(limit))
        gone = self.db.execute(delete(DeliveryRow)
                               .where(tuple_(DeliveryRow.webhook_id, DeliveryRow.event_id).in_(old))
                               .execution_options(synchronize_session=False))
        return int(gone.rowcount)  # type: ignore[attr-defined]

    def record_attempt(self, webhook_id: str, event_id: str, *, state: DeliveryState, at: datetime,
                       status: int | None, error: str | None, next_attempt_at: datetime | None) -> bool:
        """Log one attempt's outcome; False when the delivery is gone (its endpoint was deleted)."""
        changed = self.db.execute(
            update(DeliveryRow)
            .where(DeliveryRow.webhook_id == webhook_id, DeliveryRow.event_id == event_id)
            .values(attempts=DeliveryRow.attempts + 1, state=state.value, last_status=status,
                    last_error=None if error is None else error[:DELIVERY_ERROR_LENGTH_MAX],
                    next_attempt_at=next_attempt_at if state is DeliveryState.pending else None,
                    **({"delivered_at": at} if state is DeliveryState.delivered else {}))
            .execution_options(synchronize_session=False))
        return bool(changed.rowcount == 1)  # type: ignore[attr-defined]


class ControlStore:
    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        sqlite_url = url.startswith("sqlite")
        self.engine: Engine = create_engine(url, pool_pre_ping=True,
                                            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S} if sqlite_url else {})
        if sqlite_url:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)

    def authenticate(self, key: str) -> Principal | None:
        """``ControlSession.authenticate`` without a unit of work: one read on a pooled connection."""
        with self.engine.connect() as connection:
            return _key_holder(connection.execute, key)

    @contextmanager
    def session(self) -> Iterator[ControlSession]:
        """A unit of work: committed when the block ends, rolled back if it raises."""
        with self._sessions() as db, db.begin():
            yield ControlSession(db)

    def transact(self, work: Callable[[ControlSession], T], *, sleep: Callable[[float], None] = time.sleep) -> T:
        """Run ``work`` in a unit of work, again (bounded, with backoff) when the database says to retry.

        Retried: SQLite busy/locked (after its own busy timeout), PostgreSQL serialization failures,
        deadlocks and lock timeouts. ``work`` must only touch the database: it may run more than once.
        Blocking: async callers run this in a thread (``ledger.api.db.unit_of_work``).
        """
        for attempt in range(1, DB_ATTEMPTS_MAX + 1):
            try:
                with self.session() as session:
                    return work(session)
            except DBAPIError as exc:
                if attempt == DB_ATTEMPTS_MAX or not transient(exc):
                    raise
                wait = min(DB_RETRY_WAIT_S_MAX, DB_RETRY_FIRST_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                log.info("transient database error (%s), attempt %d of %d; again in %.2fs",
                         type(exc.orig).__name__, attempt, DB_ATTEMPTS_MAX, wait)
                sleep(wait)
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()


def transient(exc: DBAPIError) -> bool:
    """Whether the database asks for the unit of work to be tried again (nothing was applied)."""
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate in PG_TRANSIENT_SQLSTATES
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in SQLITE_TRANSIENT_CODES
    return "database is locked" in str(orig)


def _sqlite_pragmas(connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()
