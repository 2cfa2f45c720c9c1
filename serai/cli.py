"""The `serai` command: serve, keys, models, db, bench.

Every command takes --data-dir (or SERAI_DATA_DIR) and acts on that data dir's database, so
`serai keys create` makes a key for the server running on the same data dir.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from serai import accounts
from serai.config import Settings, load_settings
from serai.errors import ModelFileError, SeraiError
from serai.storage.db import Database

if TYPE_CHECKING:
    from serai.bench import BenchResult, Summary

app = typer.Typer(help="Serai: open-weight models behind an OpenAI-compatible API.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
models_app = typer.Typer(help="The models this server serves.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")

err = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", help="Data directory (database, prepared model). Default: ./serai-data, "
    "or SERAI_DATA_DIR.", show_default=False)]


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(p) for p in error["loc"])
            err.print(f"[red]Invalid setting[/red] {field}: {error['msg']}")
        raise typer.Exit(2) from None


def _database(settings: Settings) -> Database:
    database = Database(settings.resolved_database_url)
    database.upgrade()
    return database


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]Error:[/red] {message}")
    return typer.Exit(1)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [default: 8000]")] = None,
    data_dir: DataDir = None,
    model: Annotated[Path | None, typer.Option(
        help="GGUF file to serve instead of the bundled Gemma 3 270M.")] = None,
    model_name: Annotated[str | None, typer.Option(
        help="Name clients request the model by [default: from the file]")] = None,
) -> None:
    """Serve the API (prepares the bundled model and the database on first start)."""
    import uvicorn

    from serai.app import create_app
    from serai.models import resolve_model

    settings = _settings(host=host, port=port, data_dir=data_dir, model=model,
                         model_name=model_name)
    _configure_logging(settings.log_level)
    try:
        path, name = resolve_model(settings, err)
    except ModelFileError as exc:
        raise _fail(str(exc)) from None
    settings = settings.model_copy(update={"model": path, "model_name": name})
    database = _database(settings)
    with database.session() as session:
        first_key = None
        if accounts.count_keys(session=session) == 0:
            _, first_key = accounts.create_key(session=session, name="admin", is_admin=True)
    database.dispose()
    if first_key is not None:
        err.print(Panel(
            f"[bold]{first_key}[/bold]\n\nThis admin key is shown once. Use it as "
            "`Authorization: Bearer <key>`;\n`serai keys create` makes more.",
            title="New data dir: admin API key", border_style="green"))
    err.print(f"Serving [bold]{name}[/bold] on http://{settings.host}:{settings.port} "
              f"(data dir {settings.data_dir.resolve()})")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, loop="uvloop",
                http="httptools", log_config=None, access_log=False,
                log_level=settings.log_level, timeout_graceful_shutdown=10)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "default",
    admin: Annotated[bool, typer.Option(help="Allow managing keys through /admin/v1.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Create a key and print its secret (the only time it is shown) on stdout."""
    database = _database(_settings(data_dir=data_dir))
    with database.session() as session:
        key, secret = accounts.create_key(session=session, name=name, is_admin=admin)
    err.print(f"Created {'admin ' if key.is_admin else ''}key {key.id} ({key.prefix}…) "
              f"named {key.name!r}. Store it now: it is not shown again.")
    typer.echo(secret)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys by prefix (secrets are never stored)."""
    database = _database(_settings(data_dir=data_dir))
    with database.session() as session:
        keys = accounts.list_keys(session=session)
    table = Table("id", "name", "admin", "created", "revoked")
    # The prefix is what `keys revoke` takes: never wrapped or cut, whatever the width.
    table.add_column("prefix", no_wrap=True, min_width=accounts.PREFIX_LENGTH + 1)
    for key in keys:
        table.add_row(str(key.id), key.name, "yes" if key.is_admin else "",
                      f"{key.created_at:%Y-%m-%d %H:%M}",
                      f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "", key.prefix + "…")
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    ref: Annotated[str, typer.Argument(help="Key id or prefix, as `serai keys list` shows.")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key; the server rejects it from the next request on."""
    database = _database(_settings(data_dir=data_dir))
    try:
        with database.session() as session:
            key = accounts.revoke_key(session=session, ref=ref)
    except SeraiError as exc:
        raise _fail(exc.message) from None
    err.print(f"Revoked key {key.id} ({key.prefix}…).")


@models_app.command("list")
def models_list(
    data_dir: DataDir = None,
    model: Annotated[Path | None, typer.Option(help="GGUF file instead of the bundled one.")] = None,
) -> None:
    """List the models `serai serve` would serve with these settings."""
    from serai.models import resolve_model

    settings = _settings(data_dir=data_dir, model=model)
    try:
        path, name = resolve_model(settings, err)
    except ModelFileError as exc:
        raise _fail(str(exc)) from None
    table = Table("model", "file", "size", "context")
    table.add_row(name, str(path), f"{path.stat().st_size / 2**20:.0f} MiB",
                  str(settings.context_length))
    Console().print(table)


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = None) -> None:
    """Create or migrate the database schema to the newest version."""
    settings = _settings(data_dir=data_dir)
    _database(settings)
    err.print(f"Database at {settings.resolved_database_url.split('@')[-1]} is up to date.")


def _ms(summary: Summary | None, stat: str) -> str:
    return "-" if summary is None else f"{getattr(summary, stat):.2f}"


def _bench_table(result: BenchResult) -> Table:
    config = result.config
    table = Table("Serving benchmark", "", title=f"{config.model} at {config.base_url} "
                  f"({config.mode}, concurrency {config.concurrency}, ~{config.input_len} in / "
                  f"{config.output_len} out)", show_header=False)
    table.add_row("Successful requests", str(result.completed))
    table.add_row("Failed requests", str(result.failed))
    table.add_row("Benchmark duration (s)", f"{result.duration_s:.2f}")
    table.add_row("Total input tokens", "-" if result.total_input_tokens is None
                  else str(result.total_input_tokens))
    table.add_row("Total generated tokens", f"{result.total_output_tokens} (counted by "
                  f"{', '.join(result.output_tokens_counted_by) or '-'})")
    table.add_row("Request throughput (req/s)", f"{result.request_throughput:.2f}")
    table.add_row("Output token throughput (tok/s)", f"{result.output_throughput:.2f}", end_section=True)
    for label, summary in (("TTFT", result.ttft_ms), ("TPOT", result.tpot_ms),
                           ("ITL", result.itl_ms), ("E2E latency", result.e2e_ms)):
        table.add_row(f"Mean {label} (ms)", _ms(summary, "mean"))
        table.add_row(f"Median {label} (ms)", _ms(summary, "median"))
        table.add_row(f"P99 {label} (ms)", _ms(summary, "p99"), end_section=True)
    return table


@app.command()
def bench(
    base_url: Annotated[str, typer.Option(
        help="OpenAI-compatible base URL, ending in /v1.")] = "http://127.0.0.1:8000/v1",
    model: Annotated[str, typer.Option(help="Model name sent with every request.")] = "gemma-3-270m",
    api_key: Annotated[str | None, typer.Option(
        envvar=["SERAI_API_KEY", "OPENAI_API_KEY"], show_envvar=True, show_default=False,
        help="Bearer key, if the server wants one.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 1,
    num_prompts: Annotated[int, typer.Option(min=1, help="Requests to send in all.")] = 16,
    input_len: Annotated[int, typer.Option(
        min=1, help="Prompt length in words (about one token each).")] = 128,
    output_len: Annotated[int, typer.Option(min=1, help="max_tokens of every request.")] = 128,
    chat: Annotated[bool, typer.Option(
        "--chat/--completions", help="/chat/completions or /completions.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic prompts.")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds one request may take.")] = 600.0,
    extra_body: Annotated[str | None, typer.Option(
        help='JSON object merged into every request, e.g. \'{"repeat_penalty": 1.0}\'.')] = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the result as JSON to this file.")] = None,
) -> None:
    """Measure a server with streaming requests: TTFT, TPOT, ITL, throughput (vLLM's definitions)."""
    import json

    from rich.markup import escape

    from serai.bench import BenchConfig, run

    try:
        extra = json.loads(extra_body) if extra_body else {}
    except json.JSONDecodeError as exc:
        raise _fail(f"--extra-body is not JSON: {exc}") from None
    if not isinstance(extra, dict):
        raise _fail("--extra-body must be a JSON object")
    config = BenchConfig(base_url=base_url, model=model, api_key=api_key or None,
                         concurrency=concurrency, num_prompts=num_prompts, input_len=input_len,
                         output_len=output_len, mode="chat" if chat else "completions",
                         seed=seed, timeout=timeout, extra_body=extra)
    err.print(f"Sending {num_prompts} requests to {base_url}, {concurrency} at a time…")
    result = run(config)
    Console().print(_bench_table(result))
    for message in result.errors:
        err.print(f"[red]Failed request:[/red] {escape(message)}", highlight=False)
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        err.print(f"Wrote {json_path}")
    if result.completed == 0:
        raise typer.Exit(1)
