"""Work done for a request before it is admitted is bounded (issue 16): checks that need no
engine come before tokenizing, token counting has a rate and an allowed-models check like every
model call, and what the server keeps in memory for requests is bounded in bytes.

In process, on a fake engine that counts what it was asked to measure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest

from serai.api.idempotency import ResponsesInMemory, Stored
from serai.config import Settings
from serai.governance import accounts
from serai.types import GenerationRequest
from tests.support.admin_api import Admin, admin_api
from tests.support.fake_engine import FakeEngine
from tests.support.tenants import customer

CHAT = [{"role": "user", "content": "What is the capital of Japan?"}]


class MeasuringEngine(FakeEngine):
    """Counts how often a prompt was tokenized (measured), the work admission must not buy
    for a request it refuses anyway."""

    measured: int = 0

    async def measure(self, request: GenerationRequest):  # type: ignore[no-untyped-def]
        self.measured += 1
        return await super().measure(request)


@pytest.fixture
def engine() -> MeasuringEngine:
    return MeasuringEngine()


@pytest.fixture
async def api(tmp_path: Path, engine: MeasuringEngine) -> AsyncIterator[Admin]:
    async with admin_api(Settings(data_dir=tmp_path, count_tokens_rpm=5), engine) as api:
        yield api


def _key(api: Admin, **terms: object) -> str:
    with api.services.database.session() as session:
        org = customer(session, name=f"org-{len(terms)}-{id(terms)}")
        _, secret = accounts.create_key(session=session, name="k", org_id=org.org_id,
                                        **terms)  # type: ignore[arg-type]
    return secret


def _anthropic(api: Admin, secret: str) -> anthropic.AsyncAnthropic:
    # The anthropic SDK brings its own httpx fork.
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=api.app), base_url="http://serai")
    return anthropic.AsyncAnthropic(base_url="http://serai", api_key=secret, http_client=http,
                                    max_retries=0)


async def test_a_model_the_key_may_not_use_is_refused_before_it_is_tokenized(
        api: Admin, engine: MeasuringEngine) -> None:
    secret = _key(api, allowed_models=["another-model"])
    with pytest.raises(openai.PermissionDeniedError, match="may not use the model"):
        await api.sdk(secret).chat.completions.create(model=engine.name, messages=CHAT)
    with pytest.raises(anthropic.PermissionDeniedError, match="may not use the model"):
        await _anthropic(api, secret).messages.create(model=engine.name, messages=CHAT,
                                                      max_tokens=8)
    assert engine.measured == 0


async def test_a_key_past_its_rpm_is_refused_without_tokenizing_until_the_window_frees(
        api: Admin, engine: MeasuringEngine) -> None:
    secret = _key(api, rpm=2)
    client = api.sdk(secret)
    for _ in range(2):
        await client.chat.completions.create(model=engine.name, messages=CHAT)
    with pytest.raises(openai.RateLimitError) as first:
        await client.chat.completions.create(model=engine.name, messages=CHAT)
    measured = engine.measured
    for _ in range(20):  # a flood past the limit
        with pytest.raises(openai.RateLimitError) as again:
            await client.chat.completions.create(model=engine.name, messages=CHAT)
    assert engine.measured == measured, "refused requests were tokenized"
    assert again.value.code == first.value.code == "rate_limit_exceeded"
    assert 1 <= int(again.value.response.headers["retry-after"]) <= 60
    # Another key of the same engine is not affected.
    await api.sdk(_key(api)).chat.completions.create(model=engine.name, messages=CHAT)


async def test_token_counting_checks_allowed_models_and_has_a_rate(
        api: Admin, engine: MeasuringEngine) -> None:
    refused = _anthropic(api, _key(api, allowed_models=["another-model"]))
    with pytest.raises(anthropic.PermissionDeniedError, match="may not use the model"):
        await refused.messages.count_tokens(model=engine.name, messages=CHAT)
    assert engine.measured == 0

    counting = _anthropic(api, _key(api))
    for _ in range(5):  # count_tokens_rpm in this app
        counted = await counting.messages.count_tokens(model=engine.name, messages=CHAT)
        assert counted.input_tokens == 6
    with pytest.raises(anthropic.RateLimitError) as limited:
        await counting.messages.count_tokens(model=engine.name, messages=CHAT)
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(limited.value.response.headers["retry-after"]) >= 1
    assert engine.measured == 5


def test_responses_kept_in_memory_are_bounded_in_bytes() -> None:
    memory = ResponsesInMemory(max_entries=1000, max_bytes=10_000)

    def answer(n: int, size: int) -> Stored:
        return Stored(f"req-{n}", 200, {}, b"x" * size)

    for n in range(50):
        memory.keep(1, f"k{n}", answer(n, 900))
    assert memory.bytes <= 10_000
    assert memory.find(1, "k49", "req-49") is not None  # the newest are kept
    assert memory.find(1, "k0", "req-0") is None  # the oldest made way
    memory.keep(1, "huge", answer(99, 5_000))  # more than a tenth of the budget: not kept
    assert memory.find(1, "huge", "req-99") is None and memory.bytes <= 10_000
    memory.keep(1, "k49", answer(49, 10))  # replaced, not counted twice
    assert memory.bytes == sum(len(s.body or b"") for _, s in memory._kept.values())
