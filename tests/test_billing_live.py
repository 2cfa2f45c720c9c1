"""Issue 4's "done when", end to end with the real bundled model: an operator sets up an
organization with a plan and prices from the CLI, its key spends the balance down through the
OpenAI SDK, the usage and the invoice show exactly what the ledger holds, and a redemption code
tops it up again."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime

import httpx
import openai
import pytest
from sqlalchemy import select

from serai.storage.tables import Organization, UsageRow
from tests.conftest import LiveServer

pytestmark = pytest.mark.live

MODEL = "gemma-3-270m"
QUESTION = [{"role": "user", "content": "Name a colour."}]
TOP_UP_MICROS = 60_000


def cli(server: LiveServer, *args: str) -> str:
    result = server.cli(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_an_organization_spends_its_balance_through_the_sdk_and_is_billed_exactly(
        live_server: LiveServer) -> None:
    # 100 per million input tokens and 400 per million output tokens: 100 and 400 micro-units
    # a token, so a short chat of at most 16 tokens costs a few thousand.
    cli(live_server, "plans", "create", "e2e-plan", "--window", "requests:1000:1d")
    cli(live_server, "prices", "create-book", "e2e-book", "--currency", "EUR")
    cli(live_server, "prices", "set", "e2e-book", MODEL, "--input", "100", "--output", "400")
    cli(live_server, "orgs", "create", "e2e", "--plan", "e2e-plan", "--price-book", "e2e-book")
    key = cli(live_server, "keys", "create", "--org", "e2e", "--name", "app").strip()
    owner = cli(live_server, "keys", "create", "--org", "e2e", "--role", "owner",
                "--name", "boss").strip()
    cli(live_server, "balance", "topup", "e2e", "0.06", "--reason", "first invoice")

    client = openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key=key, max_retries=0)
    answered = []
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(50):
            answered.append(client.chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=16, temperature=0))
    assert refused.value.code == "insufficient_quota"
    assert "balance" in refused.value.message
    assert len(answered) >= 2

    headers = {"authorization": f"Bearer {key}"}
    usage = httpx.get(f"{live_server.base_url}/v1/usage", headers=headers).json()
    month = datetime.now(UTC).strftime("%Y-%m")
    invoice = httpx.get(f"{live_server.base_url}/v1/invoices/{month}", headers=headers).json()
    database = live_server.database
    try:
        with database.session() as session:
            org = session.scalar(select(Organization).where(Organization.name == "e2e"))
            assert org is not None
            rows = list(session.scalars(select(UsageRow).where(UsageRow.org_id == org.id)))
            balance = org.balance_micros
    finally:
        database.dispose()

    # What the SDK was told, what the ledger holds, and what the customer sees all agree.
    assert len(rows) == len(answered)
    assert sum(r.completion_tokens for r in rows) == sum(
        a.usage.completion_tokens for a in answered if a.usage)
    assert sum(r.prompt_tokens for r in rows) == sum(
        a.usage.prompt_tokens for a in answered if a.usage)
    spent = TOP_UP_MICROS - balance
    assert spent == sum(r.cost_micros for r in rows) > 0
    for row in rows:
        assert row.cost_micros == row.prompt_tokens * 100 + row.completion_tokens * 400
    [day] = usage["data"]
    assert (day["requests"], day["charged_micros"]) == (len(answered), spent)
    assert invoice["total_micros"] == spent and invoice["currency"] == "EUR"
    as_csv = cli(live_server, "invoices", "e2e", month, "--csv")
    assert list(csv.DictReader(io.StringIO(as_csv)))[-1]["amount_micros"] == str(spent)

    code = cli(live_server, "balance", "codes", "generate", "--count", "1", "--amount", "1",
               "--batch", "e2e").strip()
    redeemed = httpx.post(f"{live_server.base_url}/admin/v1/organizations/{org.id}/redeem",
                          headers={"authorization": f"Bearer {owner}"}, json={"code": code})
    assert redeemed.status_code == 200, redeemed.text
    assert redeemed.json()["balance_micros"] == balance + 1_000_000
    again = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16)
    assert again.choices[0].message.content is not None
