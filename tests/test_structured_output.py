"""Property: whatever the schema, the real model's tool arguments and structured answers parse and
validate against it (jsonschema is the judge). Every example runs the bundled model greedily,
with a grammar built from a generated schema; the engine is shared by all of them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from serai.engines.llamacpp import LlamaCppEngine
from serai.types import (
    Chunk,
    GenerationRequest,
    Message,
    ResponseFormat,
    SamplingParams,
    Tool,
    ToolChoice,
)

NAMES = st.from_regex(r"[a-z][a-z_]{0,9}", fullmatch=True)
WORDS = st.text(alphabet="abcdefghij xyz", min_size=1, max_size=8)


def scalars() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.sampled_from([{"type": "string"}, {"type": "integer"}, {"type": "number"},
                         {"type": "boolean"}, {"type": "string", "description": "a name"}]),
        st.lists(WORDS, min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
        st.tuples(st.integers(-50, 50), st.integers(0, 2000)).map(
            lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
        st.integers(1, 20).map(lambda n: {"type": "string", "maxLength": n}),
        st.integers(1, 3).map(lambda n: {"type": "string", "minLength": n}),
    )


def objects(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    def with_required(props: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.tuples(st.lists(st.sampled_from(sorted(props)), unique=True), st.booleans()).map(
            lambda t: {"type": "object", "properties": props, "required": t[0],
                       **({"additionalProperties": False} if t[1] else {})})

    return st.dictionaries(NAMES, values, min_size=1, max_size=4).flatmap(with_required)


def arrays(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    # Mostly bounded, so that examples stay short; unbounded ones meet the engine's cap.
    return st.tuples(values, st.integers(0, 2), st.integers(2, 4) | st.none()).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1],
                   **({"maxItems": t[2]} if t[2] is not None else {})})


SCHEMAS = objects(st.recursive(scalars(), lambda inner: objects(inner) | arrays(inner),
                               max_leaves=6))


@pytest.fixture(scope="module")
def engine(bundled_gguf: Path) -> Iterator[LlamaCppEngine]:
    built = LlamaCppEngine(bundled_gguf, name="m", context_length=2048, parallel=2,
                           queue_size=2)
    yield built
    asyncio.run(built.aclose())


def run(engine: LlamaCppEngine, request: GenerationRequest) -> Chunk:
    async def go() -> Chunk:
        await engine.measure(request)
        chunks = [c async for c in engine.generate(request)]
        assert all(c.finish_reason is None for c in chunks[:-1])
        last = chunks[-1]
        return Chunk("".join(c.text for c in chunks), last.usage, last.finish_reason,
                     last.tool_calls)

    return asyncio.run(go())


ASK = (Message("user", "Fill in an example."),)
SAMPLING = SamplingParams(temperature=0, max_tokens=200)


# No shrinking: every step would run the model again; a failure prints its schema as is.
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS, as_tool=st.booleans())
def test_generated_json_validates_against_its_schema(
    engine: LlamaCppEngine, schema: dict[str, Any], as_tool: bool
) -> None:
    if as_tool:
        request = GenerationRequest("p", "m", messages=ASK, sampling=SAMPLING,
                                    tools=(Tool("fill", "Fill in the form.", schema),),
                                    tool_choice=ToolChoice("required"))
    else:
        request = GenerationRequest("p", "m", messages=ASK, sampling=SAMPLING,
                                    response_format=ResponseFormat("json_schema", schema, "form"))
    answer = run(engine, request)
    if answer.finish_reason == "length":
        # Cut short: never a call; the bounded grammar makes this rare, not impossible.
        assert not answer.tool_calls
        return
    if as_tool:
        assert answer.finish_reason == "tool_calls", answer
        assert len(answer.tool_calls) == 1 and answer.tool_calls[0].name == "fill"
        value = json.loads(answer.tool_calls[0].arguments)
    else:
        assert answer.finish_reason == "stop"
        value = json.loads(answer.text)
    jsonschema.validate(value, schema)
    assert answer.usage.completion_tokens > 0
