"""Tool calling and structured output on a model that has neither: prompt, grammar, reader.

The tools go into the system turn as an instruction; a call is the marker `<tool_call>`
followed by {"name": ..., "arguments": {...}}. A grammar makes the answer a valid call of an
offered tool (tool_choice required or a named tool), or lets the model choose between a call
and an answer that does not start with the marker (auto). Earlier calls and their results are
written into the conversation the same way, so a round trip reads naturally to the model.
`read_calls` turns the generated text back into a ToolCall. One call per answer at most.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

from serai.engines.grammar import (
    FREE_DEPTH,
    Grammar,
    SchemaConverter,
    SchemaError,
    literal,
    schema_rule,
)
from serai.errors import InvalidRequest
from serai.types import Chunk, GenerationRequest, Message, Tool, ToolCall

MARKER = "<tool_call>"


def offers_calls(request: GenerationRequest) -> bool:
    """Whether the answer to `request` may be a tool call."""
    return bool(request.tools) and request.tool_choice.mode != "none"


def _offered(request: GenerationRequest) -> tuple[Tool, ...]:
    choice = request.tool_choice
    if choice.mode == "none":
        return ()
    if choice.mode == "tool":
        chosen = tuple(t for t in request.tools if t.name == choice.name)
        if not chosen:
            raise InvalidRequest(f"tool_choice names the tool {choice.name!r}, which is not "
                                 "among the request's tools.", param="tool_choice")
        return chosen
    return request.tools


def arguments_schema(tool: Tool) -> dict[str, Any]:
    """A tool's parameters as the schema of an arguments object."""
    params = tool.parameters if isinstance(tool.parameters, dict) else {}
    return params if "type" in params else {**params, "type": "object"}


def _instruction(tools: Sequence[Tool], mode: str) -> str:
    lines = ["You can call these tools:"]
    for tool in tools:
        lines.append("")
        lines.append(f"{tool.name}: {tool.description}".rstrip(": "))
        lines.append("Arguments (JSON Schema): " + json.dumps(arguments_schema(tool),
                                                               separators=(",", ":")))
    example = tools[0].name
    lines += ["", f"To call a tool, answer with {MARKER} followed by a JSON object with the "
              f'tool\'s "name" and its "arguments", for example: {MARKER}{{"name": "{example}", '
              '"arguments": {...}}']
    if mode == "auto":
        lines.append("If no tool is needed, answer normally.")
    else:
        lines.append("Answer with a tool call now.")
    return "\n".join(lines)


def _call_text(call: ToolCall) -> str:
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError:
        arguments = call.arguments
    return MARKER + json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False)


def prompt_messages(request: GenerationRequest) -> tuple[Message, ...]:
    """The conversation in plain system/user/assistant turns: the tools instruction in the
    system turn, earlier calls as the text the model would write, tool results as user turns.

    System turns are joined into one leading system turn wherever they stand (Claude Code sends
    one after the first user turn): chat templates take a system message only first."""
    assert request.messages is not None
    tools = _offered(request)
    names = {c.id: c.name for m in request.messages for c in m.tool_calls}
    systems = [m.content for m in request.messages if m.role == "system"]
    if tools:
        systems.append(_instruction(tools, request.tool_choice.mode))
    out = [Message("system", "\n\n".join(systems))] if systems else []
    for m in request.messages:
        if m.role == "system":
            continue
        elif m.role == "assistant" and m.tool_calls:
            text = "\n".join([*([m.content] if m.content else []),
                              *(_call_text(c) for c in m.tool_calls)])
            out.append(Message("assistant", text))
        elif m.role == "tool":
            name = names.get(m.tool_call_id or "", "the tool")
            out.append(Message("user", f"Result of {name}: {m.content}"))
        else:
            out.append(Message(m.role, m.content))
    return tuple(out)


def answer_grammar(request: GenerationRequest) -> str | None:
    """GBNF for the answer, or None when it is free text. Raises InvalidRequest for a schema
    that cannot be read or is too large (all the request's schemas share one grammar Budget),
    and for a tool_choice naming no tool."""
    tools = _offered(request)
    fmt = request.response_format
    called = any(m.tool_calls for m in request.messages or ())
    if not tools and fmt is None:
        # Earlier calls in the conversation invite the model to write another one as text.
        return _text_grammar() if called else None
    g = Grammar()
    structured = None
    if fmt is not None:
        try:
            if fmt.type == "json_object":
                converter = SchemaConverter(g, {})
                structured = converter._free_object(converter.free(FREE_DEPTH - 1), "json")
            else:
                structured = schema_rule(g, fmt.schema if fmt.schema is not None else {}, "answer")
        except SchemaError as exc:
            raise InvalidRequest(f"The schema of the response format cannot be used: {exc}",
                                 param="response_format") from None
    if not tools:
        assert structured is not None
        return g.render(f'" "? {structured}')
    calls = []
    for i, tool in enumerate(tools):
        try:
            args = schema_rule(g, arguments_schema(tool), f"{tool.name}-args")
        except SchemaError as exc:
            raise InvalidRequest(f"The schema of the parameters of tool {tool.name!r} cannot be "
                                 f"used: {exc}", param=f"tools.[{i}]") from None
        name = literal(json.dumps(tool.name))
        calls.append(f'{name} ws "," ws "\\"arguments\\"" ws ":" ws {args}')
    call = g.rule(f'{literal(MARKER)} ws "{{" ws "\\"name\\"" ws ":" ws ({" | ".join(calls)}) '
                  'ws "}"', "call")
    if request.tool_choice.mode != "auto":
        return g.render(f'" "? {call}')
    return g.render(f'" "? ({call} | {structured or _text_rule(g)})')


def _text_grammar() -> str:
    g = Grammar()
    return g.render(f'" "? {_text_rule(g)}')


def _text_rule(g: Grammar) -> str:
    """Any text that does not begin with the marker (a leading space is the transcript's)."""
    anything = g.rule("[^\\x00]*", "any")
    avoid = _not_prefix(g, MARKER[1:], anything)
    return g.rule(f'([^<\\x20] {anything} | "<" {avoid})?', "text")


def _not_prefix(g: Grammar, rest: str, anything: str) -> str:
    """Text that ends before it has spelled `rest`, or leaves it at some character."""
    body = ""
    for c in reversed(rest):
        deviate = f"[^{_class_char(c)}] {anything}"
        body = f"({deviate} | {literal(c)} {body})?" if body else f"({deviate})?"
    return g.rule(body, "not-marker")


def _class_char(c: str) -> str:
    return "\\" + c if c in "]\\^-[" else c


def parse_call(text: str, names: Sequence[str]) -> ToolCall | None:
    """The call in `text` (the marker and a JSON object), or None if it is not a whole one."""
    body = text.strip()
    if not body.startswith(MARKER):
        return None
    try:
        value = json.loads(body[len(MARKER):])
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=f"call_{secrets.token_hex(12)}", name=value["name"],
                    arguments=json.dumps(arguments, ensure_ascii=False))


async def read_calls(chunks: AsyncIterator[Chunk], request: GenerationRequest
                     ) -> AsyncIterator[Chunk]:
    """Pass text through, but hold it while it may still begin a call; a call is collected
    and ends the answer as one Chunk with tool_calls and finish_reason "tool_calls". A call
    cut short (max_tokens, a stop sequence) is never sent: the answer ends without it."""
    names = [t.name for t in request.tools]
    held = ""
    calling = None  # None: undecided
    async for chunk in chunks:
        if calling is False:
            yield chunk
            continue
        held += chunk.text
        probe = held.lstrip()
        if calling is None:
            if probe.startswith(MARKER):
                calling = True
            elif MARKER.startswith(probe) and chunk.finish_reason is None:
                continue
            else:
                calling = False
                yield Chunk(held, chunk.usage, chunk.finish_reason)
                continue
        if chunk.finish_reason is None:
            continue
        call = parse_call(probe, names) if chunk.finish_reason == "stop" else None
        if call is None:
            yield Chunk("", chunk.usage, chunk.finish_reason)
        else:
            yield Chunk("", chunk.usage, "tool_calls", (call,))
        return
