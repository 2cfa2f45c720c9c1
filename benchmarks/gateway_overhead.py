"""What Serai adds in front of an upstream: keys, limits and metering on, against the mock direct.

One run starts the mock upstream (`python -m serai.testing.mock_upstream`, a fixed latency per
chunk) and `serai serve` with only that upstream (SERAI_EMBEDDED=false) on a new data dir, with an
organization that has a price book, a balance and rpm/tpm limits, and a key of its own. It
measures the mock directly and through Serai with `serai.bench` at concurrency 1, 16 and 64 and
prints, per concurrency, TTFT and E2E p50/p99 of both, the latency Serai adds and the ratio of
requests/s, against the issue's targets (docs/benchmarks.md).

    .venv/bin/python benchmarks/gateway_overhead.py [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from processes import Server, cpu_model, die_with_parent
from rich.console import Console
from rich.table import Table

from serai.bench import BenchConfig, BenchResult, Summary, run
from serai.testing.processes import free_port

MODEL = "mock-model"
ORG = "bench-org"
SIDES = ("direct", "serai")
# The targets, at concurrency 16.
TARGET_CONCURRENCY = 16
TARGET_ADDED_P50_MS = 2.0
TARGET_ADDED_P99_MS = 10.0
TARGET_RPS_RATIO = 0.5
# Limits that are checked on every request but never reached: rpm/tpm on the organization and
# the key, requests in flight on the organization, and a balance the requests draw from.
LIMITS = {"rpm": 1_000_000, "tpm": 1_000_000_000, "max_concurrency": 1_000}
console = Console(width=None if sys.stdout.isatty() else 120)


def start_mock(work: Path, delay_s: float, chunks: int) -> tuple[Server, str]:
    port = free_port()
    server = Server("mock upstream", [
        sys.executable, "-m", "serai.testing.mock_upstream", "--port", str(port),
        "--delay-s", str(delay_s), "--chunks", str(chunks),
    ], dict(os.environ), work / "mock.log", f"http://127.0.0.1:{port}/stats")
    return server, f"http://127.0.0.1:{port}/v1"


def serai_env(mock_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERAI_")}
    upstream = {"name": MODEL, "base_url": mock_url, "read_timeout_s": 60}
    env.update(SERAI_EMBEDDED="false", SERAI_UPSTREAMS=json.dumps([upstream]),
               SERAI_LOG_LEVEL="warning", COLUMNS="200")
    return env


def serai_cli(env: dict[str, str], data_dir: Path, *args: str) -> str:
    # In the work dir, like `serai serve`: no serai.toml of the caller's is read.
    done = subprocess.run([sys.executable, "-m", "serai", *args, "--data-dir", str(data_dir)],
                          env=env, cwd=data_dir.parent, capture_output=True, text=True,
                          preexec_fn=die_with_parent)
    if done.returncode != 0:
        raise RuntimeError(f"serai {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def provision(env: dict[str, str], data_dir: Path) -> str:
    """An organization with a price book, a balance and limits, and a model key of its own,
    made with the CLI as an operator would; returns the key."""
    limits = [f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items()]
    serai_cli(env, data_dir, "prices", "create-book", "bench-book", "--currency", "USD")
    serai_cli(env, data_dir, "prices", "set", "bench-book", MODEL, "--input", "0.10",
              "--output", "0.40")
    serai_cli(env, data_dir, "orgs", "create", ORG, "--price-book", "bench-book", *limits)
    serai_cli(env, data_dir, "balance", "topup", ORG, "1000", "--reason", "benchmark")
    out = serai_cli(env, data_dir, "keys", "create", "--org", ORG, "--name", "bench",
                    "--models", MODEL, f"--rpm={LIMITS['rpm']}", f"--tpm={LIMITS['tpm']}")
    return out.strip().splitlines()[-1]


def start_serai(work: Path, env: dict[str, str], data_dir: Path) -> tuple[Server, str]:
    port = free_port()
    server = Server("serai", [
        sys.executable, "-m", "serai", "serve", "--port", str(port), "--data-dir", str(data_dir),
    ], env, work / "serai.log", f"http://127.0.0.1:{port}/ready")
    return server, f"http://127.0.0.1:{port}/v1"


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The mock's answers and the load `bench` sends (shared with observability_overhead.py)."""
    parser.add_argument("--delay-s", type=float, default=0.002,
                        help="the mock's latency before each chunk (default 2 ms)")
    parser.add_argument("--chunks", type=int, default=16,
                        help="content chunks per answer, also max_tokens (default 16)")
    parser.add_argument("--input-len", type=int, default=32, help="prompt length in words")
    parser.add_argument("--prompts-c1", type=int, default=100, help="requests at concurrency 1")
    parser.add_argument("--prompts-c16", type=int, default=400, help="requests at concurrency 16")


def bench(base_url: str, key: str | None, args: argparse.Namespace, concurrency: int,
          num_prompts: int, seed: int) -> BenchResult:
    return run(BenchConfig(base_url=base_url, model=MODEL, api_key=key, concurrency=concurrency,
                           num_prompts=num_prompts, input_len=args.input_len,
                           output_len=args.chunks, mode="chat", seed=seed, timeout=60))


def _get(summary: Summary | None, stat: str) -> float | None:
    return None if summary is None else float(getattr(summary, stat))


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def figures_of(results: dict[str, dict[int, BenchResult]]) -> dict[int, dict[str, Any]]:
    figures: dict[int, dict[str, Any]] = {}
    for c in results["direct"]:
        row: dict[str, Any] = {}
        for side in SIDES:
            r = results[side][c]
            row[side] = {"ttft_p50_ms": _get(r.ttft_ms, "median"), "ttft_p99_ms": _get(r.ttft_ms, "p99"),
                         "e2e_p50_ms": _get(r.e2e_ms, "median"), "e2e_p99_ms": _get(r.e2e_ms, "p99"),
                         "requests_per_s": r.request_throughput, "completed": r.completed,
                         "failed": r.failed, "errors": r.errors}
        d, s = row["direct"], row["serai"]
        row["added"] = {k: _minus(s[k], d[k])
                        for k in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")}
        row["rps_ratio"] = (s["requests_per_s"] / d["requests_per_s"]
                            if d["requests_per_s"] else None)
        figures[c] = row
    return figures


def targets_of(figures: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, judged on E2E latency (admission, relay and settlement all in it)."""
    row = figures.get(TARGET_CONCURRENCY)
    if row is None:
        return []
    added, ratio = row["added"], row["rps_ratio"]
    return [
        {"target": f"c={TARGET_CONCURRENCY} added E2E p50 <= {TARGET_ADDED_P50_MS:g} ms",
         "value": added["e2e_p50_ms"],
         "met": added["e2e_p50_ms"] is not None and added["e2e_p50_ms"] <= TARGET_ADDED_P50_MS},
        {"target": f"c={TARGET_CONCURRENCY} added E2E p99 <= {TARGET_ADDED_P99_MS:g} ms",
         "value": added["e2e_p99_ms"],
         "met": added["e2e_p99_ms"] is not None and added["e2e_p99_ms"] <= TARGET_ADDED_P99_MS},
        {"target": f"c={TARGET_CONCURRENCY} Serai requests/s >= {TARGET_RPS_RATIO:.0%} of direct",
         "value": ratio, "met": ratio is not None and ratio >= TARGET_RPS_RATIO},
    ]


def table_of(figures: dict[int, dict[str, Any]]) -> Table:
    table = Table("metric", "direct", "Serai", "added / ratio")
    labels = (("TTFT p50 (ms)", "ttft_p50_ms"), ("TTFT p99 (ms)", "ttft_p99_ms"),
              ("E2E p50 (ms)", "e2e_p50_ms"), ("E2E p99 (ms)", "e2e_p99_ms"))
    for c, row in figures.items():
        d, s = row["direct"], row["serai"]
        for label, key in labels:
            table.add_row(f"c={c} {label}", _fmt(d[key]), _fmt(s[key]),
                          "+" + _fmt(row["added"][key]) if row["added"][key] is not None else "-")
        table.add_row(f"c={c} requests/s", _fmt(d["requests_per_s"]), _fmt(s["requests_per_s"]),
                      _fmt(row["rps_ratio"], 2))
        table.add_row(f"c={c} completed / failed", f"{d['completed']} / {d['failed']}",
                      f"{s['completed']} / {s['failed']}", "", end_section=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser)
    parser.add_argument("--prompts-c64", type=int, default=640, help="requests at concurrency 64")
    parser.add_argument("--json", type=Path, help="write every figure and raw result here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs

    plan = {1: args.prompts_c1, 16: args.prompts_c16, 64: args.prompts_c64}
    results: dict[str, dict[int, BenchResult]] = {side: {} for side in SIDES}
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="serai-gw-bench-") as tmp:
        work = Path(tmp)
        try:
            mock, mock_url = start_mock(work, args.delay_s, args.chunks)
            servers.append(mock)
            env = serai_env(mock_url)
            data_dir = work / "serai-data"
            key = provision(env, data_dir)
            serai, serai_url = start_serai(work, env, data_dir)
            servers.append(serai)
            urls = {"direct": (mock_url, None), "serai": (serai_url, key)}
            console.print(f"Mock upstream: {args.chunks} chunks, {args.delay_s * 1000:g} ms before "
                          f"each; ~{args.input_len} words in; chat, streamed")
            for side in SIDES:  # connection set-up and first-request costs off the clock
                warm = bench(*urls[side], args, 8, 64, seed=10_000)
                if warm.failed:
                    raise RuntimeError(f"{side} failed its warm-up: {warm.errors}")
            for i, (c, n) in enumerate(plan.items()):
                for side in SIDES if i % 2 == 0 else SIDES[::-1]:  # neither always goes first
                    result = bench(*urls[side], args, c, n, seed=c)
                    results[side][c] = result
                    console.print(f"  {side:6} c={c:<3} {result.request_throughput:7.1f} req/s, "
                                  f"{result.completed} ok, {result.failed} failed "
                                  f"{result.errors[:1] or ''}")
        except BaseException:
            for server in servers:
                console.print(f"[dim]{server.name} log tail:\n{server.log()[-2000:]}[/dim]")
            raise
        finally:
            for server in servers:
                server.stop()
        # The ledger's own account of the run: every request through Serai (warm-up included)
        # should be there, priced and charged.
        metered = serai_cli(env, data_dir, "usage", ORG)

    figures = figures_of({side: dict(sorted(by_c.items())) for side, by_c in results.items()})
    table = table_of(figures)
    table.title = (f"Gateway overhead: Serai (keys, limits, metering) vs the mock direct; "
                   f"{args.chunks} chunks x {args.delay_s * 1000:g} ms, {os.cpu_count()} cores, "
                   f"{cpu_model()}")
    console.print(table)
    console.print(metered.rstrip())
    targets = targets_of(figures)
    for t in targets:
        value = _fmt(t["value"], 2 if "requests/s" in t["target"] else 1)
        console.print(f"{'[green]met[/green]' if t['met'] else '[red]missed[/red]'}: "
                      f"{t['target']} (measured {value})")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
            "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "limits": LIMITS, "figures": {str(c): row for c, row in figures.items()},
            "targets": targets, "serai_usage": metered,
            "results": {side: {str(c): r.to_dict() for c, r in by_c.items()}
                        for side, by_c in results.items()},
        }, indent=2) + "\n")
        console.print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
