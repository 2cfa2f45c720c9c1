"""Hostile requests a customer can send to a running Serai, and a victim organization's streams
to watch while they arrive: tests/test_hostile_input.py checks that each is refused with a 4xx
in its wire's error format and that the victim's answers do not change, and
benchmarks/hostile_input.py measures the victim's latency beside them.

Each case is work an attacker chooses and the server must bound before admission: schemas whose
grammar would grow without end, bounds no grammar can spell, numbers no column can hold, stop
lists, prompts far past the context, keys that do not exist.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

OPENAI, ANTHROPIC = "openai", "anthropic"


@dataclass(frozen=True)
class Hostile:
    """One hostile request: where it goes, in which wire, and the param its refusal names
    (None: the refusal need not name one, such as a key that does not exist)."""

    name: str
    wire: str
    path: str
    body: dict[str, Any]
    param: str | None = None
    bad_key: bool = False

    @functools.cached_property
    def encoded(self) -> bytes:
        """The body as sent: encoded once, so a sender spends its time sending."""
        return json.dumps(self.body).encode()


def _fan_out(depth: int) -> dict[str, Any]:
    """A chain of distinct definitions, each object holding two references to the next: its
    full expansion has 2**depth leaves."""
    defs = {f"d{i}": {"type": "object", "properties": {"l": {"$ref": f"#/$defs/d{i + 1}"},
                                                        "r": {"$ref": f"#/$defs/d{i + 1}"}},
                      "required": ["l", "r"]} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def _wide(properties: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": {"type": "integer", "minimum": -10**15,
                                                       "maximum": 10**15}
                                             for i in range(properties)},
            "required": [f"p{i}" for i in range(properties)]}


HUGE_BOUNDS = {"type": "object", "properties": {
    "s": {"type": "string", "minLength": 10**9, "maxLength": 10**12},
    "a": {"type": "array", "items": {"type": "string"}, "minItems": 10**300},
    "n": {"type": "number", "minimum": -1e308, "maximum": 1e308}}, "required": ["s", "a"]}


def _openai(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], **extra}


def _anthropic(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "Hello"}],
            **extra}


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def _tool(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "description": "f", "parameters": schema}}


def cases(model: str) -> list[Hostile]:
    """Every hostile request, for `model`."""
    chat, messages = "/v1/chat/completions", "/v1/messages"
    far_too_long = "The quick brown fox jumps over the lazy dog. " * 80_000  # 3.6 MB
    return [
        Hostile("exponential $ref fan-out (response_format)", OPENAI, chat,
                _openai(model, response_format=_schema_format(_fan_out(40))), "response_format"),
        Hostile("exponential $ref fan-out (tools)", OPENAI, chat,
                _openai(model, tools=[_tool(_fan_out(40))], tool_choice="required"), "tools"),
        Hostile("exponential $ref fan-out (Anthropic tools)", ANTHROPIC, messages,
                _anthropic(model, tools=[{"name": "f", "description": "f",
                                          "input_schema": _fan_out(40)}],
                           tool_choice={"type": "any"}), "tools"),
        Hostile("huge length and item bounds", OPENAI, chat,
                _openai(model, response_format=_schema_format(HUGE_BOUNDS)), "response_format"),
        Hostile("ten thousand wide integer ranges", OPENAI, chat,
                _openai(model, response_format=_schema_format(_wide(10_000))), "response_format"),
        Hostile("max_tokens of 10**40", OPENAI, chat, _openai(model, max_tokens=10**40),
                "max_tokens"),
        Hostile("max_tokens of 10**40 (Anthropic)", ANTHROPIC, messages,
                {**_anthropic(model), "max_tokens": 10**40}, "max_tokens"),
        Hostile("negative n", OPENAI, chat, _openai(model, n=-5), "n"),
        Hostile("ten thousand stop sequences", OPENAI, chat,
                _openai(model, stop=[f"stop{i}" for i in range(10_000)]), "stop"),
        Hostile("a stop sequence of a megabyte (Anthropic)", ANTHROPIC, messages,
                _anthropic(model, stop_sequences=["x" * 2**20]), "stop_sequences"),
        Hostile("a prompt far past the context", OPENAI, chat,
                {"model": model, "messages": [{"role": "user", "content": far_too_long}]},
                "messages"),
        Hostile("an API key that does not exist", OPENAI, chat, _openai(model), None,
                bad_key=True),
    ]


@dataclass(frozen=True)
class Refusal:
    case: Hostile
    status: int
    seconds: float
    body: dict[str, Any]

    def problems(self) -> list[str]:
        """What is wrong with this answer to a hostile request (empty: a proper refusal)."""
        found = []
        if not 400 <= self.status < 500:
            found.append(f"status {self.status}, not a 4xx")
        error = self.body.get("error")
        if not isinstance(error, dict) or not error.get("message"):
            found.append(f"no error message in {str(self.body)[:200]}")
        elif self.case.wire == ANTHROPIC and self.body.get("type") != "error":
            found.append("not Anthropic's error envelope")
        elif self.case.wire == OPENAI and "param" not in error:
            found.append("not OpenAI's error envelope")
        elif (self.case.param is not None
              and not str(error.get("param") or "").startswith(self.case.param)
              and self.case.param not in str(error.get("message"))):
            found.append(f"the refusal does not name {self.case.param}: {error}")
        return found


def send(http: httpx.Client, case: Hostile, key: str) -> Refusal:
    """Send one hostile request; its answer and how long it took."""
    secret = "sk-serai-" + secrets.token_urlsafe(32) if case.bad_key else key
    headers = ({"x-api-key": secret, "anthropic-version": "2023-06-01"} if case.wire == ANTHROPIC
               else {"authorization": f"Bearer {secret}"})
    started = time.perf_counter()
    response = http.post(case.path, content=case.encoded, headers={
        **headers, "content-type": "application/json"})
    seconds = time.perf_counter() - started
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text[:200]}
    return Refusal(case, response.status_code, seconds, body if isinstance(body, dict) else {})


def stream_answer(http: httpx.Client, key: str, model: str, *, max_tokens: int = 24,
                  on_first: Callable[[], None] | None = None) -> tuple[str, float, float]:
    """One victim stream at temperature 0: its text, time to first content, total time."""
    body = {"model": model, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Name three rivers of Europe."}]}
    started = time.perf_counter()
    first = None
    parts: list[str] = []
    with http.stream("POST", "/v1/chat/completions", json=body,
                     headers={"authorization": f"Bearer {key}"}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"]
            text = delta[0]["delta"].get("content") if delta else None
            if text:
                if first is None:
                    first = time.perf_counter() - started
                    if on_first is not None:
                        on_first()
                parts.append(text)
    total = time.perf_counter() - started
    return "".join(parts), first if first is not None else total, total


def organization_key(http: httpx.Client, admin_key: str, name: str) -> str:
    """A new organization and its model key, through the admin API."""
    auth = {"authorization": f"Bearer {admin_key}"}
    org = http.post("/admin/v1/organizations", json={"name": name}, headers=auth)
    org.raise_for_status()
    key = http.post("/admin/v1/keys", json={"name": f"{name}-key", "org_id": org.json()["id"]},
                    headers=auth)
    key.raise_for_status()
    return str(key.json()["secret"])
