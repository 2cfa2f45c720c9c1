"""The embedded engine's memory: peak RSS with every sequence full, against the model + KV cache
size computed from the settings, and RSS after many requests against RSS after the first few.

    .venv/bin/python benchmarks/engine_memory.py [--parallel 8] [--ctx 2048] [--requests 2000]

Phase 1 starts `serai serve` with `--parallel` sequences of `--ctx` tokens and fills all of
them at once (prompts of about ctx - 200 tokens, then up to 150 generated). Phase 2 starts a
fresh server and sends `--requests` short requests, 8 at a time, reading the server's RSS after
the first `--warm` and after the last. The formula is in docs/configuration.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import llama_cpp
from embedded_engine import MODEL_NAME, start_serai
from processes import Server, cpu_model, proc_status_kib
from rich.console import Console
from rich.table import Table

from serai.bench import BenchConfig, run
from serai.engines.models import prepare_bundled_model

MIB = 2**20


def kv_bytes_per_token(gguf: Path) -> tuple[int, dict[str, int]]:
    """Bytes one token takes in the KV cache (f16 K and V, every layer), from the GGUF header."""
    meta = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False).metadata
    arch = meta["general.architecture"]
    shape = {"layers": int(meta[f"{arch}.block_count"]),
             "kv_heads": int(meta[f"{arch}.attention.head_count_kv"]),
             "key_length": int(meta[f"{arch}.attention.key_length"]),
             "value_length": int(meta[f"{arch}.attention.value_length"])}
    f16 = 2
    per_token = shape["layers"] * shape["kv_heads"] * (shape["key_length"]
                                                       + shape["value_length"]) * f16
    return per_token, shape


def rss_mib(server: Server) -> float:
    return proc_status_kib(server.process.pid, "VmRSS") / 1024


def load(server: Server, *, count: int, concurrency: int, input_len: int, output_len: int,
         seed: int) -> dict[str, Any]:
    result = run(BenchConfig(base_url=server.base_url, model=MODEL_NAME, api_key=server.api_key,
                             concurrency=concurrency, num_prompts=count, input_len=input_len,
                             output_len=output_len, mode="completions", seed=seed))
    if result.failed:
        raise RuntimeError(f"{result.failed} requests failed: {result.errors[:3]}")
    return {"completed": result.completed, "input_tokens": result.total_input_tokens,
            "output_tokens": result.total_output_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warm", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 120)

    with tempfile.TemporaryDirectory(prefix="serai-memory-") as tmp:
        work = Path(tmp)
        gguf = prepare_bundled_model(work / "models")
        per_token, shape = kv_bytes_per_token(gguf)
        model_mib = gguf.stat().st_size / MIB
        kv_mib = args.parallel * args.ctx * per_token / MIB

        console.print(f"Phase 1: {args.parallel} sequences of {args.ctx} tokens, all full")
        (work / "full").mkdir()
        server = start_serai(gguf, work / "full", args.threads, args.ctx, args.parallel, None)
        try:
            idle = rss_mib(server)
            filled = load(server, count=args.parallel, concurrency=args.parallel,
                          input_len=args.ctx - 200, output_len=150, seed=1)
            peak = proc_status_kib(server.process.pid, "VmHWM") / 1024
        finally:
            server.stop()
        held = (filled["input_tokens"] or 0) + filled["output_tokens"]

        console.print(f"Phase 2: {args.requests} short requests, 8 at a time")
        (work / "steady").mkdir()
        server = start_serai(gguf, work / "steady", args.threads, args.ctx, args.parallel, None)
        try:
            load(server, count=args.warm, concurrency=8, input_len=64, output_len=16, seed=2)
            after_warm = rss_mib(server)
            load(server, count=args.requests - args.warm, concurrency=8, input_len=64,
                 output_len=16, seed=3)
            after_all = rss_mib(server)
        finally:
            server.stop()

    formula = model_mib + kv_mib
    table = Table("measure", "MiB", "note", title=f"Serai embedded engine memory ({cpu_model()}, "
                  f"{args.threads} threads)")
    table.add_row("model file", f"{model_mib:.0f}", gguf.name)
    table.add_row("KV cache", f"{kv_mib:.0f}",
                  f"{args.parallel} × {args.ctx} tokens × {per_token} B ({shape['layers']} "
                  f"layers × {shape['kv_heads']} KV heads × ({shape['key_length']}+"
                  f"{shape['value_length']}) × 2 B)")
    table.add_row("model + KV cache", f"{formula:.0f}", "the formula", end_section=True)
    table.add_row("RSS when ready", f"{idle:.0f}", "model mapped, KV allocated, nothing run")
    table.add_row("peak RSS, all sequences full", f"{peak:.0f}",
                  f"{held} tokens held by {args.parallel} sequences; "
                  f"{peak / formula:.2f}× the formula, {peak - formula:+.0f} MiB")
    table.add_row(f"RSS after {args.warm} requests", f"{after_warm:.0f}", "")
    table.add_row(f"RSS after {args.requests} requests", f"{after_all:.0f}",
                  f"{(after_all / after_warm - 1) * 100:+.1f}% (target: at most +5%)")
    console.print(table)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "model_mib": model_mib, "kv_mib": kv_mib, "kv_bytes_per_token": per_token,
            "idle_rss_mib": idle, "peak_rss_mib": peak, "tokens_held": held,
            "rss_after_warm_mib": after_warm, "rss_after_all_mib": after_all,
            "parallel": args.parallel, "ctx": args.ctx, "requests": args.requests}, indent=2))


if __name__ == "__main__":
    main()
