"""What watching Serai costs: request log lines and OpenTelemetry tracing, side by side.

One run starts the mock upstream and, one after the other on the same data dir, three `serai
serve` processes in front of it that differ only in what they write about each request:

- quiet:    log level warning (no request lines), tracing off;
- logs:     log level info, one JSON line per request (to a file), tracing off;
- tracing:  as logs, plus spans exported over OTLP/HTTP to a local receiver that accepts them.

Each is measured with `serai.bench` at concurrency 1 and 16, and the script prints requests/s
and end-to-end p50 with each one's ratio to quiet. It also times, in this process, what a
request's metrics cost (Metrics.observe) and what a span of tracing that is off costs, per call.
Prometheus metrics are always on, so the three servers all pay them.

    .venv/bin/python benchmarks/observability_overhead.py [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import http.server
import json
import os
import signal
import sys
import tempfile
import threading
import timeit
from pathlib import Path
from typing import Any

from gateway_overhead import (
    add_load_arguments,
    bench,
    provision,
    serai_env,
    start_mock,
    start_serai,
)
from processes import Server, cpu_model
from rich.console import Console
from rich.table import Table

from serai.bench import BenchResult
from serai.observability import tracing
from serai.observability.metrics import Metrics
from serai.observability.request_log import RequestRecord
from serai.testing.processes import free_port

VARIANTS = ("quiet", "logs", "tracing")
console = Console(width=None if sys.stdout.isatty() else 120)


class _Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that takes every export and keeps nothing (a collector's cost is
    not Serai's)."""

    received = 0

    def do_POST(self) -> None:  # noqa: N802 (the http.server API)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).received += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


def start_sink() -> tuple[http.server.ThreadingHTTPServer, str]:
    port = free_port()
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    return sink, f"http://127.0.0.1:{port}"


def variant_env(base: dict[str, str], variant: str, sink_url: str) -> dict[str, str]:
    env = dict(base, SERAI_LOG_FORMAT="json")
    if variant != "quiet":
        env["SERAI_LOG_LEVEL"] = "info"
    if variant == "tracing":
        env["SERAI_OTEL_ENDPOINT"] = sink_url
    return env


def per_call_ns(statement: Any, number: int) -> float:
    return min(timeit.repeat(statement, number=number, repeat=5)) / number * 1e9


def in_process_costs() -> dict[str, float]:
    """Per-call costs measured here: a finished streamed request's metrics, and a span of
    tracing that is off (what every request pays four times when tracing is not set)."""
    metrics = Metrics()
    record = RequestRecord("req_bench", "POST", "/v1/chat/completions", started=0.0,
                           status=200, model="mock-model", input_tokens=40, output_tokens=16,
                           first_token_at=0.01, duration_s=0.05, ran=True)
    off = tracing.OFF

    def span_off() -> None:
        with off.span("engine") as span:
            span.set(tokens=16)

    return {"metrics_observe_ns": per_call_ns(lambda: metrics.observe(record), 20_000),
            "span_off_ns": per_call_ns(span_off, 200_000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    plan = {1: args.prompts_c1, 16: args.prompts_c16}
    results: dict[str, dict[int, BenchResult]] = {v: {} for v in VARIANTS}
    sink, sink_url = start_sink()
    with tempfile.TemporaryDirectory(prefix="serai-obs-bench-") as tmp:
        work = Path(tmp)
        mock, mock_url = start_mock(work, args.delay_s, args.chunks)
        try:
            base = serai_env(mock_url)
            data_dir = work / "serai-data"
            key = provision(base, data_dir)
            for variant in VARIANTS:
                server: Server | None = None
                try:
                    server, url = start_serai(work, variant_env(base, variant, sink_url),
                                              data_dir)
                    warm = bench(url, key, args, 8, 64, seed=10_000)
                    if warm.failed:
                        raise RuntimeError(f"{variant} failed its warm-up: {warm.errors}")
                    for c, n in plan.items():
                        result = bench(url, key, args, c, n, seed=c)
                        results[variant][c] = result
                        console.print(f"  {variant:8} c={c:<3} {result.request_throughput:7.1f} "
                                      f"req/s, {result.completed} ok, {result.failed} failed")
                finally:
                    if server is not None:
                        server.stop()
        finally:
            mock.stop()
            sink.shutdown()
    costs = in_process_costs()

    table = Table(title=f"Observability overhead: {args.chunks} chunks x "
                        f"{args.delay_s * 1000:g} ms, {os.cpu_count()} cores, {cpu_model()}")
    for column in ("variant", "concurrency", "req/s", "ratio to quiet", "E2E p50 ms",
                   "added p50 ms"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    figures: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        for c in plan:
            result, quiet = results[variant][c], results["quiet"][c]
            p50 = result.e2e_ms.median if result.e2e_ms else None
            quiet_p50 = quiet.e2e_ms.median if quiet.e2e_ms else None
            row = {"rps": result.request_throughput,
                   "ratio": result.request_throughput / quiet.request_throughput,
                   "e2e_p50_ms": p50,
                   "added_p50_ms": None if p50 is None or quiet_p50 is None else p50 - quiet_p50}
            figures[f"{variant}@{c}"] = row
            table.add_row(variant, str(c), f"{row['rps']:.1f}", f"{row['ratio']:.2f}",
                          "-" if p50 is None else f"{p50:.1f}",
                          "-" if row["added_p50_ms"] is None else f"{row['added_p50_ms']:+.1f}")
    console.print(table)
    console.print(f"In this process: Metrics.observe {costs['metrics_observe_ns'] / 1000:.1f} µs "
                  f"per request; a span with tracing off {costs['span_off_ns']:.0f} ns "
                  f"(four per request). OTLP exports received: {_Sink.received}.")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
            "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "figures": figures, "in_process": costs, "otlp_exports": _Sink.received,
            "results": {v: {str(c): r.to_dict() for c, r in by_c.items()}
                        for v, by_c in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
