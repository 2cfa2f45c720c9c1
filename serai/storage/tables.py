"""The database tables. Migrations in storage/migrations/versions create exactly these."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


# Integer micro-units of money and epoch milliseconds of the database clock: exact, and the
# same on SQLite and PostgreSQL.
Money = BigInteger
Millis = BigInteger


class Organization(Base):
    """A tenant: owns keys, a plan, a price book assignment, a balance and limits."""

    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    plan_id: Mapped[int | None] = mapped_column(ForeignKey("plans.id"), nullable=True)
    price_book_id: Mapped[int | None] = mapped_column(ForeignKey("price_books.id"), nullable=True)
    # Settled money only; what running requests hold is in `reservations`.
    # Below zero only by usage charged beyond what its request held (serai.billing.settlement.charge):
    # admission and adjustments never take it below what running requests hold.
    balance_micros: Mapped[int] = mapped_column(Money, default=0)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Regions whose deployments may serve this organization; null or empty: any.
    allowed_regions: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    # What may be kept of its calls' content (serai/governance/retention.py): "zero" or "store" for
    # retention_days.
    retention: Mapped[str] = mapped_column(String(8), default="zero", server_default="zero")
    retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Plan(Base):
    """Rolling quota windows, per-model multipliers and rate limits an organization subscribes to."""

    __tablename__ = "plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # [{"metric": "requests"|"tokens"|"credits", "limit": int, "seconds": int}, ...]
    windows: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # {"model name": multiplier}; quota units a request of that model counts for.
    model_multipliers: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Prepaid: requests are charged to the balance. A pure subscription only counts windows.
    draws_balance: Mapped[bool] = mapped_column(Boolean, default=True)
    # Price ratio in thousandths (800 = 20% off the price book).
    price_ratio_milli: Mapped[int] = mapped_column(Integer, default=1000)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class PriceBook(Base):
    __tablename__ = "price_books"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    currency: Mapped[str] = mapped_column(String(8), default="USD")
    # [{"start_hour": 14, "end_hour": 18, "multiplier_milli": 3000}] in UTC hours.
    peak_hours: Mapped[list[dict[str, int]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Price(Base):
    """Prices of one model per million tokens, in micro-units of the book's currency."""

    __tablename__ = "prices"
    __table_args__ = (UniqueConstraint("price_book_id", "model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    price_book_id: Mapped[int] = mapped_column(ForeignKey("price_books.id"))
    model: Mapped[str] = mapped_column(String(200))
    input_micros: Mapped[int] = mapped_column(Money)
    cached_input_micros: Mapped[int] = mapped_column(Money)
    output_micros: Mapped[int] = mapped_column(Money)


class BalanceEntry(Base):
    """A top-up, adjustment or redemption: the balance is their sum minus settled charges."""

    __tablename__ = "balance_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    amount_micros: Mapped[int] = mapped_column(Money)
    kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Reservation(Base):
    """The worst case of a running request, held against its organization's limits until the
    request is settled to its real usage (or released by the sweeper after a crash)."""

    __tablename__ = "reservations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    request_id: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(64))
    amount_micros: Mapped[int] = mapped_column(Money)
    requests_milli: Mapped[int] = mapped_column(BigInteger)
    tokens_milli: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    max_tokens: Mapped[int] = mapped_column(Integer)
    created_ms: Mapped[int] = mapped_column(Millis)
    # Last renewed by the process running the request (None: never yet). The sweeper takes a
    # reservation only when neither this nor created_ms is within the timeout.
    renewed_ms: Mapped[int | None] = mapped_column(Millis, nullable=True)


class ApiKey(Base):
    """A key as stored: never the secret, only its SHA-256 and a short prefix to recognise it by."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Model keys belong to an organization; admin keys have a role in one (owner, admin, viewer)
    # or are the platform's operators (role "operator", no organization).
    org_id: Mapped[int | None] = mapped_column(ForeignKey("organizations.id"), nullable=True,
                                               index=True)
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    allowed_cidrs: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # A stricter retention than the organization's, or null to follow it.
    retention: Mapped[str | None] = mapped_column(String(8), nullable=True)
    retention_days: Mapped[int | None] = mapped_column(Integer, nullable=True)


class UsageRow(Base):
    """One row per request that reached an engine, whatever its outcome."""

    __tablename__ = "usage"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    model: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    org_id: Mapped[int | None] = mapped_column(ForeignKey("organizations.id"), nullable=True)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_micros: Mapped[int] = mapped_column(Money, default=0)
    # Whether cost_micros was taken from the balance (prepaid), or only counted (subscription).
    charged: Mapped[bool] = mapped_column(Boolean, default=False)
    # Quota units this request counted for in its plan's windows (thousandths, multipliers applied).
    requests_milli: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_milli: Mapped[int] = mapped_column(BigInteger, default=0)
    # The database clock when the row was settled: what rolling windows are measured against.
    created_ms: Mapped[int] = mapped_column(Millis, default=0)
    # The deployment that served the request, and its region (null: none was reached).
    region: Mapped[str | None] = mapped_column(String(64), nullable=True)
    deployment: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Running totals of the organization's and of the key's rows up to and including this one,
    # in (created_ms, id) order: a window's use is the newest row's total minus the total of
    # the newest row before the window (serai/billing/windows.py).
    org_count_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    org_raw_tokens_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    org_requests_milli_total: Mapped[int] = mapped_column(BigInteger, default=0,
                                                          server_default="0")
    org_tokens_milli_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    org_cost_total: Mapped[int] = mapped_column(Money, default=0, server_default="0")
    key_count_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    key_raw_tokens_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    __table_args__ = (Index("ix_usage_org_window", "org_id", "created_ms"),
                      Index("ix_usage_key_window", "key_id", "created_ms"))


class RedemptionCode(Base):
    """A prepaid code worth an amount, redeemed once into an organization's balance.

    A code is a bearer secret like a key: only its SHA-256 and a display prefix are stored.
    """

    __tablename__ = "redemption_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prefix: Mapped[str] = mapped_column(String(32), index=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Codes generated together share a batch label, to list or disable them as one.
    batch: Mapped[str] = mapped_column(String(100), index=True)
    amount_micros: Mapped[int] = mapped_column(Money)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    redeemed_by_org_id: Mapped[int | None] = mapped_column(ForeignKey("organizations.id"),
                                                           nullable=True)
    redeemed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class IdempotencyRecord(Base):
    """A model call made with an `Idempotency-Key`: in flight, or done with the response to
    replay. Scoped to the API key that made it; kept for 24 hours."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("key_id", "idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    idempotency_key: Mapped[str] = mapped_column(String(255))
    # SHA-256 of the method, path and body: the same key with another payload is refused.
    request_hash: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # "in_flight" or "done"
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    headers: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    # Sealed with the content key `cipher_key` (serai/governance/crypto.py); both null when the response
    # is kept only in the memory of the process that answered (zero retention).
    body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    cipher_key: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_ms: Mapped[int] = mapped_column(Millis, index=True)


class AuditRecord(Base):
    """One entry of the audit log: who did what to which object. Each entry's hash covers its
    fields and the previous entry's hash, so a changed or removed entry breaks the chain."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # An admin key's prefix, "cli", or "system" (a domain function called by neither).
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200))
    # No foreign key: the log must keep entries about anything, and never block a change.
    org_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class StoredCompletion(Base):
    """A chat completion made with `store: true` under a `store` retention policy: its request
    messages and response, encrypted (serai/governance/crypto.py), kept until `expires_ms`."""

    __tablename__ = "stored_completions"
    __table_args__ = (Index("ix_stored_completions_org", "org_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    completion_id: Mapped[str] = mapped_column(String(64), unique=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    model: Mapped[str] = mapped_column(String(200))
    # The caller's metadata, in clear so lists can filter on it (as OpenAI's do).
    tags: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    created_ms: Mapped[int] = mapped_column(Millis)
    expires_ms: Mapped[int] = mapped_column(Millis, index=True)
    # Id of the key the content is sealed with, and nonce + ciphertext + tag.
    cipher_key: Mapped[str] = mapped_column(String(32))
    content: Mapped[bytes] = mapped_column(LargeBinary)


class ConsoleSession(Base):
    """A browser signed in to the console with an admin key. The cookie carries a random token;
    only its SHA-256 is stored, so a copy of the database opens no session."""

    __tablename__ = "console_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    # Sent back in every form and htmx request: a page of another site cannot know it.
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_ms: Mapped[int] = mapped_column(Millis)
    expires_ms: Mapped[int] = mapped_column(Millis, index=True)
