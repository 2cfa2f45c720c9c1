"""`serai bench` measures any OpenAI-compatible streaming server with vLLM's metric definitions.

Each test serves a real uvicorn server on an ephemeral port in this process: Serai with a fake
engine, or a tiny Starlette app that speaks the OpenAI SSE format the way other servers do.
Nothing here checks speed; benchmarks/ does.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from typer.testing import CliRunner

from serai.api.deps import Services
from serai.app import create_app
from serai.bench import BenchConfig, BenchResult, percentile, run, synthetic_prompts
from serai.cli import app as cli_app
from serai.config import Settings
from serai.governance import accounts
from serai.testing.processes import free_port
from tests.support.fake_engine import FakeEngine
from tests.support.serving import serving

REPLY = " ".join(f"word{i}" for i in range(40))


def check_metrics(result: BenchResult, content_chunks: int) -> None:
    """The summaries agree with the per-request records, whatever the server."""
    done = result.requests
    assert result.ttft_ms is not None and result.e2e_ms is not None and result.itl_ms is not None
    for record in done:
        assert len(record.chunk_times) == content_chunks
        assert record.ttft is not None and 0 < record.ttft <= record.e2e
        assert record.chunk_times == sorted(record.chunk_times)
    assert result.itl_ms.count == sum(len(r.chunk_times) - 1 for r in done)
    ttfts = [r.ttft * 1000 for r in done if r.ttft is not None]
    assert result.ttft_ms.median == pytest.approx(percentile(ttfts, 50))
    assert result.ttft_ms.p99 == pytest.approx(percentile(ttfts, 99))
    assert result.ttft_ms.mean == pytest.approx(sum(ttfts) / len(ttfts))
    assert result.ttft_ms.median <= result.e2e_ms.median
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1000 for r in done if r.ttft is not None]
    assert result.tpot_ms is not None
    assert result.tpot_ms.median == pytest.approx(percentile(tpots, 50))
    assert result.request_throughput == pytest.approx(result.completed / result.duration_s)
    assert result.output_throughput == pytest.approx(result.total_output_tokens / result.duration_s)


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    values = [float(v) for v in [5, 1, 4, 2, 3]]
    assert percentile(values, 50) == 3
    assert percentile(values, 0) == 1 and percentile(values, 100) == 5
    assert percentile(values, 99) == pytest.approx(4.96)  # numpy.percentile(..., 99)
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([7.0], 99) == 7


def test_prompts_are_distinct_deterministic_and_about_input_len_words() -> None:
    prompts = synthetic_prompts(count=50, input_len=16, seed=3)
    assert len(set(prompts)) == 50
    assert all(len(p.split()) == 16 for p in prompts)
    assert prompts == synthetic_prompts(count=50, input_len=16, seed=3)
    assert prompts != synthetic_prompts(count=50, input_len=16, seed=4)


@pytest.mark.parametrize("mode", ["chat", "completions"])
def test_bench_against_serai_with_a_fake_engine(tmp_path: Path, mode: str) -> None:
    engine = FakeEngine(reply=REPLY, context_length=4096, delay=0.002)
    app = create_app(Settings(data_dir=tmp_path), engines=[engine])
    with serving(app) as base_url:
        services: Services = app.state.services
        with services.database.session() as session:
            _, key = accounts.create_key(session=session, name="bench")
        config = BenchConfig(base_url=base_url, model="fake-model", api_key=key, concurrency=3,
                             num_prompts=7, input_len=20, output_len=6, mode=mode)  # type: ignore[arg-type]
        result = run(config)

    assert (result.completed, result.failed, result.errors) == (7, 0, [])
    assert result.total_output_tokens == 7 * 6
    assert result.output_tokens_counted_by == ["usage"]
    assert result.total_input_tokens is not None and result.total_input_tokens >= 7 * 20
    check_metrics(result, content_chunks=6)
    prompts = [r.prompt if r.prompt is not None else r.messages[0].content  # type: ignore[index]
               for r in engine.requests]
    assert len(set(prompts)) == 7
    assert all(r.sampling.max_tokens == 6 and r.sampling.temperature == 0 for r in engine.requests)
    assert "api_key" not in result.to_dict()["config"]


def sse(payload: dict[str, Any] | str) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


def other_server(*, chunks: int = 4, fail: str | None = None, every: int = 2,
                 bodies: list[dict[str, Any]] | None = None) -> Starlette:
    """An OpenAI-compatible server that is not Serai: no usage frame, `: ping` comments, and on
    every `every`-th request the failure `fail` (http500, error_event or truncated). Request
    bodies are appended to `bodies`."""
    counter = itertools.count(1)

    async def completions(request: Request) -> Response:
        body = await request.json()
        if bodies is not None:
            bodies.append(body)
        chat = request.url.path.endswith("/chat/completions")
        n = next(counter)
        failing = fail if n % every == 0 else None
        if failing == "http500":
            return JSONResponse({"error": {"message": "the model fell over"}}, status_code=500)

        def piece(text: str, finish: str | None = None) -> dict[str, Any]:
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish})
            return {"id": "x", "model": body["model"], "choices": [choice]}

        async def events() -> AsyncIterator[bytes]:
            yield b": ping\n\n"
            if chat:
                yield sse({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            for i in range(chunks):
                yield sse(piece(f" tok{i}"))
                if failing == "error_event" and i == 1:
                    yield sse({"error": {"message": "out of memory", "type": "server_error"}})
                    return
                if failing == "truncated" and i == 1:
                    return
            yield sse(piece("", "length"))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]),
                             Route("/v1/completions", completions, methods=["POST"])])


@pytest.mark.parametrize("mode", ["chat", "completions"])
def test_bench_counts_chunks_when_the_server_sends_no_usage(mode: str) -> None:
    with serving(other_server(chunks=5)) as base_url:
        result = run(BenchConfig(base_url=base_url, model="any", concurrency=2, num_prompts=6,
                                 input_len=8, output_len=5, mode=mode))  # type: ignore[arg-type]
    assert (result.completed, result.failed) == (6, 0)
    assert result.total_output_tokens == 6 * 5
    assert result.output_tokens_counted_by == ["chunks"]
    assert result.total_input_tokens is None
    assert result.requests[0].text == " tok0 tok1 tok2 tok3 tok4"
    check_metrics(result, content_chunks=5)


def test_a_token_counter_replaces_chunk_counting_when_no_usage_is_sent() -> None:
    with serving(other_server(chunks=3)) as base_url:
        result = run(BenchConfig(base_url=base_url, model="any", num_prompts=2, output_len=3),
                     count_tokens=lambda text: 2 * len(text.split()))
    assert result.output_tokens_counted_by == ["tokenizer"]
    assert result.total_output_tokens == 2 * 2 * 3


@pytest.mark.parametrize(("fail", "message"), [
    ("http500", "HTTP 500: {\"error\":{\"message\":\"the model fell over\"}}"),
    ("error_event", "error event: out of memory"),
    ("truncated", "stream ended without [DONE] or a finish_reason"),
])
def test_failed_requests_are_counted_and_their_errors_kept(fail: str, message: str) -> None:
    with serving(other_server(fail=fail, every=2)) as base_url:
        result = run(BenchConfig(base_url=base_url, model="any", concurrency=1, num_prompts=6,
                                 input_len=8, output_len=4))
    assert (result.completed, result.failed) == (3, 3)
    assert result.errors == [message] * 3
    assert result.total_output_tokens == 3 * 4  # failed requests add nothing
    assert result.e2e_ms is not None and result.e2e_ms.count == 3


def test_connection_refused_is_a_failure() -> None:
    result = run(BenchConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", num_prompts=2))
    assert (result.completed, result.failed) == (0, 2)
    assert result.errors[0].startswith("ConnectError")
    assert result.ttft_ms is None and result.output_throughput == 0


def test_cli_bench_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    bodies: list[dict[str, Any]] = []
    with serving(other_server(chunks=3, bodies=bodies)) as base_url:
        result = CliRunner().invoke(cli_app, [
            "bench", "--base-url", base_url, "--model", "m", "--num-prompts", "4",
            "--concurrency", "2", "--input-len", "10", "--output-len", "3", "--completions",
            "--extra-body", '{"repeat_penalty": 1.0}', "--json", str(out)],
            env={"SERAI_API_KEY": "sk-secret"})
    assert result.exit_code == 0, result.output
    assert len(bodies) == 4
    assert bodies[0] == {"model": "m", "prompt": bodies[0]["prompt"], "max_tokens": 3,
                         "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                         "ignore_eos": True, "repeat_penalty": 1.0}
    assert len(bodies[0]["prompt"].split()) == 10
    assert "Output token throughput" in result.output
    data = json.loads(out.read_text())
    assert {"config", "duration_s", "completed", "failed", "errors", "request_throughput",
            "output_throughput", "total_output_tokens", "ttft_ms", "tpot_ms", "itl_ms",
            "e2e_ms"} <= data.keys()
    assert data["completed"] == 4 and data["total_output_tokens"] == 12
    assert data["config"]["mode"] == "completions" and data["config"]["concurrency"] == 2
    assert set(data["ttft_ms"]) == {"count", "mean", "median", "p99"}
    assert "sk-secret" not in out.read_text()


@pytest.mark.parametrize(("fail", "shown"), [
    ("http500", "the model fell over"),
    ("truncated", "stream ended without [DONE] or a finish_reason"),  # not read as Rich markup
])
def test_cli_bench_exits_1_when_every_request_fails(fail: str, shown: str) -> None:
    with serving(other_server(fail=fail, every=1)) as base_url:
        result = CliRunner().invoke(cli_app, ["bench", "--base-url", base_url, "--num-prompts", "2"])
    assert result.exit_code == 1
    assert shown in result.output
