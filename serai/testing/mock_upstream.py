"""A mock OpenAI-compatible server, to test and benchmark the upstream engine without a model.

It streams a scripted answer with a chosen latency per chunk, and fails on demand: 503 or 429
before any byte, a hang, a stream cut midway, no usage frame, absurd usage. In process:
`httpx.ASGITransport(app=MockUpstream().app)`; as a server:
`python -m serai.testing.mock_upstream --port 9100 --delay 0.01 --failure none`. Its settings
come from the constructor, MOCK_UPSTREAM_* variables or the command line, and can be changed
while it runs with `POST /config` (a JSON object of MockConfig fields). `GET /stats` counts the
requests: received, finished, and stopped early by a client that went away. `GET /v1/models`
(what health probes ask) fails with the same 503, 429, 401 and hang as the completions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

Failure = Literal["none", "503", "429", "400", "401", "hang", "cut", "no_usage", "absurd_usage"]
FAILURES: tuple[str, ...] = get_args(Failure)
# Put in error bodies, so tests can check an upstream's error body never reaches a client.
SECRET_IN_ERRORS = "mock-internal-detail-7f3a"


@dataclass
class MockConfig:
    reply: str = "The capital of Japan is Tokyo."
    chunks: int | None = None  # chunks per answer (words of `reply`, cycled); None: one per word
    delay_s: float = 0.0  # before each chunk
    failure: Failure = "none"
    cut_after: int = 2  # chunks sent before a "cut"
    tool_arguments: str = '{"city": "Paris"}'  # of the call made when tool_choice asks for one
    prompt_tokens: int | None = None  # reported in usage; None: a quarter of the prompt's chars

    @classmethod
    def from_env(cls) -> MockConfig:
        config = cls()
        for f in dataclasses.fields(cls):
            value = os.environ.get(f"MOCK_UPSTREAM_{f.name.upper()}")
            if value is not None:
                setattr(config, f.name, _parse(f.name, value))
        return config


def _parse(name: str, value: str) -> Any:
    if name == "chunks":
        return int(value) if value else None
    if name in ("delay_s",):
        return float(value)
    if name in ("cut_after", "prompt_tokens"):
        return int(value)
    return value


@dataclass
class Stats:
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    active: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)  # in process only
    authorizations: list[str | None] = field(default_factory=list)  # in process only


class MockUpstream:
    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config or MockConfig()
        self.stats = Stats()
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completion, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/stats", self._stats, methods=["GET"]),
            Route("/config", self._configure, methods=["POST"]),
        ])

    async def _stats(self, request: Request) -> Response:
        s = self.stats
        return JSONResponse({"requests": s.requests, "finished": s.finished,
                             "cancelled": s.cancelled, "active": s.active})

    async def _configure(self, request: Request) -> Response:
        changes = await request.json()
        names = {f.name for f in dataclasses.fields(MockConfig)}
        if not isinstance(changes, dict) or set(changes) - names or (
                changes.get("failure", "none") not in FAILURES):
            return JSONResponse({"error": {"message": "unknown setting"}}, status_code=400)
        self.config = dataclasses.replace(self.config, **changes)
        return JSONResponse(dataclasses.asdict(self.config))

    async def _models(self, request: Request) -> Response:
        failure = self.config.failure
        if failure in ("503", "429", "401"):
            return JSONResponse({"error": {"message": f"failing ({SECRET_IN_ERRORS})"}},
                                status_code=int(failure))
        if failure == "hang":
            await asyncio.sleep(3600)
        return JSONResponse({"object": "list", "data": [
            {"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}]})

    async def _chat(self, request: Request) -> Response:
        return await self._answer(request, chat=True)

    async def _completion(self, request: Request) -> Response:
        return await self._answer(request, chat=False)

    async def _answer(self, request: Request, *, chat: bool) -> Response:
        config = self.config
        body = await request.json()
        self.stats.requests += 1
        self.stats.bodies.append(body)
        self.stats.authorizations.append(request.headers.get("authorization"))
        if config.failure in ("503", "429", "400", "401"):
            status = int(config.failure)
            message = ("Invalid value for temperature." if status == 400
                       else f"overloaded ({SECRET_IN_ERRORS})")
            return JSONResponse({"error": {"message": message, "code": status}},
                                status_code=status)
        if config.failure == "hang":
            await asyncio.sleep(3600)
        return StreamingResponse(self._stream(body, config, chat=chat),
                                 media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any], config: MockConfig, *,
                      chat: bool) -> AsyncIterator[str]:
        self.stats.active += 1
        done = False
        created = int(time.time())
        base = {"id": "cmpl-mock", "created": created, "model": body.get("model", "mock"),
                "object": "chat.completion.chunk" if chat else "text_completion"}

        def frame(**fields: Any) -> str:
            return f"data: {json.dumps(base | fields)}\n\n"

        def choice(text: str = "", finish: str | None = None,
                   calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": finish}
            delta: dict[str, Any] = {"content": text} if text else {}
            if calls:
                delta["tool_calls"] = calls
            return {"index": 0, "delta": delta, "finish_reason": finish}

        try:
            words = [w + " " for w in config.reply.split()] or [""]
            words[-1] = words[-1].rstrip()
            count = config.chunks if config.chunks is not None else len(words)
            pieces = [words[i % len(words)] for i in range(count)]
            limit = body.get("max_tokens")
            finish = "stop"
            if isinstance(limit, int) and limit < len(pieces):
                pieces, finish = pieces[:limit], "length"
            tool = _tool_asked(body)
            if chat:
                yield frame(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None}])
            sent = 0
            if tool is not None:
                args = config.tool_arguments
                half = len(args) // 2
                parts = [[{"index": 0, "id": "call_mock_1", "type": "function",
                           "function": {"name": tool, "arguments": ""}}],
                         [{"index": 0, "function": {"arguments": args[:half]}}],
                         [{"index": 0, "function": {"arguments": args[half:]}}]]
                for part in parts:
                    await asyncio.sleep(config.delay_s)
                    yield frame(choices=[choice(calls=part)])
                sent, finish = len(parts), "tool_calls"
                pieces = []
            for n, piece in enumerate(pieces, start=1):
                await asyncio.sleep(config.delay_s)
                if config.failure == "cut" and n > config.cut_after:
                    raise ConnectionAbortedError("mock upstream cut the stream on purpose")
                last = n == len(pieces)
                yield frame(choices=[choice(piece, finish if last else None)])
                sent = n
            if not pieces:
                yield frame(choices=[choice("", finish)])
            prompt = config.prompt_tokens or _prompt_tokens(body)
            usage = {"prompt_tokens": prompt, "completion_tokens": sent,
                     "total_tokens": prompt + sent}
            if config.failure == "absurd_usage":
                usage = {"prompt_tokens": -3, "completion_tokens": 10**9,
                         "total_tokens": 10**9 - 3}
            if config.failure != "no_usage" and (body.get("stream_options") or {}).get(
                    "include_usage"):
                yield frame(choices=[], usage=usage)
            yield "data: [DONE]\n\n"
            done = True
        finally:
            self.stats.active -= 1
            if done:
                self.stats.finished += 1
            else:
                self.stats.cancelled += 1


def _tool_asked(body: dict[str, Any]) -> str | None:
    """The tool to call: the one tool_choice names, or the first when a call is required."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice", "auto")
    if not tools or choice in ("none", "auto"):
        return None
    if isinstance(choice, dict):
        return str(choice["function"]["name"])
    return str(tools[0]["function"]["name"])


def _prompt_tokens(body: dict[str, Any]) -> int:
    text = body.get("prompt") or " ".join(
        str(m.get("content") or "") for m in body.get("messages") or [])
    return max(1, math.ceil(len(text) / 4))


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    config = MockConfig.from_env()
    for f in dataclasses.fields(MockConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                            choices=FAILURES if f.name == "failure" else None)
    args = parser.parse_args(argv)
    for f in dataclasses.fields(MockConfig):
        value = getattr(args, f.name)
        if value is not None:
            setattr(config, f.name, _parse(f.name, value))
    uvicorn.run(MockUpstream(config).app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
