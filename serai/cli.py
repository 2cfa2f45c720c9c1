"""The `serai` command: serve, keys, orgs, plans, prices, balance, usage, invoices, models,
deployments, audit, db, bench.

Every command takes --data-dir (or SERAI_DATA_DIR) and acts on that data dir's database, so
`serai keys create` makes a key for the server running on the same data dir. `serai deployments`
is the exception: deployments live in the running server's memory, so it calls the server's
admin API (--url, --key).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from sqlalchemy.orm import Session

from serai.billing import invoices, plans
from serai.billing.invoices import money
from serai.config import EmbeddedModelSettings, Settings, UpstreamSettings, load_settings
from serai.errors import ModelFileError, SeraiError
from serai.governance import accounts, audit
from serai.observability import redaction, request_log
from serai.storage.db import Database
from serai.storage.tables import Plan, PriceBook

if TYPE_CHECKING:
    from serai.bench import BenchResult, Summary

app = typer.Typer(help="Serai: open-weight models behind an OpenAI-compatible API.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
orgs_app = typer.Typer(help="Organizations: who keys, plans, prices and balances belong to.",
                       no_args_is_help=True)
plans_app = typer.Typer(help="Plans: rolling quota windows, rate limits, prepaid or "
                        "subscription.", no_args_is_help=True)
prices_app = typer.Typer(help="Price books: prices per million tokens, peak hours.",
                         no_args_is_help=True)
balance_app = typer.Typer(help="Balances: top-ups, adjustments and redemption codes.",
                          no_args_is_help=True)
codes_app = typer.Typer(help="Redemption codes: generate, list, disable.", no_args_is_help=True)
models_app = typer.Typer(help="The models this server serves.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log: verify its hash chain, export it.",
                        no_args_is_help=True)
deployments_app = typer.Typer(help="The running server's deployments: load and health, and "
                              "reloading them from the configuration.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(orgs_app, name="orgs")
app.add_typer(plans_app, name="plans")
app.add_typer(prices_app, name="prices")
app.add_typer(balance_app, name="balance")
balance_app.add_typer(codes_app, name="codes")
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
app.add_typer(deployments_app, name="deployments")
app.add_typer(audit_app, name="audit")

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
    err.print(f"[red]Error:[/red] {escape(message)}")  # "serai[otel]" is not markup
    return typer.Exit(1)


def _configure_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr, as JSON lines or text (see request_log.formatter); keys masked."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(request_log.formatter(log_format, sys.stderr))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    redaction.install()
    if level != "debug":
        # httpx logs every request at info, health probes of each upstream included; Serai
        # logs what matters of them itself.
        logging.getLogger("httpx").setLevel(logging.WARNING)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [default: 8000]")] = None,
    data_dir: DataDir = None,
    model: Annotated[Path | None, typer.Option(
        help="GGUF file to serve instead of the bundled Gemma 3 270M.")] = None,
    model_name: Annotated[str | None, typer.Option(
        help="Name clients request the model by [default: from the file]")] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="ADDRESS",
        help="Serve the model as Ray Serve replicas on the Ray cluster at ADDRESS.")] = None,
) -> None:
    """Serve the API (prepares the bundled model and the database on first start)."""
    import uvicorn

    from serai.api.request_heads import bounded_head_protocol
    from serai.app import create_app
    from serai.engines.models import admit_model
    from serai.engines.upstream import read_api_key

    flags = {"host": host, "port": port, "data_dir": data_dir, "model": model,
             "model_name": model_name, "ray_address": ray}
    settings = _settings(**flags)
    _configure_logging(settings.log_level, settings.log_format)
    def reread() -> Settings:  # on reload: the same flags over the new file and variables
        return _with_model_file(load_settings(**flags))

    try:
        for upstream in settings.upstreams:
            read_api_key(upstream)  # a missing key stops start-up with a plain message
        for entry in settings.models:  # refused here with a plain message, not at load
            if entry.path is not None or entry.sha256 is not None:
                admit_model(entry.path, settings, sha256=entry.sha256, console=err)
        settings = _with_model_file(settings)
        # Building the app opens nothing (its lifespan does), but refuses a malformed content
        # key or SERAI_OTEL_ENDPOINT without the otel extra: a plain message, never the key.
        app = create_app(settings, reread=reread, sighup=True)
    except (ValueError, ModelFileError) as exc:
        raise _fail(str(exc)) from None
    database = _database(settings)
    with database.session() as session:
        audit.act_as(session, "cli")
        first_key = None
        if accounts.count_keys(session=session) == 0:
            _, first_key = accounts.create_key(session=session, name="admin", is_admin=True)
    database.dispose()
    if first_key is not None:
        err.print(Panel(
            f"[bold]{first_key}[/bold]\n\nThis admin key is shown once. Use it as "
            "`Authorization: Bearer <key>`;\n`serai keys create` makes more.",
            title="New data dir: admin API key", border_style="green"))
    served: list[str] = []
    declared: list[EmbeddedModelSettings | UpstreamSettings] = [*settings.embedded_models,
                                                                *settings.upstreams]
    for each in declared:  # a model is named once
        served += [n for n in (each.name, *each.aliases) if n not in served]
    scheme = "https" if settings.tls_certfile else "http"
    err.print(f"Serving [bold]{', '.join(served) or 'no model'}[/bold] on "
              f"{scheme}://{settings.host}:{settings.port} "
              f"(data dir {settings.data_dir.resolve()})")
    if settings.admin_port is not None:
        err.print(f"Admin API on {scheme}://{settings.admin_host or settings.host}:"
                  f"{settings.admin_port} only")
    if settings.metrics_port is not None:
        err.print(f"Metrics on {scheme}://{settings.host}:{settings.metrics_port}/metrics only")
    err.print(f"Console on {scheme}://{settings.host}:{settings.port}/console "
              "(sign in with an admin key)")

    config = uvicorn.Config(app,
                            host=settings.host, port=settings.port, loop="uvloop",
                            http=bounded_head_protocol(
                                header_timeout_s=settings.header_timeout_s,
                                max_header_bytes=settings.max_header_bytes),
                            log_config=None, access_log=False,
                            log_level=settings.log_level, timeout_graceful_shutdown=10,
                            ssl_certfile=settings.tls_certfile, ssl_keyfile=settings.tls_keyfile)
    server = uvicorn.Server(config)
    if settings.admin_port is None and settings.metrics_port is None:
        server.run()
        return
    # One app (one lifespan, one set of engines) on several listening sockets; PortListener
    # tells them apart by the socket a request arrived on.
    try:
        sockets = [_listen(settings.host, settings.port)]
        if settings.admin_port is not None:
            sockets.append(_listen(settings.admin_host or settings.host, settings.admin_port))
        if settings.metrics_port is not None:
            sockets.append(_listen(settings.host, settings.metrics_port))
    except OSError as exc:
        raise _fail(f"cannot listen: {exc.strerror}") from None
    server.run(sockets=sockets)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=2048)


def _with_model_file(settings: Settings) -> Settings:
    """With one embedded model given by the top-level settings, prepare or check its file now
    (with a progress bar on first start), so the engine loads the file as named here."""
    if not settings.embedded or settings.models:
        return settings
    from serai.engines.models import resolve_model

    path, name = resolve_model(settings, err)
    return settings.model_copy(update={"model": path, "model_name": name})


@contextmanager
def _session(data_dir: Path | None) -> Iterator[Session]:
    """A session on the data dir's database; a domain error becomes a one-line message."""
    database = _database(_settings(data_dir=data_dir))
    try:
        with database.session() as session:
            yield audit.act_as(session, "cli")  # the audit log names the CLI as the actor
    except SeraiError as exc:
        raise _fail(exc.message) from None
    finally:
        database.dispose()


def _org_id(session: Session, ref: str | None) -> int | None:
    return None if ref is None else accounts.find_org(session=session, ref=ref).id


def _when(moment: datetime | None) -> str:
    return f"{moment:%Y-%m-%d %H:%M}" if moment is not None else ""


def _expiry(text: str | None) -> datetime | None:
    """A date or date-time, UTC unless it says otherwise."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _fail(f"{text!r} is not a date like 2027-01-31 or 2027-01-31T12:00") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _money(text: str) -> int:
    try:
        return invoices.parse_money(text)
    except SeraiError as exc:
        raise _fail(exc.message) from None


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


Org = Annotated[str, typer.Argument(help="Organization id or name.")]


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "default",
    admin: Annotated[bool, typer.Option(
        help="An admin key for /admin/v1: a platform operator, or with --org the org's owner.")] = False,
    org: Annotated[str | None, typer.Option(
        help="Organization (id or name) the key belongs to [default: the default org]")] = None,
    role: Annotated[str | None, typer.Option(
        help="Admin role: operator, or owner/admin/viewer of --org.")] = None,
    models: Annotated[str | None, typer.Option(
        help="Comma-separated models the key may use [default: all]")] = None,
    cidrs: Annotated[str | None, typer.Option(
        help="Comma-separated client networks the key may be used from [default: any]")] = None,
    expires: Annotated[str | None, typer.Option(help="Expiry, e.g. 2027-01-31 (UTC).")] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a key and print its secret (the only time it is shown) on stdout."""
    with _session(data_dir) as session:
        key, secret = accounts.create_key(
            session=session, name=name, is_admin=admin, org_id=_org_id(session, org), role=role,
            allowed_models=_csv(models), allowed_cidrs=_csv(cidrs), expires_at=_expiry(expires),
            rpm=rpm, tpm=tpm)
    kind = f"{key.role} " if key.role else ""
    err.print(f"Created {kind}key {key.id} ({key.prefix}…) named {key.name!r}. Store it now: it "
              f"is not shown again.")
    typer.echo(secret)


@keys_app.command("list")
def keys_list(
    org: Annotated[str | None, typer.Option(help="Only this organization's keys.")] = None,
    data_dir: DataDir = None,
) -> None:
    """List keys by prefix (secrets are never stored)."""
    with _session(data_dir) as session:
        keys = accounts.list_keys(session=session, org_id=_org_id(session, org))
        orgs = {o.id: o.name for o in accounts.list_orgs(session=session)}
    table = Table("id", "name", "org", "role", "created", "expires", "revoked")
    # The prefix is what `keys revoke` takes: never wrapped or cut, whatever the width.
    table.add_column("prefix", no_wrap=True, min_width=accounts.PREFIX_LENGTH + 1)
    for key in keys:
        table.add_row(str(key.id), key.name, orgs.get(key.org_id or 0, ""), key.role or "",
                      _when(key.created_at), _when(key.expires_at), _when(key.revoked_at),
                      key.prefix + "…")
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    ref: Annotated[str, typer.Argument(help="Key id or prefix, as `serai keys list` shows.")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key; the server rejects it from the next request on."""
    with _session(data_dir) as session:
        key = accounts.revoke_key(session=session, ref=ref)
    err.print(f"Revoked key {key.id} ({key.prefix}…).")


@keys_app.command("update")
def keys_update(
    ref: Annotated[str, typer.Argument(help="Key id or prefix, as `serai keys list` shows.")],
    retention: Annotated[str | None, typer.Option(
        help="zero or store: stricter than the key's organization, never looser; inherit "
        "follows the organization again.")] = None,
    retention_days: Annotated[int | None, typer.Option(
        min=1, help="Days stored content is kept (at most the organization's).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Change a key's retention policy."""
    fields: dict[str, Any] = {}
    if retention is not None:
        fields["retention"] = None if retention == "inherit" else retention
    with _session(data_dir) as session:
        key = accounts.update_key(session=session, ref=ref, retention_days=retention_days,
                                  **fields)
    shown = key.retention.describe() if key.retention else "its organization's"
    err.print(f"Key {key.id} ({key.prefix}…) retention: {shown}.")


def _limits(rpm: int | None, tpm: int | None, concurrency: int | None) -> str:
    return ", ".join(f"{label} {value}" for label, value in (
        ("rpm", rpm), ("tpm", tpm), ("concurrency", concurrency)) if value is not None)


def _lifted(**limits: int | None) -> dict[str, Any]:
    """The limits given on the command line; 0 lifts a limit (None in the database)."""
    return {field: value or None for field, value in limits.items() if value is not None}


# -- organizations ----------------------------------------------------------------------------


def _org_table(session: Session, orgs: list[accounts.OrgInfo]) -> Table:
    plan_names = {p.id: p.name for p in plans.list_plans(session=session)}
    book_names = {b.id: b.name for b in plans.list_price_books(session=session)}
    table = Table("id", "name", "plan", "price book", "balance", "limits", "retention", "state")
    for org in orgs:
        table.add_row(str(org.id), org.name, plan_names.get(org.plan_id or 0, ""),
                      book_names.get(org.price_book_id or 0, ""), money(org.balance_micros),
                      _limits(org.rpm, org.tpm, org.max_concurrency), org.retention.describe(),
                      "disabled" if org.disabled else "active")
    return table


@orgs_app.command("create")
def orgs_create(
    name: Annotated[str, typer.Argument(help="The organization's name.")],
    plan: Annotated[str | None, typer.Option(help="Plan id or name.")] = None,
    price_book: Annotated[str | None, typer.Option(help="Price book id or name.")] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(min=1, help="Requests in flight.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Create an organization."""
    with _session(data_dir) as session:
        org = accounts.create_org(
            session=session, name=name,
            plan_id=plans.find_plan(session=session, ref=plan).id if plan else None,
            price_book_id=plans.find_price_book(session=session, ref=price_book).id
            if price_book else None, rpm=rpm, tpm=tpm, max_concurrency=max_concurrency)
    err.print(f"Created organization {org.id} ({org.name}). `serai keys create --org "
              f"{org.name}` gives it a key.")


@orgs_app.command("list")
def orgs_list(data_dir: DataDir = None) -> None:
    """List organizations with their plan, price book, balance and limits."""
    with _session(data_dir) as session:
        table = _org_table(session, accounts.list_orgs(session=session))
    Console().print(table)


@orgs_app.command("update")
def orgs_update(
    org: Org,
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    plan: Annotated[str | None, typer.Option(help="Plan id or name; 'none' removes it.")] = None,
    price_book: Annotated[str | None, typer.Option(
        help="Price book id or name; 'none' removes it.")] = None,
    rpm: Annotated[int | None, typer.Option(min=0, help="Requests per minute; 0 lifts it.")] = None,
    tpm: Annotated[int | None, typer.Option(min=0, help="Tokens per minute; 0 lifts it.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(
        min=0, help="Requests in flight; 0 lifts it.")] = None,
    disable: Annotated[bool | None, typer.Option(
        "--disable/--enable", help="Refuse (or allow again) every request of the organization.",
        show_default=False)] = None,
    regions: Annotated[str | None, typer.Option(
        help="Comma-separated regions whose deployments may serve it; '' lifts it.")] = None,
    retention: Annotated[str | None, typer.Option(
        help="What may be kept of its calls' content: zero (nothing) or store (stored "
        "completions, for --retention-days).")] = None,
    retention_days: Annotated[int | None, typer.Option(
        min=1, help="Days stored content is kept under the store policy.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Change an organization's name, plan, price book, limits, regions, retention or state."""
    with _session(data_dir) as session:
        found = accounts.find_org(session=session, ref=org)
        fields: dict[str, Any] = {}
        if plan is not None:
            fields["plan_id"] = None if plan == "none" else plans.find_plan(
                session=session, ref=plan).id
        if price_book is not None:
            fields["price_book_id"] = None if price_book == "none" else plans.find_price_book(
                session=session, ref=price_book).id
        fields.update(_lifted(rpm=rpm, tpm=tpm, max_concurrency=max_concurrency))
        if regions is not None:
            fields["allowed_regions"] = _csv(regions) or None
        updated = accounts.update_org(session=session, org_id=found.id, name=name,
                                      disabled=disable, retention=retention,
                                      retention_days=retention_days,
                                      **fields)
        table = _org_table(session, [updated])
    Console().print(table)


# -- plans and prices -------------------------------------------------------------------------


def _window(text: str) -> dict[str, object]:
    metric, _, rest = text.partition(":")
    limit, _, seconds = rest.partition(":")
    try:
        return {"metric": metric, "limit": int(limit), "seconds": plans.parse_duration(seconds)}
    except ValueError:
        raise _fail(f"--window {text!r}: write METRIC:LIMIT:DURATION, e.g. requests:120:5h or "
                    f"tokens:2000000:7d") from None


def _multipliers(items: list[str] | None) -> dict[str, float] | None:
    if not items:
        return None
    result = {}
    for item in items:
        model, _, factor = item.rpartition("=")
        try:
            result[model] = float(factor)
        except ValueError:
            raise _fail(f"--multiplier {item!r}: write MODEL=FACTOR, e.g. big-model=3") from None
    return result


def _plan_text(rows: list[Plan]) -> str:
    """Plans as short blocks: windows and limits stay readable at any terminal width."""
    blocks = []
    for plan in rows:
        kind = "prepaid" if plan.draws_balance else "subscription"
        lines = [f"{plan.name} (id {plan.id}, {kind}{', disabled' if plan.disabled else ''})"]
        windows = ", ".join(f"{w['limit']} {w['metric']}/{plans.format_duration(w['seconds'])}"
                            for w in plan.windows)
        lines.append(f"  windows: {windows or 'none'}")
        if plan.model_multipliers:
            lines.append("  multipliers: " + ", ".join(
                f"{m}×{f:g}" for m, f in plan.model_multipliers.items()))
        limits = _limits(plan.rpm, plan.tpm, plan.max_concurrency)
        lines.append(f"  limits: {limits or 'none'}; price ratio "
                     f"{plan.price_ratio_milli / 1000:g}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks) if blocks else "No plans yet: `serai plans create NAME` makes one."


Windows = Annotated[list[str] | None, typer.Option(
    "--window", help="METRIC:LIMIT:DURATION, repeatable: requests:120:5h, tokens:2000000:7d, "
    "credits:5000000:30d (credits are micro-units of money).")]
Multipliers = Annotated[list[str] | None, typer.Option(
    "--multiplier", help="MODEL=FACTOR, repeatable: a request of MODEL counts FACTOR times.")]


@plans_app.command("create")
def plans_create(
    name: Annotated[str, typer.Argument(help="The plan's name.")],
    window: Windows = None,
    multiplier: Multipliers = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(min=1, help="Requests in flight.")] = None,
    subscription: Annotated[bool, typer.Option(
        help="Count usage in the windows only, never charge the balance.")] = False,
    price_ratio: Annotated[float, typer.Option(
        min=0, help="Scale every price: 0.8 is 20% off.")] = 1.0,
    data_dir: DataDir = None,
) -> None:
    """Create a plan: rolling windows, multipliers, rate limits, prepaid or subscription."""
    with _session(data_dir) as session:
        plan = plans.create_plan(
            session=session, name=name, windows=[_window(w) for w in window or []],
            model_multipliers=_multipliers(multiplier), rpm=rpm, tpm=tpm,
            max_concurrency=max_concurrency, draws_balance=not subscription,
            price_ratio_milli=round(price_ratio * 1000))
        text = _plan_text([plan])
    typer.echo(text)


@plans_app.command("list")
def plans_list(data_dir: DataDir = None) -> None:
    """List plans."""
    with _session(data_dir) as session:
        text = _plan_text(plans.list_plans(session=session))
    typer.echo(text)


@plans_app.command("update")
def plans_update(
    plan: Annotated[str, typer.Argument(help="Plan id or name.")],
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    window: Windows = None,
    multiplier: Multipliers = None,
    rpm: Annotated[int | None, typer.Option(min=0, help="Requests per minute; 0 lifts it.")] = None,
    tpm: Annotated[int | None, typer.Option(min=0, help="Tokens per minute; 0 lifts it.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(
        min=0, help="Requests in flight; 0 lifts it.")] = None,
    price_ratio: Annotated[float | None, typer.Option(min=0, help="Scale every price.")] = None,
    disable: Annotated[bool | None, typer.Option(
        "--disable/--enable", help="Refuse (or allow again) requests of the plan's "
        "organizations.", show_default=False)] = None,
    data_dir: DataDir = None,
) -> None:
    """Change a plan; --window replaces all its windows."""
    with _session(data_dir) as session:
        found = plans.find_plan(session=session, ref=plan)
        limits = _lifted(rpm=rpm, tpm=tpm, max_concurrency=max_concurrency)
        updated = plans.update_plan(
            session=session, plan_id=found.id, name=name,
            windows=[_window(w) for w in window] if window else None,
            model_multipliers=_multipliers(multiplier), disabled=disable,
            price_ratio_milli=None if price_ratio is None else round(price_ratio * 1000),
            **limits)
        text = _plan_text([updated])
    typer.echo(text)


def _peak(text: str) -> dict[str, int]:
    try:
        hours, _, factor = text.partition("x")
        start, _, end = hours.partition("-")
        return {"start_hour": int(start), "end_hour": int(end),
                "multiplier_milli": round(float(factor) * 1000)}
    except ValueError:
        raise _fail(f"--peak {text!r}: write START-ENDxFACTOR in UTC hours, e.g. 14-18x3") from None


def _price_table(session: Session, book: PriceBook) -> Table:
    peaks = ", ".join(f"{p['start_hour']}-{p['end_hour']}h ×{p['multiplier_milli'] / 1000:g}"
                      for p in book.peak_hours)
    table = Table("model", "input", "cached input", "output",
                  title=f"{book.name} ({book.currency} per million tokens"
                        f"{'; peak ' + peaks + ' UTC' if peaks else ''})")
    for price in plans.prices(session=session, price_book_id=book.id):
        table.add_row(price.model, money(price.input_micros), money(price.cached_input_micros),
                      money(price.output_micros))
    return table


@prices_app.command("create-book")
def prices_create_book(
    name: Annotated[str, typer.Argument(help="The price book's name.")],
    currency: Annotated[str, typer.Option(help="Currency code.")] = "USD",
    peak: Annotated[list[str] | None, typer.Option(
        help="START-ENDxFACTOR in UTC hours, repeatable: 14-18x3 is triple price 14:00-18:00.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a price book."""
    with _session(data_dir) as session:
        book = plans.create_price_book(session=session, name=name, currency=currency,
                                       peak_hours=[_peak(p) for p in peak or []])
    err.print(f"Created price book {book.id} ({book.name}, {book.currency}). `serai prices set "
              f"{book.name} MODEL --input X --output Y` prices a model.")


@prices_app.command("books")
def prices_books(data_dir: DataDir = None) -> None:
    """List price books with their prices."""
    with _session(data_dir) as session:
        tables = [_price_table(session, b) for b in plans.list_price_books(session=session)]
    for table in tables:
        Console().print(table)


@prices_app.command("set")
def prices_set(
    book: Annotated[str, typer.Argument(help="Price book id or name.")],
    model: Annotated[str, typer.Argument(help="Model name as clients request it.")],
    input: Annotated[str, typer.Option(help="Price per million input tokens, e.g. 0.50.")],
    output: Annotated[str, typer.Option(help="Price per million output tokens.")],
    cached: Annotated[str | None, typer.Option(
        help="Price per million cached input tokens [default: the input price]")] = None,
    data_dir: DataDir = None,
) -> None:
    """Set a model's prices in a price book (amounts in the book's currency)."""
    with _session(data_dir) as session:
        found = plans.find_price_book(session=session, ref=book)
        plans.set_price(session=session, price_book_id=found.id, model=model,
                        input_micros=_money(input), output_micros=_money(output),
                        cached_input_micros=None if cached is None else _money(cached))
        table = _price_table(session, found)
    Console().print(table)


@prices_app.command("remove")
def prices_remove(
    book: Annotated[str, typer.Argument(help="Price book id or name.")],
    model: Annotated[str, typer.Argument(help="Model name.")],
    data_dir: DataDir = None,
) -> None:
    """Remove a model's prices from a price book (it becomes free under that book)."""
    with _session(data_dir) as session:
        found = plans.find_price_book(session=session, ref=book)
        plans.remove_price(session=session, price_book_id=found.id, model=model)
    err.print(f"Removed the prices of {model} from {found.name}.")


# -- balances and redemption codes ------------------------------------------------------------


@balance_app.command("show")
def balance_show(org: Org, data_dir: DataDir = None) -> None:
    """Show an organization's balance and its latest entries."""
    with _session(data_dir) as session:
        found = accounts.find_org(session=session, ref=org)
        entries = accounts.balance_entries(session=session, org_id=found.id, limit=20)
    err.print(f"{found.name}: balance {money(found.balance_micros)}")
    table = Table("when", "kind", "amount", "reason")
    for entry in entries:
        table.add_row(_when(entry.created_at), entry.kind, money(entry.amount_micros),
                      entry.reason)
    Console().print(table)


Amount = Annotated[str, typer.Argument(help="Amount in the currency, e.g. 25 or 12.50.")]
Reason = Annotated[str, typer.Option(help="Why the balance changes (kept with the entry).")]


@balance_app.command("topup")
def balance_topup(org: Org, amount: Amount, reason: Reason, data_dir: DataDir = None) -> None:
    """Add money to an organization's balance."""
    micros = _money(amount)
    if micros <= 0:
        raise _fail("A top-up adds money: give an amount above zero (`balance adjust` takes).")
    with _session(data_dir) as session:
        found = accounts.find_org(session=session, ref=org)
        updated = accounts.adjust_balance(session=session, org_id=found.id, amount_micros=micros,
                                          kind="topup", reason=reason)
    err.print(f"{updated.name}: balance {money(updated.balance_micros)}")


@balance_app.command("adjust")
def balance_adjust(
    org: Org,
    amount: Annotated[str, typer.Option(help="Signed amount, e.g. --amount -5 or --amount 2.5.")],
    reason: Reason,
    data_dir: DataDir = None,
) -> None:
    """Correct a balance up or down (never below zero)."""
    with _session(data_dir) as session:
        found = accounts.find_org(session=session, ref=org)
        updated = accounts.adjust_balance(session=session, org_id=found.id,
                                          amount_micros=_money(amount), kind="adjustment",
                                          reason=reason)
    err.print(f"{updated.name}: balance {money(updated.balance_micros)}")


@balance_app.command("redeem")
def balance_redeem(
    org: Org,
    code: Annotated[str, typer.Argument(help="The redemption code.")],
    data_dir: DataDir = None,
) -> None:
    """Redeem a code into an organization's balance."""
    with _session(data_dir) as session:
        found = accounts.find_org(session=session, ref=org)
        updated = accounts.redeem_code(session=session, org_id=found.id, code=code)
    err.print(f"{updated.name}: balance {money(updated.balance_micros)}")


@codes_app.command("generate")
def codes_generate(
    count: Annotated[int, typer.Option(min=1, help="How many codes.")],
    amount: Annotated[str, typer.Option(help="What each code is worth, e.g. 10.")],
    batch: Annotated[str, typer.Option(help="A label for this batch.")],
    expires: Annotated[str | None, typer.Option(help="Expiry, e.g. 2027-01-31 (UTC).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Generate redemption codes and print them, one per line (the only time they are shown)."""
    with _session(data_dir) as session:
        minted = accounts.generate_codes(session=session, count=count,
                                         amount_micros=_money(amount), batch=batch,
                                         expires_at=_expiry(expires))
    err.print(f"Generated {len(minted)} codes worth {amount} each in batch {batch!r}. Store them "
              f"now: they are not shown again.")
    for _, code in minted:
        typer.echo(code)


@codes_app.command("list")
def codes_list(
    batch: Annotated[str | None, typer.Option(help="Only this batch.")] = None,
    data_dir: DataDir = None,
) -> None:
    """List redemption codes by prefix, with who redeemed them."""
    with _session(data_dir) as session:
        codes = accounts.list_codes(session=session, batch=batch)
    table = Table("id", "batch", "amount", "expires", "redeemed", "by org", "state")
    table.add_column("prefix", no_wrap=True)
    for code in codes:
        state = "disabled" if code.disabled else ("used" if code.redeemed_at else "open")
        table.add_row(str(code.id), code.batch, money(code.amount_micros), _when(code.expires_at),
                      _when(code.redeemed_at), str(code.redeemed_by_org_id or ""), state,
                      code.prefix + "…")
    Console().print(table)


@codes_app.command("disable")
def codes_disable(
    batch: Annotated[str, typer.Argument(help="The batch whose open codes to disable.")],
    data_dir: DataDir = None,
) -> None:
    """Disable every code of a batch not yet redeemed."""
    with _session(data_dir) as session:
        count = accounts.disable_codes(session=session, batch=batch)
    err.print(f"Disabled {count} codes of batch {batch!r}.")


# -- usage and invoices -----------------------------------------------------------------------


@app.command()
def usage(
    org: Org,
    start: Annotated[str | None, typer.Option(help="First UTC day, YYYY-MM-DD [default: 30 "
                                                   "days ago]")] = None,
    end: Annotated[str | None, typer.Option(help="Last UTC day [default: today]")] = None,
    data_dir: DataDir = None,
) -> None:
    """An organization's usage by day and model: requests, tokens and cost."""
    try:
        first = date.fromisoformat(start) if start else None
        last = date.fromisoformat(end) if end else None
    except ValueError as exc:
        raise _fail(f"A day is written YYYY-MM-DD: {exc}") from None
    with _session(data_dir) as session:
        found = accounts.find_org(session=session, ref=org)
        first, last = invoices.date_range(first, last)
        lines = invoices.daily_usage(session=session, org_id=found.id, start=first, end=last)
    table = Table("day", "model", "requests", "input", "cached", "output", "cost", "charged",
                  title=f"Usage of {found.name}")
    for line in lines:
        table.add_row(line.period, line.model, str(line.requests), str(line.input_tokens),
                      str(line.cached_input_tokens), str(line.output_tokens),
                      money(line.cost_micros), money(line.charged_micros))
    Console().print(table)


@app.command("invoices")
def invoices_show(
    org: Org,
    month: Annotated[str, typer.Argument(help="The month, YYYY-MM (UTC).")],
    csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout instead of JSON.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Print an organization's invoice for a month (JSON, or CSV with --csv)."""
    import json

    with _session(data_dir) as session:
        found = accounts.find_org(session=session, ref=org)
        bill = invoices.invoice(session=session, org_id=found.id, month=month)
    typer.echo(bill.as_csv() if csv else json.dumps(bill.as_dict(), indent=2), nl=not csv)


@models_app.command("list")
def models_list(
    data_dir: DataDir = None,
    model: Annotated[Path | None, typer.Option(help="GGUF file instead of the bundled one.")] = None,
) -> None:
    """List the embedded models `serai serve` would serve with these settings."""
    from serai.engines.models import admit_model

    settings = _settings(data_dir=data_dir, model=model)
    table = Table("model", "file", "size", "context")
    for entry in settings.embedded_models:
        try:
            path = admit_model(entry.path, settings, sha256=entry.sha256, console=err)
        except ModelFileError as exc:
            raise _fail(str(exc)) from None
        table.add_row(entry.name, str(path), f"{path.stat().st_size / 2**20:.0f} MiB",
                      str(entry.context_length))
    Console().print(table)


ServerUrl = Annotated[str | None, typer.Option(
    "--url", envvar="SERAI_URL", help="The running server's address. Default: "
    "http://<host>:<port> of the settings (<admin_host>:<admin_port> if admin_port is set).",
    show_default=False)]
AdminKey = Annotated[str | None, typer.Option(
    "--key", envvar="SERAI_ADMIN_KEY", help="A platform operator's admin key.",
    show_default=False)]


def _server_call(method: str, path: str, *, url: str | None, key: str | None,
                 data_dir: Path | None) -> dict[str, Any]:
    """Call the running server's admin API; its error message, or why it cannot be reached,
    becomes a one-line failure."""
    import httpx

    if not key:
        raise _fail("give a platform operator's admin key with --key or SERAI_ADMIN_KEY")
    if url is None:
        settings = _settings(data_dir=data_dir)
        host = (settings.admin_host or settings.host) if settings.admin_port else settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard: this machine
        url = (f"{'https' if settings.tls_certfile else 'http'}://{host}:"
               f"{settings.admin_port or settings.port}")
    try:
        # Long enough for a reload that loads GGUF files.
        response = httpx.request(method, f"{url.rstrip('/')}/admin/v1{path}", timeout=600,
                                 headers={"authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the server at {url}: {type(exc).__name__}") from None
    try:
        body: dict[str, Any] = response.json()
    except ValueError:
        raise _fail(f"the server at {url} answered {response.status_code}, not JSON") from None
    if response.status_code >= 400:
        error = body.get("error") or {}
        raise _fail(str(error.get("message") or f"the server answered {response.status_code}"))
    return body


def _health(deployment: dict[str, Any]) -> str:
    health = deployment["health"]
    text = health["circuit"]
    if health["consecutive_failures"]:
        text += f", {health['consecutive_failures']} failed"
    return text + (", draining" if deployment["draining"] else "")


def _probe(deployment: dict[str, Any]) -> str:
    probe = deployment["health"]["last_probe"]
    if probe is None:
        return "-"
    at = datetime.fromisoformat(probe["at"]).astimezone()
    return f"{'ok' if probe['ok'] else 'failed'} {at:%H:%M:%S}" + (
        f" {probe['detail']}" if probe["detail"] else "")


@deployments_app.command("list")
def deployments_list(
    url: ServerUrl = None, key: AdminKey = None, data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """List the running server's deployments with their load and health."""
    body = _server_call("GET", "/deployments", url=url, key=key, data_dir=data_dir)
    if as_json:
        typer.echo(json.dumps(body["data"], indent=2))
        return
    table = Table("deployment", "model", "kind", "region", "weight", "load", "health",
                  "last probe")
    for d in body["data"]:
        limit = "" if d["max_concurrency"] is None else f"/{d['max_concurrency']}"
        table.add_row(d["id"], ", ".join([d["model"], *d["aliases"]]), d["kind"], d["region"],
                      str(d["weight"]), f"{d['outstanding']}{limit}", _health(d), _probe(d))
    Console(width=max(Console().width, 140)).print(table)


@deployments_app.command("reload")
def deployments_reload(url: ServerUrl = None, key: AdminKey = None,
                       data_dir: DataDir = None) -> None:
    """Make the running server re-read serai.toml and its variables and apply the deployments:
    add new ones, drain removed ones, replace changed ones (as SIGHUP does)."""
    body = _server_call("POST", "/deployments/reload", url=url, key=key, data_dir=data_dir)
    for change in ("added", "removed", "replaced", "unchanged"):
        typer.echo(f"{change}: {', '.join(body[change]) or '-'}")


@audit_app.command("verify")
def audit_verify(data_dir: DataDir = None) -> None:
    """Walk the audit log's hash chain; fail naming the first changed or missing entry."""
    with _session(data_dir) as session:
        verdict = audit.verify(session=session)
    if not verdict.ok:
        raise _fail(f"audit entry {verdict.broken_id}: {verdict.problem}. The {verdict.intact} "
                    f"entries before it are intact.")
    typer.echo(f"Audit log intact: {verdict.intact} entries.")


@audit_app.command("export")
def audit_export(
    output: Annotated[Path | None, typer.Option(
        help="Write to this file instead of stdout.")] = None,
    since: Annotated[str | None, typer.Option(
        help="Only entries from this time on, e.g. 2027-01-31 or 2027-01-31T12:00 (UTC).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Write the audit log as JSON lines, oldest first, hashes included (to keep elsewhere)."""
    start = _expiry(since)
    count = 0
    with _session(data_dir) as session, (
            output.open("w") if output is not None else nullcontext(sys.stdout)) as out:
        for entry in audit.export(session=session, since=start):
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
            count += 1
    if output is not None:
        err.print(f"Wrote {count} audit entries to {output}.")


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
