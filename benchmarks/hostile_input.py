"""How much one hostile customer moves another customer's latency (RELIABILITY rows 19 and 23).

One `serai serve` with the bundled model, two organizations. The victim streams the same
temperature-0 question again and again; in alternating rounds the hostile organization is quiet,
or sends every case of serai.testing.hostile (schemas whose grammar would explode, huge bounds
and numbers, stop lists, prompts far past the context, keys that do not exist) from several
threads at once. The script prints the victim's time to first token and end-to-end time, median
and worst, in each condition, their ratios (target: within 2x of quiet), and the hostile
requests' refusal times (target: each within a second or two).

    .venv/bin/python benchmarks/hostile_input.py [--rounds 4] [--attackers 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from processes import Server, cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serai.testing.hostile import Refusal, cases, organization_key, send, stream_answer  # noqa: E402
from serai.testing.processes import free_port  # noqa: E402

MODEL = "gemma-3-270m"


def attack(base_url: str, key: str, stop: Any, answers: Any) -> None:
    """Send every hostile case, again and again, until `stop`; put what came back on
    `answers`."""
    got: list[Refusal] = []
    hostile = cases(MODEL)
    with httpx.Client(base_url=base_url, timeout=60) as http:
        while not stop.is_set():
            for case in hostile:
                got.append(send(http, case, key))
    answers.put(got)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--streams", type=int, default=3, help="victim streams per round")
    parser.add_argument("--attackers", type=int, default=3, help="attacking processes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="serai-hostile-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERAI_")}
    server = Server("serai", [sys.executable, "-m", "serai", "serve", "--port", str(port),
                              "--data-dir", str(root / "serai-data")], env,
                    root / "serai.log", f"http://127.0.0.1:{port}/ready",
                    base_url=f"http://127.0.0.1:{port}")
    try:
        admin = re.findall(r"sk-serai-[A-Za-z0-9_-]{43}", server.log())[0]
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            victim = organization_key(http, admin, "victim")
            hostile = organization_key(http, admin, "hostile")
            stream_answer(http, victim, MODEL)  # warm-up
            timings: dict[str, list[tuple[float, float]]] = {"quiet": [], "attacked": []}
            refusals: list[Refusal] = []
            for _ in range(args.rounds):
                for condition in ("quiet", "attacked"):
                    # Attackers are processes of their own: in this one they would take the
                    # victim client's interpreter lock and be measured as the server's delay.
                    stop = multiprocessing.Event()
                    answers: multiprocessing.Queue[list[Refusal]] = multiprocessing.Queue()
                    attackers = ([multiprocessing.Process(target=attack, args=(
                        server.base_url, hostile, stop, answers)) for _ in range(args.attackers)]
                        if condition == "attacked" else [])
                    for process in attackers:
                        process.start()
                    try:
                        if attackers:
                            time.sleep(1)  # let the attack reach its pace
                        for _ in range(args.streams):
                            _, first, total = stream_answer(http, victim, MODEL)
                            timings[condition].append((first, total))
                    finally:
                        stop.set()
                        for _ in attackers:
                            refusals.extend(answers.get(timeout=120))
                        for process in attackers:
                            process.join()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.median(values), max(values)

    report: dict[str, object] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                                 "rounds": args.rounds, "attackers": args.attackers}
    print(f"{cpu_model()}, {os.cpu_count()} cores; {args.rounds} rounds of {args.streams} victim "
          f"streams, {args.attackers} attacker processes")
    print(f"{'':10} {'TTFT p50':>10} {'TTFT max':>10} {'e2e p50':>10} {'e2e max':>10}")
    figures = {}
    for condition, rows in timings.items():
        ttft = stats([r[0] for r in rows])
        e2e = stats([r[1] for r in rows])
        figures[condition] = (*ttft, *e2e)
        print(f"{condition:10} " + " ".join(f"{v * 1000:9.0f}ms" for v in figures[condition]))
    ratios = [a / q for a, q in zip(figures["attacked"], figures["quiet"], strict=True)]
    print(f"{'ratio':10} " + " ".join(f"{r:10.2f}x" for r in ratios))
    report["victim_ms"] = {k: [v * 1000 for v in f] for k, f in figures.items()}
    report["ratios"] = ratios
    print(f"\nhostile requests: {len(refusals)}; by case (median / max seconds, statuses):")
    by_case: dict[str, list[Refusal]] = {}
    for refusal in refusals:
        by_case.setdefault(refusal.case.name, []).append(refusal)
    for name, answers in by_case.items():
        seconds = [a.seconds for a in answers]
        statuses = sorted({a.status for a in answers})
        problems = sorted({p for a in answers for p in a.problems()})
        print(f"  {statistics.median(seconds):6.3f} / {max(seconds):6.3f}  {statuses}  {name}"
              + (f"  PROBLEMS: {problems[:2]}" if problems else ""))
        report.setdefault("hostile", {})[name] = {  # type: ignore[union-attr]
            "median_s": statistics.median(seconds), "max_s": max(seconds),
            "statuses": statuses, "problems": problems}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
