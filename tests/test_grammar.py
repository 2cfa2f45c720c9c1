"""JSON Schema to GBNF: real-world tool schemas never fail, and llama.cpp parses every grammar.

What the grammars accept is checked on the real model in tests/test_structured_output.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from serai.engines import grammar
from serai.engines.grammar import SchemaError, json_object_grammar, schema_grammar
from serai.engines.tool_calls import MARKER, answer_grammar, parse_call, prompt_messages
from serai.errors import InvalidRequest
from serai.types import GenerationRequest, Message, Tool, ToolCall, ToolChoice

DRAFT7 = "http://json-schema.org/draft-07/schema#"

# The shapes of Claude Code's tools: $schema, additionalProperties, enums, bounds, formats,
# defaults, arrays of objects, anyOf.
CLAUDE_CODE_TOOLS: dict[str, dict[str, Any]] = {
    "Bash": {"type": "object", "properties": {
        "command": {"type": "string", "description": "The command to execute"},
        "timeout": {"type": "number", "description": "Optional timeout in ms (max 600000)",
                    "maximum": 600000},
        "description": {"type": "string"},
        "run_in_background": {"type": "boolean"}},
        "required": ["command"], "additionalProperties": False, "$schema": DRAFT7},
    "Edit": {"type": "object", "properties": {
        "file_path": {"type": "string"}, "old_string": {"type": "string"},
        "new_string": {"type": "string"},
        "replace_all": {"type": "boolean", "default": False}},
        "required": ["file_path", "old_string", "new_string"], "additionalProperties": False,
        "$schema": DRAFT7},
    "MultiEdit": {"type": "object", "properties": {
        "file_path": {"type": "string"},
        "edits": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "old_string": {"type": "string"}, "new_string": {"type": "string"},
            "replace_all": {"type": "boolean", "default": False}},
            "required": ["old_string", "new_string"], "additionalProperties": False}}},
        "required": ["file_path", "edits"], "additionalProperties": False, "$schema": DRAFT7},
    "TodoWrite": {"type": "object", "properties": {"todos": {"type": "array", "items": {
        "type": "object", "properties": {
            "content": {"type": "string", "minLength": 1},
            "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
            "activeForm": {"type": "string", "minLength": 1}},
        "required": ["content", "status", "activeForm"], "additionalProperties": False}}},
        "required": ["todos"], "additionalProperties": False, "$schema": DRAFT7},
    "Grep": {"type": "object", "properties": {
        "pattern": {"type": "string"}, "path": {"type": "string"},
        "output_mode": {"type": "string", "enum": ["content", "files_with_matches", "count"]},
        "-A": {"type": "number"}, "-i": {"type": "boolean"},
        "head_limit": {"type": "number", "exclusiveMinimum": 0},
        "multiline": {"type": "boolean"}},
        "required": ["pattern"], "additionalProperties": False, "$schema": DRAFT7},
    "Read": {"type": "object", "properties": {
        "file_path": {"type": "string"}, "offset": {"type": "integer", "minimum": 0},
        "limit": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991}},
        "required": ["file_path"], "additionalProperties": False, "$schema": DRAFT7},
    "WebFetch": {"type": "object", "properties": {
        "url": {"type": "string", "format": "uri"}, "prompt": {"type": "string"}},
        "required": ["url", "prompt"], "additionalProperties": False, "$schema": DRAFT7},
    "WebSearch": {"type": "object", "properties": {
        "query": {"type": "string", "minLength": 2},
        "allowed_domains": {"type": "array", "items": {"type": "string"}},
        "blocked_domains": {"type": "array", "items": {"type": "string"}}},
        "required": ["query"], "additionalProperties": False, "$schema": DRAFT7},
    "NotebookEdit": {"type": "object", "properties": {
        "notebook_path": {"type": "string"}, "cell_id": {"type": "string"},
        "new_source": {"type": "string"},
        "cell_type": {"type": "string", "enum": ["code", "markdown"]},
        "edit_mode": {"type": "string", "enum": ["replace", "insert", "delete"]}},
        "required": ["notebook_path", "new_source"], "additionalProperties": False,
        "$schema": DRAFT7},
    "AskUser": {"type": "object", "properties": {"questions": {
        "type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "object", "properties": {
            "question": {"type": "string"},
            "options": {"type": "array", "items": {"anyOf": [
                {"type": "string"}, {"type": "object", "properties": {
                    "label": {"type": "string"}, "description": {"type": "string"}},
                    "required": ["label"]}]}},
            "multiSelect": {"type": "boolean"}}, "required": ["question", "options"]}}},
        "required": ["questions"], "$schema": DRAFT7},
    "ExitPlanMode": {"type": "object", "properties": {"plan": {"type": "string"}},
                     "required": ["plan"], "additionalProperties": {}, "$schema": DRAFT7},
    "McpAnything": {"type": "object", "additionalProperties": True},
    "Pydantic": {"$defs": {"Item": {"properties": {
        "name": {"title": "Name", "type": "string"},
        "price": {"anyOf": [{"type": "number"}, {"type": "null"}], "default": None}},
        "required": ["name", "price"], "title": "Item", "type": "object",
        "additionalProperties": False}},
        "properties": {"items": {"items": {"$ref": "#/$defs/Item"}, "type": "array"},
                       "when": {"type": "string", "format": "date-time"},
                       "id": {"type": "string", "format": "uuid"}},
        "required": ["items"], "type": "object", "additionalProperties": False},
}

ODD_BUT_FINE: list[Any] = [
    True, {}, {"type": ["string", "null"]}, {"type": "string", "nullable": True},
    {"not": {"type": "string"}}, {"type": "string", "pattern": "^[a-z]+$"},
    {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
    {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
               {"properties": {"b": {"type": "integer"}}}]},
    {"$defs": {"node": {"type": "object", "properties": {
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
     "$ref": "#/$defs/node"},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "integer", "minimum": 1000, "maximum": 10_000_000},
    {"type": "integer", "maximum": -1000}, {"type": "integer", "minimum": -100000},
    {"type": "number", "minimum": 0.5, "exclusiveMaximum": 10},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": "boolean"}], "items": False},
    {"type": "array", "items": [{"type": "string"}], "minItems": 1},
    {"type": "array", "minItems": 40, "items": {"type": "boolean"}},
    {"type": "string", "minLength": 300}, {"type": "string", "maxLength": 3},
    {"type": "string", "format": "email"}, {"type": "string", "format": "date"},
    {"enum": ["a\"b", "back\\slash", "new\nline", 1, None, {"x": [1]}]},
    {"const": "caf\u00e9"}, {"type": "object", "required": ["a"]},
    {"type": "object", "properties": {"\u00fcber \"quoted\"": {"type": "string"}}},
    {"type": "object", "properties": {}, "additionalProperties": False},
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"anyOf": [{"type": "string"}, {"type": "integer"}], "description": "either"},
]

NOT_SCHEMAS: list[Any] = [
    "string", {"type": "strin"}, {"enum": []}, {"$ref": "https://example.com/s.json"},
    {"$ref": "#/$defs/missing"}, {"type": "object", "properties": ["a"]},
    {"type": "object", "required": "a"}, {"type": "integer", "minimum": 5, "maximum": 1},
    False,
]


@pytest.fixture(scope="module")
def vocab(bundled_gguf: Path) -> Iterator[llama_cpp.llama_vocab_p]:
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(bundled_gguf).encode(), params)
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


def parses(vocab: llama_cpp.llama_vocab_p, gbnf: str) -> bool:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


@pytest.mark.parametrize("name", CLAUDE_CODE_TOOLS)
def test_real_world_tool_schemas_become_grammars_llama_cpp_parses(
    vocab: llama_cpp.llama_vocab_p, name: str
) -> None:
    assert parses(vocab, schema_grammar(CLAUDE_CODE_TOOLS[name]))


@pytest.mark.parametrize("schema", ODD_BUT_FINE, ids=lambda s: str(s)[:40])
def test_unsupported_keywords_are_loosened_not_refused(
    vocab: llama_cpp.llama_vocab_p, schema: Any
) -> None:
    assert parses(vocab, schema_grammar(schema))


@pytest.mark.parametrize("schema", NOT_SCHEMAS, ids=lambda s: str(s)[:40])
def test_what_is_not_a_schema_is_refused_with_a_reason(schema: Any) -> None:
    with pytest.raises(SchemaError):
        schema_grammar(schema)


def test_all_tools_at_once_with_every_choice(vocab: llama_cpp.llama_vocab_p) -> None:
    tools = tuple(Tool(n, f"The {n} tool", s) for n, s in CLAUDE_CODE_TOOLS.items())
    for choice in (ToolChoice("auto"), ToolChoice("required"), ToolChoice("tool", "Edit")):
        gbnf = answer_grammar(request(tools=tools, tool_choice=choice))
        assert gbnf is not None and parses(vocab, gbnf)
    assert answer_grammar(request(tools=tools, tool_choice=ToolChoice("none"))) is None
    assert parses(vocab, json_object_grammar())


def test_unbounded_strings_and_arrays_are_capped() -> None:
    gbnf = schema_grammar({"type": "object", "properties": {
        "s": {"type": "string"}, "a": {"type": "array", "items": {"type": "integer"}}},
        "required": ["s", "a"]})
    rules = dict(line.split(" ::= ", 1) for line in gbnf.splitlines())
    # A counting chain: rule k means k characters (items) written; the last can only close.
    assert rules[f"str-{grammar.MAX_STRING_CHARS}"] == '"\\""'
    assert f"str-{grammar.MAX_STRING_CHARS + 1}" not in rules
    assert rules[f"value-a-items-{grammar.MAX_ARRAY_ITEMS}"] == '"]"'
    # A bound the schema asks for wins when it is tighter.
    short = dict(line.split(" ::= ", 1)
                 for line in schema_grammar({"type": "string", "maxLength": 3}).splitlines())
    assert short["chars-3"] == '"\\""' and "chars-4" not in short


def test_a_choice_naming_no_tool_is_an_invalid_request() -> None:
    tools = (Tool("a", "", {"type": "object"}),)
    with pytest.raises(InvalidRequest) as err:
        answer_grammar(request(tools=tools, tool_choice=ToolChoice("tool", "b")))
    assert err.value.param == "tool_choice"
    with pytest.raises(InvalidRequest) as bad:
        answer_grammar(request(tools=(Tool("a", "", {"type": "strin"}),)))
    assert bad.value.param == "tools.[0]"


def test_a_round_trip_is_written_into_the_conversation() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    messages = prompt_messages(request(
        messages=(Message("system", "Be brief."), Message("user", "Weather in Paris?"),
                  Message("assistant", "", tool_calls=(call,)),
                  Message("tool", "18 C, sunny", tool_call_id="call_1")),
        tools=(Tool("get_weather", "Current weather", {"type": "object"}),)))
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0].content.startswith("Be brief.\n\nYou can call these tools:")
    assert "get_weather: Current weather" in messages[0].content
    assert messages[2].content == MARKER + '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert messages[3].content == "Result of get_weather: 18 C, sunny"


def test_system_turns_are_read_as_one_leading_system_turn() -> None:
    messages = prompt_messages(request(
        messages=(Message("system", "Be brief."), Message("user", "Hi"),
                  Message("system", "cwd: /tmp"), Message("user", "Where am I?"))))
    assert [(m.role, m.content) for m in messages] == [
        ("system", "Be brief.\n\ncwd: /tmp"), ("user", "Hi"), ("user", "Where am I?")]


def test_only_a_whole_call_of_an_offered_tool_is_read() -> None:
    call = parse_call(f' {MARKER}{{"name": "a", "arguments": {{"x": 1}}}}', ["a"])
    assert call is not None and call.name == "a" and call.arguments == '{"x": 1}'
    assert call.id.startswith("call_")
    assert parse_call(f'{MARKER}{{"name": "a", "arguments": {{"x": 1}}', ["a"]) is None
    assert parse_call(f'{MARKER}{{"name": "b", "arguments": {{}}}}', ["a"]) is None
    assert parse_call('{"name": "a", "arguments": {}}', ["a"]) is None


def request(**fields: Any) -> GenerationRequest:
    fields.setdefault("messages", (Message("user", "hi"),))
    return GenerationRequest("r", "m", **fields)
