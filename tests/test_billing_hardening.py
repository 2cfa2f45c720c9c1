"""Every token served is billed at its model's price (issue 16): a model asked for by an alias is
the model itself, a stream that outlives the reservation timeout is billed once and in full,
an upstream's usage above the admission estimate is charged, and a prompt in any script is
estimated conservatively.

Serai runs in process in front of mock upstreams on real ports (see tests/test_routing.py); each
test has its own priced organization.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from sqlalchemy import select

from serai.engines.upstream import estimate_prompt_tokens
from serai.governance import accounts
from serai.storage.tables import Organization
from serai.types import GenerationRequest, Message
from tests.support.admin_api import sdk
from tests.test_routing import MODEL, Api, _upstream, serai
from tests.test_upstream import MockServer

INPUT, OUTPUT = 2_000_000, 5_000_000  # micro-units per million tokens: 2 and 5 per token
PRICED = {"model": MODEL, "prices": (INPUT, OUTPUT), "balance": 10**9,
          "plan": {"model_multipliers": {MODEL: 3.0}, "rpm": 1000}}
CHAT = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture
def servers() -> Iterator[dict[str, MockServer]]:
    with MockServer() as a:
        yield {"a": a}


def _cost(prompt: int, completion: int) -> int:
    return -(-(prompt * INPUT + completion * OUTPUT) // 1_000_000)


def _balance(api: Api) -> int:
    with api.services.database.session() as session:
        return int(session.scalars(select(Organization.balance_micros)).one())


async def test_an_alias_is_admitted_priced_limited_and_recorded_as_its_model(
        tmp_path: Path, servers: dict[str, MockServer]) -> None:
    ups = [_upstream(servers["a"], "a", aliases=["bargain"])]
    async with serai(tmp_path, ups, tenant=PRICED) as api:
        by_name = await api.client.chat.completions.create(model=MODEL, messages=CHAT,
                                                           max_tokens=16)
        by_alias = await api.client.chat.completions.create(model="bargain", messages=CHAT,
                                                            max_tokens=16)
        first, second = await api.usage_rows()
        same = ("model", "prompt_tokens", "completion_tokens", "cost_micros", "charged",
                "requests_milli", "tokens_milli", "status")
        assert [getattr(second, f) for f in same] == [getattr(first, f) for f in same]
        assert first.model == MODEL and first.cost_micros > 0
        assert first.requests_milli == 3000  # the plan's multiplier for the model applies
        assert by_alias.usage == by_name.usage  # type: ignore[comparison-overlap]

        # A key limited to the model may use it by its alias, and one limited to another model
        # may not use it by either name, with the same refusal.
        with api.services.database.session() as session:
            org_id = session.scalars(select(Organization.id)).one()
            _, allowed = accounts.create_key(session=session, name="allowed", org_id=org_id,
                                             allowed_models=[MODEL])
            _, other = accounts.create_key(session=session, name="other", org_id=org_id,
                                           allowed_models=["something-else"])
        await sdk(api.http, allowed).chat.completions.create(model="bargain", messages=CHAT,
                                                            max_tokens=4)
        for name in (MODEL, "bargain"):
            with pytest.raises(openai.PermissionDeniedError, match="may not use the model 'up'"):
                await sdk(api.http, other).chat.completions.create(model=name, messages=CHAT)


async def test_a_stream_longer_than_the_reservation_timeout_is_billed_once_in_full(
        tmp_path: Path, servers: dict[str, MockServer]) -> None:
    # Ten chunks 0.3 s apart: the stream runs three times the timeout, and the sweeper looks
    # every third of it. Before leases it took the running request's reservation for a
    # crashed process's: an `interrupted` row at no charge, and the real usage dropped.
    servers["a"].mock.config.chunks = 10
    servers["a"].mock.config.delay_s = 0.3
    async with serai(tmp_path, [_upstream(servers["a"], "a")], tenant=PRICED,
                     reservation_timeout_s=1.0) as api:
        before = _balance(api)
        stream = await api.client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=32, stream=True,
            stream_options={"include_usage": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        assert usage is not None and usage.completion_tokens == 10
        [row] = await api.usage_rows()
        assert (row.status, row.completion_tokens) == ("ok", 10)
        assert row.cost_micros == _cost(usage.prompt_tokens, 10)
        assert before - _balance(api) == row.cost_micros
        assert api.reservations() == 0


async def test_usage_above_the_estimate_is_charged_in_full(
        tmp_path: Path, servers: dict[str, MockServer]) -> None:
    # The upstream counts far more prompt tokens than the estimate held (still fewer than the
    # bytes sent, so believable): the excess is charged, not forgiven.
    # The balance covers the hold (8 estimated prompt tokens and 8 completion tokens, 56
    # micro-units) and not the real cost: the balance goes below zero by the excess, and the
    # organization is refused until it tops up.
    servers["a"].mock.config.prompt_tokens = 40
    async with serai(tmp_path, [_upstream(servers["a"], "a")],
                     tenant={**PRICED, "balance": 60}) as api:
        answer = await api.client.chat.completions.create(model=MODEL, messages=CHAT,
                                                          max_tokens=8)
        assert answer.usage is not None and answer.usage.prompt_tokens == 40
        [row] = await api.usage_rows()
        assert row.cost_micros == _cost(40, answer.usage.completion_tokens) > 60
        assert _balance(api) == 60 - row.cost_micros < 0
        with pytest.raises(openai.RateLimitError) as refused:
            await api.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8)
        assert refused.value.code == "insufficient_quota"


@pytest.mark.parametrize("text", ["東京は日本の首都です。" * 20, "กรุงเทพมหานครเป็นเมืองหลวง" * 20,
                                  "Столица Японии — Токио. " * 20])
def test_the_upstream_estimate_errs_high_for_every_script(text: str) -> None:
    """About a token per CJK or Thai character, and more than one per two Cyrillic
    letters: more than these models' tokenizers use (the estimate counted characters / 4)."""
    request = GenerationRequest("r", MODEL, messages=(Message("user", text),))
    assert estimate_prompt_tokens(request) >= len(text) // 2 + 1


@pytest.mark.parametrize("max_tokens", [10**12, 2**63 + 1])
async def test_a_max_tokens_past_the_context_is_refused_before_anything_is_held(
        tmp_path: Path, servers: dict[str, MockServer], postgres_url: str, redis_url: str,
        redis_prefix: str, max_tokens: int) -> None:
    # The upstream engine took any max_tokens as the request's worst case: Redis's script set
    # the hold and then failed to add 10**12 tokens' cost to a counter, leaving the hold.
    import redis

    async with serai(tmp_path, [_upstream(servers["a"], "a")], tenant=PRICED,
                     database_url=postgres_url, redis_url=redis_url,
                     redis_prefix=redis_prefix) as api:
        with pytest.raises(openai.BadRequestError) as refused:
            await api.client.chat.completions.create(model=MODEL, messages=CHAT,
                                                     max_tokens=max_tokens)
        assert refused.value.status_code == 400 and "max_tokens" in str(refused.value.message)
        assert api.reservations() == 0 and await api.usage_rows() == []
        held = redis.Redis.from_url(redis_url)
        try:
            assert [k for k in held.scan_iter(match=f"{redis_prefix}:*holds*")] == []
        finally:
            held.close()
        await api.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8)
