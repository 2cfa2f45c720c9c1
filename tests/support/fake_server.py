"""Serve Serai on a fast fake engine in a process of its own, for tests that must kill a real
server (`kill -9`) and start it again on the same data.

    python -m tests.support.fake_server --port 8123 --data-dir DIR [--database-url URL]

Every other setting comes from SERAI_* variables, as for `serai serve` (for instance
SERAI_RESERVATION_TIMEOUT_S).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from serai.app import create_app
from serai.config import Settings
from tests.support.fake_engine import FakeEngine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--database-url", help="default: SQLite in the data dir")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--reply-words", type=int, default=200,
                        help="words in the engine's answer, one token each")
    parser.add_argument("--delay", type=float, default=0.01, help="seconds before each token")
    args = parser.parse_args(argv)
    overrides = {"database_url": args.database_url} if args.database_url else {}
    settings = Settings(data_dir=args.data_dir, **overrides)  # type: ignore[arg-type]
    engine = FakeEngine(name=args.model, reply=" ".join(f"w{i}" for i in range(args.reply_words)),
                        context_length=4096, delay=args.delay)
    uvicorn.run(create_app(settings, engines=[engine]), host="127.0.0.1", port=args.port,
                loop="uvloop", http="httptools", log_config=None, access_log=False)


if __name__ == "__main__":
    main()
