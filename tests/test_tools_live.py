"""Tool calling and structured output on a live server with the real bundled model, driven by
the official openai SDK: the SDK is the judge of the wire format, jsonschema of the JSON."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.live

MODEL = "gemma-3-270m"
WEATHER_ARGS = {"type": "object", "properties": {
    "city": {"type": "string", "description": "The city, e.g. Paris"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False}
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": WEATHER_ARGS}}
TIME: Any = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


def client(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def test_a_tool_round_trip(live_server: LiveServer, api_key: str) -> None:
    sdk = client(live_server, api_key)
    first = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME],
                                        tool_choice="required", temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function"
    call = calls[0]
    assert call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    jsonschema.validate(arguments, WEATHER_ARGS if call.function.name == "get_weather"  # type: ignore[union-attr]
                        else TIME["function"]["parameters"])
    assert first.usage is not None and first.usage.completion_tokens > 5

    history: Any = [*ASK, choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
    final = sdk.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME],
                                        tool_choice="none", temperature=0, max_tokens=40)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length")
    assert not answer.message.tool_calls
    assert (answer.message.content or "").strip()
    assert "<tool_call>" not in (answer.message.content or "")


def test_a_named_tool_is_the_one_called(live_server: LiveServer, api_key: str) -> None:
    completion = client(live_server, api_key).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = completion.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_time"]  # type: ignore[union-attr]
    assert "city" in json.loads(calls[0].function.arguments)  # type: ignore[union-attr]


def test_tool_choice_none_answers_in_text(live_server: LiveServer, api_key: str) -> None:
    completion = client(live_server, api_key).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", temperature=0,
        max_tokens=30)
    message = completion.choices[0].message
    assert not message.tool_calls and message.content
    assert completion.choices[0].finish_reason in ("stop", "length")


def test_auto_answers_with_text_or_a_valid_call(live_server: LiveServer, api_key: str) -> None:
    for messages in (ASK, [{"role": "user", "content": "Say hello."}]):
        completion = client(live_server, api_key).chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=60)
        choice = completion.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments),  # type: ignore[union-attr]
                                WEATHER_ARGS)
        else:
            assert choice.message.content and "<tool_call>" not in choice.message.content


def test_streamed_tool_call_through_the_sdk_stream_helper(
    live_server: LiveServer, api_key: str
) -> None:
    sdk = client(live_server, api_key)
    with sdk.chat.completions.stream(model=MODEL, messages=ASK, tools=[WEATHER],
                                     tool_choice="required", temperature=0,
                                     max_tokens=80) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    done = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(done) == 1 and done[0].name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(done[0].arguments), WEATHER_ARGS)  # type: ignore[union-attr]
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls and choice.message.tool_calls[0].id.startswith("call_")

    raw = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                      tool_choice="required", temperature=0, max_tokens=80,
                                      stream=True)
    chunks = [c for c in raw if c.choices]
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert deltas[0][0].id and deltas[0][0].function.name == "get_weather"  # type: ignore[union-attr]
    arguments = "".join(d[0].function.arguments or "" for d in deltas)  # type: ignore[union-attr]
    jsonschema.validate(json.loads(arguments), WEATHER_ARGS)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_call_cut_short_by_max_tokens_is_never_sent(
    live_server: LiveServer, api_key: str
) -> None:
    completion = client(live_server, api_key).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0,
        max_tokens=6)
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert not choice.message.tool_calls
    assert completion.usage is not None and completion.usage.completion_tokens == 6


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int
    # Bounded: at temperature 0 the 270M model may repeat list items until max_tokens (it
    # does on some CPUs, whose float rounding picks another greedy path), and the grammar
    # must hold it to maxItems.
    landmarks: list[str] = pydantic.Field(max_length=3)


def test_parse_with_a_pydantic_model(live_server: LiveServer, api_key: str) -> None:
    completion = client(live_server, api_key).chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris."}],
        response_format=City, temperature=0, max_tokens=300)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert len(choice.message.parsed.landmarks) <= 3


def test_json_object_is_a_json_object(live_server: LiveServer, api_key: str) -> None:
    completion = client(live_server, api_key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me a person as JSON."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_bad_tool_requests_are_400s(live_server: LiveServer, api_key: str) -> None:
    sdk = client(live_server, api_key)
    with pytest.raises(openai.BadRequestError) as unknown:
        sdk.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                    tool_choice={"type": "function",
                                                 "function": {"name": "get_time"}})
    assert unknown.value.body["param"] == "tool_choice"  # type: ignore[index]
    bad_schema: Any = {"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "strin"}}}}}
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=MODEL, messages=ASK, tools=[bad_schema])
    assert bad.value.body["param"] == "tools.[0]"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as legacy:
        sdk.chat.completions.create(model=MODEL, messages=ASK,
                                    functions=[WEATHER["function"]])
    assert legacy.value.body["param"] == "functions"  # type: ignore[index]
    assert sdk.models.list().data  # the server is fine afterwards
