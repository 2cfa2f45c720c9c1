"""Serai's embedded engine against `python -m llama_cpp.server` on the same GGUF and threads.

One run prepares the bundled model, starts both servers, measures them alternately with
`serai.bench` at concurrency 1 and 8, runs a bare `Llama.create_completion` loop as the
concurrency-1 reference, and prints the figures side by side with their ratios (docs/benchmarks.md).

    .venv/bin/python benchmarks/embedded_engine.py [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
from processes import Server, cpu_model, die_with_parent
from rich.console import Console
from rich.table import Table

from serai.bench import BenchConfig, BenchResult, run, synthetic_prompts
from serai.engines.models import prepare_bundled_model
from serai.testing.processes import free_port

MODEL_NAME = "gemma-3-270m"
KEY_PATTERN = re.compile(r"sk-serai-[A-Za-z0-9_-]{43}")
SERVERS = ("serai", "llama_cpp.server")
# llama_cpp.server applies repeat_penalty 1.1 unless told otherwise; Serai and the bare
# Llama.create_completion loop use 1.0. Sent to both (Serai ignores the field) so all three
# decode greedily the same way and generate the same number of tokens.
SAME_SAMPLING = {"repeat_penalty": 1.0}
console = Console(width=None if sys.stdout.isatty() else 120)  # full rows when piped to a file

# The bare reference: the same file, threads and prompts, no server in between.
BARE_LOOP = """
import json, sys, time
import llama_cpp
spec = json.loads(sys.argv[1])
llm = llama_cpp.Llama(spec["model"], n_ctx=spec["ctx"], n_threads=spec["threads"],
                      n_threads_batch=spec["threads"], verbose=False)
llm.create_completion("warm up", max_tokens=8, temperature=0.0)
tokens, start = 0, time.perf_counter()
for prompt in spec["prompts"]:
    out = llm.create_completion(prompt, max_tokens=spec["output_len"], temperature=0.0)
    tokens += out["usage"]["completion_tokens"]
duration = time.perf_counter() - start
status = open("/proc/self/status").read()
hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1])
print(json.dumps({"output_tokens": tokens, "duration_s": duration,
                  "output_throughput": tokens / duration, "peak_rss_mib": hwm / 1024}))
"""


def start_serai(gguf: Path, work: Path, threads: int, ctx: int, parallel: int,
                source: Path | None) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERAI_")}
    env.update(SERAI_THREADS=str(threads), SERAI_CONTEXT_LENGTH=str(ctx),
               SERAI_ENGINE_PARALLEL=str(parallel), COLUMNS="200")
    if source is not None:  # measure another checkout, e.g. `git archive <commit>` unpacked
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    server = Server("serai", [
        sys.executable, "-m", "serai", "serve", "--port", str(port), "--data-dir",
        str(work / "serai-data"), "--model", str(gguf), "--model-name", MODEL_NAME,
    ], env, work / "serai.log", f"http://127.0.0.1:{port}/ready", f"http://127.0.0.1:{port}/v1")
    keys = KEY_PATTERN.findall(server.log())
    if not keys:
        server.stop()
        raise RuntimeError(f"serai printed no admin key:\n{server.log()[-3000:]}")
    server.api_key = keys[0]
    return server


def start_llama_cpp_server(gguf: Path, work: Path, threads: int, ctx: int,
                           logits_all: bool) -> Server:
    port = free_port()
    # n_threads defaults to 1 and n_threads_batch to all cores there: set both, like Serai does.
    # logits_all defaults to True there (for completion logprobs, which Serai refuses): it keeps
    # the logits of every prompt token, about doubling TTFT.
    return Server("llama_cpp.server", [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL_NAME,
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx),
        "--interrupt_requests", "False", "--logits_all", str(logits_all), "--verbose", "False",
        "--host", "127.0.0.1", "--port", str(port),
    ], dict(os.environ), work / "llama_cpp_server.log", f"http://127.0.0.1:{port}/v1/models",
        f"http://127.0.0.1:{port}/v1")


def token_counter(gguf: Path) -> Callable[[str], int]:
    """Counts a streamed text's tokens with the GGUF's own vocabulary, for servers that send no
    usage frame (llama_cpp.server merges some tokens into one chunk, so chunks undercount)."""
    vocab = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
    return lambda text: len(vocab.tokenize(text.encode(), add_bos=False, special=False))


def prompt_seed(round_: int, concurrency: int) -> int:
    # Fresh prompts for every round and level, so no server answers a prompt it has cached; the
    # bare loop reads the same prompts as the concurrency-1 runs of its round.
    return 1000 * round_ + concurrency


def bench(server: Server, args: argparse.Namespace, concurrency: int, num_prompts: int,
          seed: int, count_tokens: Callable[[str], int] | None = None) -> BenchResult:
    return run(BenchConfig(base_url=server.base_url, model=MODEL_NAME, api_key=server.api_key,
                           concurrency=concurrency, num_prompts=num_prompts,
                           input_len=args.input_len, output_len=args.output_len,
                           mode="chat" if args.chat else "completions", seed=seed,
                           extra_body=SAME_SAMPLING), count_tokens)


def bare_loop(gguf: Path, args: argparse.Namespace, seed: int) -> dict[str, float]:
    spec = {"model": str(gguf), "ctx": args.ctx, "threads": args.threads,
            "output_len": args.output_len,
            "prompts": synthetic_prompts(count=args.prompts_c1, input_len=args.input_len, seed=seed)}
    done = subprocess.run([sys.executable, "-c", BARE_LOOP, json.dumps(spec)], capture_output=True,
                          text=True, check=True, preexec_fn=die_with_parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _paired_ratio(ours: list[float | None], theirs: list[float | None]) -> float | None:
    """Median over rounds of ours/theirs measured minutes apart: steadier than a ratio of
    medians when the machine's load drifts."""
    return _median([a / b if a is not None and b else None for a, b in zip(ours, theirs, strict=True)])


METRICS: tuple[tuple[str, Callable[[BenchResult], float | None], int], ...] = (
    ("output tok/s", lambda r: r.output_throughput, 1),
    ("requests/s", lambda r: r.request_throughput, 3),
    ("median TTFT (ms)", lambda r: r.ttft_ms and r.ttft_ms.median, 0),
    ("p99 TTFT (ms)", lambda r: r.ttft_ms and r.ttft_ms.p99, 0),
    ("median TPOT (ms)", lambda r: r.tpot_ms and r.tpot_ms.median, 1),
    ("median ITL (ms)", lambda r: r.itl_ms and r.itl_ms.median, 1),
    ("output tokens / request", lambda r: r.total_output_tokens / max(r.completed, 1), 1),
    ("failed requests", lambda r: r.failed, 0),
)


def summarise(results: dict[str, dict[int, list[BenchResult]]], bare: list[dict[str, float]],
              memory: dict[str, dict[str, float]]) -> tuple[Table, dict[str, Any]]:
    """Medians over rounds side by side, with paired Serai / llama_cpp.server ratios."""
    table = Table("metric", "Serai", "llama_cpp.server", "Serai / llama_cpp.server")
    figures: dict[str, Any] = {}
    for c in sorted(results["serai"]):
        for label, pick, digits in METRICS:
            ours = [pick(r) for r in results["serai"][c]]
            theirs = [pick(r) for r in results["llama_cpp.server"][c]]
            ratio = _paired_ratio(ours, theirs) if label != "failed requests" else None
            table.add_row(f"c={c} {label}", _fmt(_median(ours), digits),
                          _fmt(_median(theirs), digits), _fmt(ratio, 2),
                          end_section=label == METRICS[-1][0])
            key = label.replace(" (ms)", "_ms").replace(" / ", "_per_").replace("/", "_per_")
            key = key.replace(" ", "_")
            figures[f"c{c}_{key}"] = {"serai": _median(ours), "llama_cpp_server": _median(theirs),
                                      "ratio": ratio}
    for label, field in (("peak RSS (MiB)", "peak_rss_mib"), ("RSS at the end (MiB)", "rss_mib")):
        ours, theirs = memory["serai"][field], memory["llama_cpp.server"][field]
        table.add_row(label, _fmt(ours, 0), _fmt(theirs, 0), _fmt(ours / theirs, 2),
                      end_section=field == "rss_mib")
        figures[field] = {"serai": ours, "llama_cpp_server": theirs, "ratio": ours / theirs}

    bare_tps: list[float | None] = [b["output_throughput"] for b in bare]
    c1 = {s: [r.output_throughput for r in results[s][1]] for s in SERVERS}
    over_bare = {s: _paired_ratio(list(c1[s]), bare_tps) for s in SERVERS}
    table.add_row("bare Llama.create_completion loop, tok/s", _fmt(_median(bare_tps)), "", "")
    table.add_row("c=1 output tok/s / bare loop", _fmt(over_bare["serai"], 2),
                  _fmt(over_bare["llama_cpp.server"], 2), "")
    figures["bare_loop_output_tok_per_s"] = _median(bare_tps)
    figures["c1_over_bare_loop"] = {"serai": over_bare["serai"],
                                    "llama_cpp_server": over_bare["llama_cpp.server"]}
    return table, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads for both servers and the bare loop (default: all cores)")
    parser.add_argument("--ctx", type=int, default=4096, help="context window (Serai's default)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompts-c1", type=int, default=8, help="requests at concurrency 1")
    parser.add_argument("--prompts-c8", type=int, default=32, help="requests at concurrency 8")
    parser.add_argument("--prompts-c16", type=int, default=32, help="requests at concurrency 16")
    parser.add_argument("--parallel", type=int, default=16,
                        help="Serai's SERAI_ENGINE_PARALLEL (default 16, so concurrency 16 is batched too)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure each side this many times, alternating; the table shows medians "
                        "over rounds and the median of the per-round Serai / llama_cpp.server ratios")
    parser.add_argument("--chat", action="store_true",
                        help="use /chat/completions (default /completions: identical prompt tokens "
                        "on both servers and in the bare loop)")
    parser.add_argument("--logits-all", action="store_true",
                        help="keep llama_cpp.server's default logits_all=True (off by default here: "
                        "Serai computes no prompt logits either)")
    parser.add_argument("--serai-source", type=Path,
                        help="run `serai serve` from this source tree instead of the installed one")
    parser.add_argument("--json", type=Path, help="write every figure and raw result here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs

    plan = {1: args.prompts_c1, 8: args.prompts_c8, 16: args.prompts_c16}
    results: dict[str, dict[int, list[BenchResult]]] = {s: {c: [] for c in plan} for s in SERVERS}
    bare: list[dict[str, float]] = []
    servers: dict[str, Server] = {}
    with tempfile.TemporaryDirectory(prefix="serai-bench-") as tmp:
        work = Path(tmp)
        try:
            gguf = prepare_bundled_model(work / "models")
            count_tokens = token_counter(gguf)
            console.print(f"Model {gguf.name}, {args.threads} threads, ctx {args.ctx}, "
                          f"~{args.input_len} in / {args.output_len} out, "
                          f"{'chat' if args.chat else 'completions'}")
            servers["serai"] = start_serai(gguf, work, args.threads, args.ctx, args.parallel,
                                           args.serai_source)
            servers["llama_cpp.server"] = start_llama_cpp_server(gguf, work, args.threads, args.ctx,
                                                                 args.logits_all)
            for server in servers.values():  # first-request costs (graph allocation) off the clock
                warm = bench(server, args, 1, 2, seed=10_000)
                if warm.failed:
                    raise RuntimeError(f"{server.name} failed its warm-up: {warm.errors}")
            for round_ in range(args.rounds):
                console.print(f"[bold]Round {round_ + 1}/{args.rounds}[/bold]: bare loop")
                bare.append(bare_loop(gguf, args, seed=prompt_seed(round_, 1)))
                for i, (c, n) in enumerate(plan.items()):
                    order = SERVERS if (round_ + i) % 2 == 0 else SERVERS[::-1]
                    for name in order:
                        result = bench(servers[name], args, c, n, seed=prompt_seed(round_, c),
                                       count_tokens=count_tokens)
                        results[name][c].append(result)
                        console.print(f"  {name:17} c={c}: {result.output_throughput:7.1f} tok/s, "
                                      f"{result.completed} ok, {result.failed} failed "
                                      f"{result.errors[:1] or ''}")
            memory = {name: server.memory_mib() for name, server in servers.items()}
        except BaseException:
            for server in servers.values():
                console.print(f"[dim]{server.name} log tail:\n{server.log()[-2000:]}[/dim]")
            raise
        finally:
            for server in servers.values():
                server.stop()

    table, figures = summarise(results, bare, memory)
    table.title = (f"Embedded engine: {MODEL_NAME} Q4_K_M, {args.threads} threads, {cpu_model()}, "
                   f"~{args.input_len} in / {args.output_len} out, {args.rounds} round(s), "
                   f"Serai parallel {args.parallel}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
            "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "figures": figures, "memory": memory, "bare_loop": bare,
            "results": {s: {str(c): [r.to_dict() for r in rs] for c, rs in by_c.items()}
                        for s, by_c in results.items()},
        }, indent=2) + "\n")
        console.print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
