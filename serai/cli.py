"""The `serai` command: serve, keys, models, db.

Every command takes --data-dir (or SERAI_DATA_DIR) and acts on that data dir's database, so
`serai keys create` makes a key for the server running on the same data dir.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from serai import accounts
from serai.config import Settings, load_settings
from serai.errors import ModelFileError, SeraiError
from serai.storage.db import Database

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
    table = Table("id", "name", "prefix", "admin", "created", "revoked")
    for key in keys:
        table.add_row(str(key.id), key.name, key.prefix + "…", "yes" if key.is_admin else "",
                      f"{key.created_at:%Y-%m-%d %H:%M}",
                      f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "")
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
