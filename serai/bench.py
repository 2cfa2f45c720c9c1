"""`serai bench`: a streaming load generator for any OpenAI-compatible server.

It owns the synthetic prompts, the request loop, SSE parsing and the metric arithmetic, with the
definitions of vLLM's `bench serve` (docs/benchmarks.md). It knows nothing of Serai's internals, so
the same run measures Serai, `python -m llama_cpp.server`, llama-server, vLLM or a mock.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

Mode = Literal["chat", "completions"]
CountedBy = Literal["usage", "tokenizer", "chunks"]
TokenCounter = Callable[[str], int]
MAX_KEPT_ERRORS = 5

# Short, frequent English words: most are a single token (with their leading space) in the
# SentencePiece/BPE vocabularies of current models, so a prompt of N words is about N tokens.
WORDS = tuple("""
the of and to in is you that it he was for on are as with his they at be this have from or one
had by word but not what all were we when your can said there use an each which she do how their
if will up other about out many then them these so some her would make like him into time has
look two more write go see number no way could people my than first water been call who oil its
now find long down day did get come made may part over new sound take only little work know place
year live me back give most very after thing our just name good sentence man think say great
where help through much before line right too mean old any same tell boy follow came want show
also around form three small set put end does another well large must big even such because turn
here why ask went men read need land different home us move try kind hand picture again change off
play spell air away animal house point page letter mother answer found study still learn should
world high every near add food between own below country plant last school father keep tree never
start city earth eye light thought head under story saw left few while along might close something
seem next hard open example begin life always those both paper together got group often run
""".split())


@dataclass(frozen=True)
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gemma-3-270m"
    api_key: str | None = None
    concurrency: int = 1
    num_prompts: int = 16
    input_len: int = 128
    output_len: int = 128
    mode: Mode = "chat"
    seed: int = 0
    timeout: float = 600.0
    # Server-specific fields merged into every body, like the OpenAI SDK's extra_body; e.g.
    # {"repeat_penalty": 1.0}, since llama_cpp.server defaults to 1.1 where others use 1.0.
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestRecord:
    """One request, with times in seconds from the moment it was sent."""

    ok: bool
    e2e: float
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    output_tokens: int = 0
    counted_by: CountedBy = "chunks"
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Mean, median and p99 of a metric, in milliseconds, over `count` samples."""

    count: int
    mean: float
    median: float
    p99: float

    @classmethod
    def of_seconds(cls, values: list[float]) -> Summary | None:
        if not values:
            return None
        ms = [v * 1000 for v in values]
        return cls(len(ms), sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 99))


@dataclass
class BenchResult:
    config: BenchConfig
    duration_s: float
    completed: int
    failed: int
    errors: list[str]
    total_input_tokens: int | None  # None when the server sent no usage frame
    total_output_tokens: int
    output_tokens_counted_by: list[CountedBy]  # "chunks" undercounts if a chunk holds 2+ tokens
    request_throughput: float
    output_throughput: float
    ttft_ms: Summary | None
    tpot_ms: Summary | None
    itl_ms: Summary | None
    e2e_ms: Summary | None
    requests: list[RequestRecord] = field(default_factory=list, repr=False)

    @classmethod
    def from_records(cls, config: BenchConfig, records: list[RequestRecord],
                     duration_s: float) -> BenchResult:
        done = [r for r in records if r.ok]
        prompt_counts = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
        output_tokens = sum(r.output_tokens for r in done)
        return cls(
            config=config,
            duration_s=duration_s,
            completed=len(done),
            failed=len(records) - len(done),
            errors=[r.error for r in records if r.error][:MAX_KEPT_ERRORS],
            total_input_tokens=sum(prompt_counts) if prompt_counts else None,
            total_output_tokens=output_tokens,
            output_tokens_counted_by=sorted({r.counted_by for r in done}),
            request_throughput=len(done) / duration_s if duration_s else 0.0,
            output_throughput=output_tokens / duration_s if duration_s else 0.0,
            ttft_ms=Summary.of_seconds([r.ttft for r in done if r.ttft is not None]),
            tpot_ms=Summary.of_seconds([r.tpot for r in done if r.tpot is not None]),
            itl_ms=Summary.of_seconds([gap for r in done for gap in r.itls]),
            e2e_ms=Summary.of_seconds([r.e2e for r in done]),
            requests=records,
        )

    def to_dict(self, *, detailed: bool = False) -> dict[str, Any]:
        """Everything as JSON-ready values; never the API key. `detailed` adds every request."""
        data = asdict(self)
        data["config"].pop("api_key")
        if not detailed:
            data.pop("requests")
        return data


def synthetic_prompts(*, count: int, input_len: int, seed: int) -> list[str]:
    """`count` distinct prompts of `input_len` random common words each, the same for a seed."""
    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < count:
        prompt = " ".join(rng.choices(WORDS, k=max(input_len, 1)))
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts


def request_body(config: BenchConfig, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": config.model, "max_tokens": config.output_len, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
        # vLLM and llama.cpp's llama-server keep generating to max_tokens; others ignore it.
        "ignore_eos": True,
    }
    if config.mode == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return {**body, **config.extra_body}


def _content(choice: dict[str, Any], mode: Mode) -> str | None:
    if mode == "chat":
        return (choice.get("delta") or {}).get("content")
    return choice.get("text")


async def send_request(client: httpx.AsyncClient, config: BenchConfig, prompt: str,
                       count_tokens: TokenCounter | None = None) -> RequestRecord:
    """Stream one request and time its content chunks; never raises for a server's failure.

    Output tokens come from the usage frame; without one, from `count_tokens(text)` if given
    (as vLLM's benchmark retokenizes), else one per content chunk.
    """
    path = "/chat/completions" if config.mode == "chat" else "/completions"
    chunk_times: list[float] = []
    pieces: list[str] = []
    usage: dict[str, Any] | None = None
    finished = False
    error: str | None = None
    start = time.perf_counter()
    try:
        async with client.stream("POST", path, json=request_body(config, prompt)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                error = f"HTTP {response.status_code}: {body[:300]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, `: ping` comments, `event:` lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    event = json.loads(data)
                    if event.get("error"):
                        detail = event["error"]
                        if isinstance(detail, dict):
                            detail = detail.get("message", detail)
                        error = f"error event: {detail}"
                        break
                    for choice in event.get("choices") or ():
                        content = _content(choice, config.mode)
                        if content:
                            chunk_times.append(time.perf_counter() - start)
                            pieces.append(content)
                        if choice.get("finish_reason"):
                            finished = True
                    if event.get("usage"):
                        usage = event["usage"]
    except (httpx.HTTPError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    e2e = time.perf_counter() - start
    if error is None and not finished:
        error = "stream ended without [DONE] or a finish_reason"
    record = RequestRecord(ok=error is None, e2e=e2e, chunk_times=chunk_times, text="".join(pieces),
                           output_tokens=len(chunk_times), error=error)
    if usage is not None and usage.get("completion_tokens") is not None:
        record.output_tokens, record.counted_by = int(usage["completion_tokens"]), "usage"
        record.prompt_tokens = usage.get("prompt_tokens")
    elif count_tokens is not None:
        record.output_tokens, record.counted_by = count_tokens(record.text), "tokenizer"
    return record


async def run_bench(config: BenchConfig, count_tokens: TokenCounter | None = None) -> BenchResult:
    """Send `num_prompts` streaming requests, at most `concurrency` at a time, as fast as served."""
    if config.concurrency < 1 or config.num_prompts < 1:
        raise ValueError("concurrency and num_prompts must be at least 1")
    prompts = synthetic_prompts(count=config.num_prompts, input_len=config.input_len,
                                seed=config.seed)
    headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.concurrency,
                          max_keepalive_connections=config.concurrency)
    records: list[RequestRecord | None] = [None] * len(prompts)
    pending = iter(enumerate(prompts))

    async with httpx.AsyncClient(base_url=config.base_url.rstrip("/"), headers=headers,
                                 limits=limits, timeout=config.timeout) as client:
        async def worker() -> None:
            for index, prompt in pending:  # a shared iterator: each prompt is taken once
                records[index] = await send_request(client, config, prompt, count_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, len(prompts)))))
        duration = time.perf_counter() - start
    return BenchResult.from_records(config, [r for r in records if r is not None], duration)


def run(config: BenchConfig, count_tokens: TokenCounter | None = None) -> BenchResult:
    return asyncio.run(run_bench(config, count_tokens))
