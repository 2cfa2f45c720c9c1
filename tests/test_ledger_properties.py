"""Reserve, settle, release and sweep in any order keep the money right (a hypothesis state machine).

The machine drives the real ledger functions on a real database (SQLite and PostgreSQL) for one
prepaid organization, keeps its own account of what should have happened, and after every step
checks the database against it: the balance is the top-ups minus the settled charges, it never
goes below zero nor below what running requests hold, a reservation lives exactly as long as its
request runs, and every request ends with at most one usage row.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, func, select, update

from serai.billing.base import Admission, UsageRecord, UsageStatus
from serai.billing.database_limits import admit
from serai.billing.settlement import release, sweep_reservations, write_usage
from serai.errors import InvalidRequest, QuotaExceeded
from serai.governance import accounts
from serai.governance.accounts import KeyInfo
from serai.storage.db import Database
from serai.storage.tables import BalanceEntry, Organization, Reservation, UsageRow
from tests.support.tenants import customer

# Prices per million tokens and a plan discount chosen so that costs are fractions of a
# micro-unit and rounding matters.
INPUT, CACHED_INPUT, OUTPUT, RATIO_MILLI = 1_300_000, 400_000, 2_700_000, 900
MODEL = "fake-model"
STALE_S = 60  # a reservation aged past this is one a crashed process left behind


def expected_cost(prompt: int, completion: int, cached: int = 0) -> int:
    """The price of this usage, worked out apart from serai.billing.plans (rounded up to a micro-unit)."""
    base = (prompt - cached) * INPUT + cached * CACHED_INPUT + completion * OUTPUT
    return -(-base * RATIO_MILLI // (1_000_000 * 1000))


@dataclass
class Request:
    request_id: str
    admission: Admission
    prompt: int
    max_tokens: int
    state: str = "running"  # running -> settled | released | swept
    aged: bool = False
    status: str | None = None  # of its usage row, once it has one
    cost: int = 0


class LedgerMachine(RuleBasedStateMachine):
    database: Database  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.topped_up = 0  # net of adjustments that took money back
        # Charged by late settlements: money the sweeper had already given back to others, so
        # the balance may end below zero by at most this much.
        self.late = 0

    @initialize()
    def open_account(self) -> None:
        tag = uuid.uuid4().hex[:10]
        with self.database.session() as session:
            made = customer(session, name=f"org-{tag}", model=MODEL,
                            plan={"price_ratio_milli": RATIO_MILLI}, prices=(INPUT, OUTPUT),
                            cached_price=CACHED_INPUT)
        self.key: KeyInfo = made.key
        self.org_id = made.org_id

    # -- what can happen -------------------------------------------------------------------

    @rule(amount=st.integers(1, 400))
    def top_up(self, amount: int) -> None:
        with self.database.session() as session:
            accounts.adjust_balance(session=session, org_id=self.org_id, amount_micros=amount,
                                    kind="topup", reason="property test")
        self.topped_up += amount

    @rule(amount=st.integers(1, 400))
    def take_back(self, amount: int) -> None:
        """An adjustment may take only money no running request holds."""
        free = self.balance - self.held
        try:
            with self.database.session() as session:
                accounts.adjust_balance(session=session, org_id=self.org_id,
                                        amount_micros=-amount, kind="adjustment",
                                        reason="property test")
        except InvalidRequest:
            assert amount > free, f"refused to take {amount} of {free} free"
            return
        assert amount <= free, f"took {amount} with only {free} free"
        self.topped_up -= amount

    @rule(prompt=st.integers(0, 60), max_tokens=st.integers(1, 120))
    def admit_request(self, prompt: int, max_tokens: int) -> None:
        worst = expected_cost(prompt, max_tokens)
        available = self.balance - self.held
        request_id = f"req-{uuid.uuid4().hex}"
        try:
            with self.database.session() as session:
                admission = admit(session=session, key=self.key, request_id=request_id,
                                  model=MODEL, endpoint="chat.completions",
                                  prompt_tokens=prompt, max_tokens=max_tokens)
        except QuotaExceeded:
            assert worst > available, f"refused a request costing {worst} with {available} free"
            return
        self.requests.append(Request(request_id, admission, prompt, max_tokens))
        assert worst <= available, f"admitted a request costing {worst} with {available} free"
        assert admission.amount_micros == worst and admission.charged == (worst > 0)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), status=st.sampled_from(["ok", "cancelled", "error"]),
          twice_in_one_batch=st.booleans())
    def settle(self, data: st.DataObject, status: UsageStatus, twice_in_one_batch: bool) -> None:
        request = data.draw(st.sampled_from(self.running))
        completion = data.draw(st.integers(0, request.max_tokens), label="completion")
        cached = data.draw(st.integers(0, request.prompt), label="cached")
        record = self.record(request, status, completion, cached)
        with self.database.session() as session:
            write_usage(session=session, records=[record, record] if twice_in_one_batch else [record])
        request.state, request.status = "settled", status
        request.cost = expected_cost(request.prompt, completion, cached)

    @precondition(lambda self: self.ended)
    @rule(data=st.data(), status=st.sampled_from(["ok", "cancelled", "error"]))
    def settle_again(self, data: st.DataObject, status: UsageStatus) -> None:
        """A record for a request already settled or released (a retried batch) changes
        nothing. One for a request the sweeper took while it still ran (its owner was cut off
        from the database past the timeout) is the late settlement: billed in full, once, its
        row replacing the `interrupted` one."""
        request = data.draw(st.sampled_from(self.ended))
        record = self.record(request, status, request.max_tokens, 0)
        with self.database.session() as session:
            write_usage(session=session, records=[record])
        if request.state == "swept":
            request.state, request.status = "settled", status
            request.cost = expected_cost(request.prompt, request.max_tokens)
            self.late += request.cost

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def release_unrun(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.running))
        with self.database.session() as session:
            release(session=session, admission=request.admission)
        request.state = "released"

    @precondition(lambda self: any(not r.aged for r in self.running))
    @rule(data=st.data())
    def crash_leaves_behind(self, data: st.DataObject) -> None:
        """The process running this request died: its reservation just grows old."""
        request = data.draw(st.sampled_from([r for r in self.running if not r.aged]))
        with self.database.session() as session:
            session.execute(update(Reservation)
                            .where(Reservation.id == request.admission.reservation_id)
                            .values(created_ms=Reservation.created_ms - 2 * STALE_S * 1000))
        request.aged = True

    @rule()
    def sweep(self) -> None:
        with self.database.session() as session:
            swept = sweep_reservations(session=session, older_than_s=STALE_S)
        stale = [r for r in self.running if r.aged]
        assert swept == len(stale)
        for request in stale:
            request.state, request.status, request.cost = "swept", "interrupted", 0

    # -- what must always hold -------------------------------------------------------------

    @invariant()
    def balance_is_top_ups_minus_charges(self) -> None:
        with self.database.session() as session:
            balance = session.scalar(select(Organization.balance_micros)
                                     .where(Organization.id == self.org_id))
            charged = session.scalar(select(func.coalesce(func.sum(UsageRow.cost_micros), 0))
                                     .where(UsageRow.org_id == self.org_id, UsageRow.charged))
            entries = session.scalar(select(func.coalesce(func.sum(BalanceEntry.amount_micros), 0))
                                     .where(BalanceEntry.org_id == self.org_id))
            held = session.scalar(select(func.coalesce(func.sum(Reservation.amount_micros), 0))
                                  .where(Reservation.org_id == self.org_id))
        assert entries == self.topped_up
        assert charged == sum(r.cost for r in self.requests)
        assert balance == self.topped_up - charged == self.balance
        assert balance >= -self.late
        assert held == self.held
        assert balance - held >= -self.late

    @invariant()
    def a_reservation_lives_as_long_as_its_request(self) -> None:
        with self.database.session() as session:
            held = set(session.scalars(select(Reservation.request_id)
                                       .where(Reservation.org_id == self.org_id)))
        assert held == {r.request_id for r in self.running}

    @invariant()
    def one_row_per_request_that_ran(self) -> None:
        with self.database.session() as session:
            rows = session.execute(select(UsageRow.request_id, UsageRow.status,
                                          UsageRow.cost_micros)
                                   .where(UsageRow.org_id == self.org_id)).all()
        by_request: dict[str, list[tuple[str, int]]] = {}
        for request_id, status, cost in rows:
            by_request.setdefault(request_id, []).append((status, cost))
        expected = {r.request_id: [(r.status, r.cost)] for r in self.requests
                    if r.state in ("settled", "swept")}
        # Running and released requests have no row: a released request never ran.
        assert by_request == expected

    def teardown(self) -> None:
        # Leave nothing held, so the next example's sweep counts only its own reservations.
        with self.database.session() as session:
            session.execute(delete(Reservation).where(Reservation.org_id == self.org_id))

    # -- the model's own account -----------------------------------------------------------

    @property
    def running(self) -> list[Request]:
        return [r for r in self.requests if r.state == "running"]

    @property
    def ended(self) -> list[Request]:
        return [r for r in self.requests if r.state != "running"]

    @property
    def held(self) -> int:
        return sum(r.admission.amount_micros for r in self.running)

    @property
    def balance(self) -> int:
        return self.topped_up - sum(r.cost for r in self.requests)

    def record(self, request: Request, status: UsageStatus, completion: int,
               cached: int) -> UsageRecord:
        return UsageRecord(request_id=request.request_id, key_id=self.key.id, model=MODEL,
                           endpoint="chat.completions", prompt_tokens=request.prompt,
                           completion_tokens=completion, cached_tokens=cached, status=status,
                           ttft_ms=None, latency_ms=1.0, admission=request.admission)


# A passing run takes seconds; a failing one shrinks its example for up to five minutes (the cap
# Hypothesis sets itself) and must not be cut short before it can show the smallest one.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_reserve_settle_release_sweep_keep_the_money_right(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    url = (f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'serai.db'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_url"))
    database = Database(url)
    database.upgrade()
    machine = type("LedgerOn" + backend.capitalize(), (LedgerMachine,), {"database": database})
    try:
        run_state_machine_as_test(machine, settings=settings(
            max_examples=30, stateful_step_count=30, deadline=None,
            suppress_health_check=[HealthCheck.too_slow]))
    finally:
        database.dispose()
