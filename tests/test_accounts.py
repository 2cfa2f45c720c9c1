"""Keys, balances and redemption codes on a real database (SQLite and PostgreSQL): minting,
authenticating, revoking; adjustments and codes that never make or take money twice."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from serai.billing import database_limits, plans, settlement
from serai.billing.base import UsageRecord
from serai.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound
from serai.governance import accounts
from serai.storage.db import Database
from tests.support.tenants import customer

SECRET = re.compile(r"sk-serai-[A-Za-z0-9_-]{43}")


def create(database: Database, name: str = "app", *, is_admin: bool = False) -> tuple[accounts.KeyInfo, str]:
    with database.session() as session:
        return accounts.create_key(session=session, name=name, is_admin=is_admin)


def authenticate(database: Database, secret: str) -> accounts.KeyInfo:
    with database.session() as session:
        return accounts.authenticate(session=session, secret=secret)


def revoke(database: Database, ref: str) -> accounts.KeyInfo:
    with database.session() as session:
        return accounts.revoke_key(session=session, ref=ref)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive UTC datetimes, PostgreSQL aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def test_created_secret_has_the_scheme_and_43_url_safe_characters(database: Database) -> None:
    info, secret = create(database, "ci", is_admin=True)
    assert SECRET.fullmatch(secret)
    assert secret.startswith(info.prefix)
    assert (info.name, info.is_admin, info.revoked) == ("ci", True, False)
    assert create(database)[1] != secret


def test_the_database_never_holds_the_secret(database: Database) -> None:
    _, secret = create(database)
    random_part = secret.removeprefix(accounts.KEY_SCHEME)
    # The display prefix holds six random characters; anything longer would be a leak.
    windows = {random_part[i : i + 8] for i in range(len(random_part) - 7)}
    with database.engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM api_keys")).all()
    assert len(rows) == 1
    for value in rows[0]:
        stored = str(value)
        assert secret not in stored
        assert not any(window in stored for window in windows), stored


def test_authenticate_returns_the_key(database: Database) -> None:
    info, secret = create(database, "app")
    create(database, "other")
    assert authenticate(database, secret) == info


@pytest.mark.parametrize("mangle", [
    pytest.param(lambda s: s[:-1] + ("A" if s[-1] != "A" else "B"), id="wrong-last-character"),
    pytest.param(lambda s: s[:20], id="truncated"),
    pytest.param(lambda s: s + "x", id="extra-character"),
    pytest.param(lambda s: "sk-other-" + s.removeprefix("sk-serai-"), id="wrong-scheme"),
    pytest.param(lambda s: s.upper(), id="upper-case"),
    pytest.param(lambda s: "Bearer " + s, id="with-bearer"),
    pytest.param(lambda s: "", id="empty"),
    pytest.param(lambda s: "sk-serai-", id="scheme-only"),
])
def test_anything_but_the_exact_secret_is_refused(database: Database, mangle: Callable[[str], str]) -> None:
    _, secret = create(database)
    with pytest.raises(AuthenticationFailed, match="Incorrect API key"):
        authenticate(database, mangle(secret))


def test_refusal_message_never_echoes_the_whole_secret(database: Database) -> None:
    _, secret = create(database)
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    with pytest.raises(AuthenticationFailed) as caught:
        authenticate(database, wrong)
    assert wrong[: accounts.PREFIX_LENGTH] in caught.value.message
    assert wrong[accounts.PREFIX_LENGTH : accounts.PREFIX_LENGTH + 8] not in caught.value.message


@pytest.mark.parametrize("by", ["id", "prefix"])
def test_revoked_key_is_refused_with_a_message_saying_so(database: Database, by: str) -> None:
    info, secret = create(database)
    _, other = create(database, "other")
    revoked = revoke(database, str(info.id) if by == "id" else info.prefix)
    assert revoked.id == info.id
    assert revoked.revoked_at is not None
    with pytest.raises(AuthenticationFailed, match="revoked"):
        authenticate(database, secret)
    assert authenticate(database, other).name == "other"


def test_revoke_by_prefix_as_listed_with_its_ellipsis(database: Database) -> None:
    info, secret = create(database)
    revoke(database, info.prefix + "…")
    with pytest.raises(AuthenticationFailed, match="revoked"):
        authenticate(database, secret)


def test_revoking_twice_keeps_the_first_revocation_time(database: Database) -> None:
    info, _ = create(database)
    first = revoke(database, str(info.id)).revoked_at
    assert first is not None
    assert revoke(database, str(info.id)).revoked_at == first
    # A key revoked long ago keeps that date when someone revokes it again today.
    long_ago = datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    with database.session() as session:
        accounts.find_key(session=session, ref=str(info.id)).revoked_at = long_ago
    again = revoke(database, info.prefix).revoked_at
    assert again is not None and as_utc(again) == long_ago


@pytest.mark.parametrize("ref", ["999", "sk-serai-zzzzzz", "nonsense", ""])
def test_find_unknown_key_is_not_found(database: Database, ref: str) -> None:
    create(database)
    with database.session() as session, pytest.raises(NotFound, match="No API key"):
        accounts.find_key(session=session, ref=ref)


def test_find_key_with_an_out_of_range_id_is_not_found(database: Database) -> None:
    with database.session() as session, pytest.raises(NotFound):
        accounts.find_key(session=session, ref="99999999999999999999")


def test_list_and_count_keys(database: Database) -> None:
    with database.session() as session:
        assert accounts.list_keys(session=session) == []
        assert accounts.count_keys(session=session) == 0
    first, _ = create(database, "first")
    second, _ = create(database, "second", is_admin=True)
    revoke(database, str(first.id))
    with database.session() as session:
        listed = accounts.list_keys(session=session)
        active = accounts.list_keys(session=session, include_revoked=False)
        count = accounts.count_keys(session=session)
    assert [(k.name, k.prefix, k.is_admin, k.revoked) for k in listed] == [
        ("first", first.prefix, False, True),
        ("second", second.prefix, True, False),
    ]
    assert [k.id for k in active] == [second.id]
    assert count == 2


def test_an_adjustment_cannot_take_money_running_requests_hold(database: Database) -> None:
    with database.session() as session:
        org = accounts.create_org(session=session, name="acme")
        book = plans.create_price_book(session=session, name="book")
        plans.set_price(session=session, price_book_id=book.id, model="m",
                        input_micros=1_000_000, output_micros=1_000_000)
        accounts.update_org(session=session, org_id=org.id, price_book_id=book.id)
        accounts.adjust_balance(session=session, org_id=org.id, amount_micros=100,
                                kind="topup", reason="t")
        key, _ = accounts.create_key(session=session, name="app", org_id=org.id)
        admission = database_limits.admit(session=session, key=key, request_id="r", model="m",
                                 endpoint="chat", prompt_tokens=30, max_tokens=30)
    assert admission.amount_micros == 60
    with pytest.raises(InvalidRequest, match="60 of them held by running requests"), \
            database.session() as session:
        accounts.adjust_balance(session=session, org_id=org.id, amount_micros=-41,
                                kind="adjustment", reason="too much")
    with database.session() as session:
        assert accounts.adjust_balance(session=session, org_id=org.id, amount_micros=-40,
                                       kind="adjustment", reason="ok").balance_micros == 60
    # The running request settles at its worst case, and the balance is exactly enough.
    with database.session() as session:
        settlement.write_usage(session=session, records=[UsageRecord(
            request_id="r", key_id=key.id, model="m", endpoint="chat", prompt_tokens=30,
            completion_tokens=30, status="ok", ttft_ms=1.0, latency_ms=2.0,
            admission=admission)])
    with database.session() as session:
        assert accounts.find_org(session=session, ref=org.id).balance_micros == 0


def test_an_adjustment_racing_an_admission_never_takes_what_it_holds(database: Database) -> None:
    """The admission commits its hold while the adjustment waits for the organization's lock:
    the adjustment must see the hold. (On PostgreSQL, READ COMMITTED, a single conditional
    UPDATE re-checked the row after the wait but summed the reservations from before it.)"""
    with database.session() as session:
        made = customer(session, model="m", prices=(1_000_000, 1_000_000), balance=100)
    admitted, commit = threading.Event(), threading.Event()

    def admission() -> None:
        with database.session(write=True) as session:
            database_limits.admit(session=session, key=made.key, request_id="r", model="m",
                         endpoint="chat", prompt_tokens=50, max_tokens=50)
            admitted.set()
            commit.wait(10)

    outcome: list[str] = []

    def take_everything() -> None:
        try:
            with database.session() as session:
                accounts.adjust_balance(session=session, org_id=made.org_id,
                                        amount_micros=-100, kind="adjustment", reason="race")
            outcome.append("taken")
        except InvalidRequest as refused:
            outcome.append(refused.message)

    admitting = threading.Thread(target=admission)
    admitting.start()
    assert admitted.wait(10)
    taking = threading.Thread(target=take_everything)
    taking.start()
    time.sleep(0.5)  # the adjustment now waits for the organization's lock
    commit.set()
    admitting.join(10)
    taking.join(10)
    assert len(outcome) == 1 and "100 of them held by running requests" in outcome[0]
    with database.session() as session:
        assert accounts.find_org(session=session, ref=made.org_id).balance_micros == 100


def test_a_redemption_code_is_redeemed_once_whoever_tries(database: Database) -> None:
    with database.session() as session:
        first = accounts.create_org(session=session, name="first")
        second = accounts.create_org(session=session, name="second")
        [(_, code)] = accounts.generate_codes(session=session, count=1, amount_micros=500,
                                              batch="b")
    with database.session() as session:
        assert accounts.redeem_code(session=session, org_id=first.id,
                                    code=f" {code} ").balance_micros == 500
    with pytest.raises(Conflict, match="redeemed already"), database.session() as session:
        accounts.redeem_code(session=session, org_id=second.id, code=code)
    with database.session() as session:
        assert accounts.find_org(session=session, ref=second.id).balance_micros == 0
        [info] = accounts.list_codes(session=session)
        assert (info.redeemed_by_org_id, code.startswith(info.prefix)) == (first.id, True)


def test_an_expired_redemption_code_is_refused(database: Database) -> None:
    with database.session() as session:
        org = accounts.create_org(session=session, name="late")
        [(_, code)] = accounts.generate_codes(
            session=session, count=1, amount_micros=500, batch="b",
            expires_at=datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(InvalidRequest, match="expired"), database.session() as session:
        accounts.redeem_code(session=session, org_id=org.id, code=code)
