"""The `serai` commands an operator runs on a data dir: keys, db, and the commerce commands
(orgs, plans, prices, balance, usage, invoices: the admin API's operations, with amounts
written in the currency)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import insert
from typer.testing import CliRunner

from serai.cli import app
from serai.errors import AuthenticationFailed
from serai.governance import accounts
from serai.storage.db import Database, db_now_ms
from serai.storage.tables import UsageRow

SECRET = re.compile(r"sk-serai-[A-Za-z0-9_-]{43}")


pytestmark = pytest.mark.usefixtures("cli_env")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def serai(*args: str, env: dict[str, str] | None = None) -> Result:
    # 80 columns: what rich uses when the output is piped, whatever this terminal is.
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "80", **(env or {})})


def create_key(data_dir: Path, name: str = "x") -> str:
    result = serai("keys", "create", "--name", name, "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


@pytest.fixture
def data_dir_db(data_dir: Path) -> Iterator[Database]:
    """The data dir's database, as the server would open it (created by the first command)."""
    db = Database(f"sqlite:///{data_dir / 'serai.db'}")
    yield db
    db.dispose()


def authenticate(database: Database, secret: str) -> accounts.KeyInfo:
    with database.session() as session:
        return accounts.authenticate(session=session, secret=secret)


def test_keys_create_prints_only_the_secret_on_stdout(data_dir: Path, data_dir_db: Database) -> None:
    result = serai("keys", "create", "--name", "x", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    assert SECRET.fullmatch(result.stdout.rstrip("\n")), result.stdout
    secret = result.stdout.strip()
    assert secret not in result.stderr
    assert "not shown again" in " ".join(result.stderr.split())
    assert authenticate(data_dir_db, secret).name == "x"


def test_keys_create_with_admin(data_dir: Path, data_dir_db: Database) -> None:
    result = serai("keys", "create", "--name", "ops", "--admin", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    assert authenticate(data_dir_db, result.stdout.strip()).is_admin


def test_keys_list_shows_prefixes_never_secrets(data_dir: Path) -> None:
    secrets = [create_key(data_dir, "x"), create_key(data_dir, "y")]
    result = serai("keys", "list", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    for secret in secrets:
        assert secret[: accounts.PREFIX_LENGTH] in result.stdout
        assert secret[accounts.PREFIX_LENGTH : accounts.PREFIX_LENGTH + 8] not in result.output


def test_keys_list_shows_whole_prefixes_at_80_columns(data_dir: Path) -> None:
    revoked = create_key(data_dir, "ci-deploy-production")
    kept = create_key(data_dir, "ci-deploy-staging")
    assert serai("keys", "revoke", "1", "--data-dir", str(data_dir)).exit_code == 0
    result = serai("keys", "list", "--data-dir", str(data_dir))
    for secret in (revoked, kept):
        assert secret[: accounts.PREFIX_LENGTH] in result.stdout, result.stdout


def test_keys_revoke_by_id_locks_the_key_out(data_dir: Path, data_dir_db: Database) -> None:
    secret = create_key(data_dir, "x")
    other = create_key(data_dir, "y")
    result = serai("keys", "revoke", "1", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    assert "Revoked key 1" in result.stderr
    with pytest.raises(AuthenticationFailed, match="revoked"):
        authenticate(data_dir_db, secret)
    assert authenticate(data_dir_db, other).name == "y"


def test_keys_revoke_by_the_prefix_keys_list_shows(data_dir: Path, data_dir_db: Database) -> None:
    secret = create_key(data_dir)
    shown = secret[: accounts.PREFIX_LENGTH] + "…"  # copied from `serai keys list`
    assert shown in serai("keys", "list", "--data-dir", str(data_dir)).stdout
    result = serai("keys", "revoke", shown, "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    with pytest.raises(AuthenticationFailed, match="revoked"):
        authenticate(data_dir_db, secret)


def test_keys_revoke_unknown_id_fails_clearly(data_dir: Path) -> None:
    create_key(data_dir)
    result = serai("keys", "revoke", "999", "--data-dir", str(data_dir))
    assert result.exit_code == 1
    assert "No API key '999'" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_keys_revoke_huge_id_fails_clearly(data_dir: Path) -> None:
    create_key(data_dir)
    result = serai("keys", "revoke", "99999999999999999999", "--data-dir", str(data_dir))
    assert isinstance(result.exception, SystemExit), result.exception
    assert "No API key" in result.stderr


def test_db_upgrade_creates_the_database_in_the_data_dir(data_dir: Path, data_dir_db: Database) -> None:
    result = serai("db", "upgrade", "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    assert (data_dir / "serai.db").is_file()
    assert data_dir_db.is_current()
    assert "up to date" in result.stderr


def test_data_dir_from_the_environment(tmp_path: Path, data_dir: Path, data_dir_db: Database) -> None:
    env = {"SERAI_DATA_DIR": str(data_dir)}
    result = serai("keys", "create", "--name", "x", env=env)
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip()
    assert authenticate(data_dir_db, secret).name == "x"
    assert not (tmp_path / "serai-data").exists()  # not the default data dir
    listed = serai("keys", "list", env=env)
    assert secret[: accounts.PREFIX_LENGTH] in listed.stdout


def test_flag_beats_the_environment(tmp_path: Path, data_dir: Path) -> None:
    env = {"SERAI_DATA_DIR": str(tmp_path / "env")}
    result = serai("db", "upgrade", "--data-dir", str(data_dir), env=env)
    assert result.exit_code == 0, result.output
    assert (data_dir / "serai.db").is_file()
    assert not (tmp_path / "env").exists()


def test_invalid_setting_exits_2_naming_the_field(data_dir: Path) -> None:
    result = serai("db", "upgrade", "--data-dir", str(data_dir), env={"SERAI_PORT": "notanumber"})
    assert result.exit_code == 2
    assert re.search(r"Invalid setting\s+port\b", result.stderr), result.stderr
    assert not (data_dir / "serai.db").exists()  # nothing was done with a broken configuration


def run(data_dir: Path, *args: str) -> str:
    result = serai(*args, "--data-dir", str(data_dir))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_an_operator_sets_up_an_organization_from_the_command_line(
        data_dir: Path, data_dir_db: Database) -> None:
    run(data_dir, "plans", "create", "coding-lite", "--window", "requests:120:5h",
        "--window", "requests:600:1w", "--multiplier", "big-model=3", "--rpm", "60",
        "--max-concurrency", "4")
    listed = run(data_dir, "plans", "list")
    assert "120 requests/5h" in listed and "600 requests/1w" in listed and "big-model×3" in listed
    run(data_dir, "prices", "create-book", "standard", "--currency", "eur", "--peak", "14-18x3")
    prices = run(data_dir, "prices", "set", "standard", "gemma-3-270m", "--input", "0.10",
                 "--output", "0.40", "--cached", "0.025")
    assert "0.100000" in prices and "0.025000" in prices and "EUR" in prices
    run(data_dir, "orgs", "create", "acme", "--plan", "coding-lite", "--price-book", "standard")
    secret = run(data_dir, "keys", "create", "--name", "app", "--org", "acme",
                 "--models", "gemma-3-270m", "--rpm", "10").strip()
    assert SECRET.fullmatch(secret)
    key = authenticate(data_dir_db, secret)
    assert (key.allowed_models, key.rpm, key.role) == (["gemma-3-270m"], 10, None)
    owner = run(data_dir, "keys", "create", "--name", "boss", "--org", "acme", "--role", "owner")
    assert authenticate(data_dir_db, owner.strip()).role == "owner"

    run(data_dir, "balance", "topup", "acme", "12.50", "--reason", "invoice 7")
    codes = run(data_dir, "balance", "codes", "generate", "--count", "3", "--amount", "5",
                "--batch", "launch").split()
    assert len(codes) == 3 and len(set(codes)) == 3
    run(data_dir, "balance", "redeem", "acme", codes[0])
    twice = serai("balance", "redeem", "acme", codes[0], "--data-dir", str(data_dir))
    assert twice.exit_code == 1 and "redeemed already" in twice.stderr
    run(data_dir, "balance", "adjust", "acme", "--amount", "-0.5", "--reason", "goodwill reversal")
    with data_dir_db.session() as session:
        org = accounts.find_org(session=session, ref="acme")
    assert org.balance_micros == 17_000_000
    shown = serai("balance", "show", "acme", "--data-dir", str(data_dir))
    assert "17.000000" in shown.stderr and "goodwill reversal" in shown.stdout
    codes_listed = run(data_dir, "balance", "codes", "list", "--batch", "launch")
    assert codes_listed.count("open") == 2 and codes[0] not in codes_listed
    run(data_dir, "balance", "codes", "disable", "launch")
    late = serai("balance", "redeem", "acme", codes[1], "--data-dir", str(data_dir))
    assert late.exit_code == 1 and "disabled" in late.stderr

    orgs = run(data_dir, "orgs", "update", "acme", "--rpm", "30", "--disable")
    assert "disabled" in orgs and "30" in orgs
    run(data_dir, "orgs", "update", "acme", "--enable", "--plan", "none")
    with data_dir_db.session() as session:
        org = accounts.find_org(session=session, ref="acme")
    assert (org.disabled, org.plan_id, org.rpm) == (False, None, 30)


def test_usage_and_invoices_add_up_to_the_ledger(data_dir: Path, data_dir_db: Database) -> None:
    run(data_dir, "orgs", "create", "acme")
    with data_dir_db.session() as session:
        org = accounts.find_org(session=session, ref="acme")
        now = db_now_ms(session)
        for model, cost, charged in (("a", 1_234_567, True), ("a", 1, True), ("b", 99, False)):
            session.execute(insert(UsageRow).values(
                request_id="r", key_id=None, org_id=org.id, model=model, endpoint="chat",
                prompt_tokens=10, completion_tokens=5, status="ok", latency_ms=1.0,
                cost_micros=cost, charged=charged, created_ms=now))
    month = datetime.now(UTC).strftime("%Y-%m")
    invoice = json.loads(run(data_dir, "invoices", "acme", month))
    assert invoice["total_micros"] == 1_234_568 and invoice["total"] == "1.234568"
    assert [(x["model"], x["requests"], x["amount_micros"]) for x in invoice["lines"]] == [
        ("a", 2, 1_234_568), ("b", 1, 0)]
    rows = list(csv.DictReader(io.StringIO(run(data_dir, "invoices", "acme", month, "--csv"))))
    assert rows[-1]["model"] == "TOTAL" and rows[-1]["amount"] == "1.234568"
    usage = run(data_dir, "usage", "acme")
    assert "1.234568" in usage and "0.000099" in usage
    bad = serai("invoices", "acme", "November", "--data-dir", str(data_dir))
    assert bad.exit_code == 1 and "YYYY-MM" in bad.stderr


def test_bad_amounts_and_windows_are_explained(data_dir: Path) -> None:
    run(data_dir, "orgs", "create", "acme")
    precise = serai("balance", "topup", "acme", "0.0000001", "--reason", "x",
                    "--data-dir", str(data_dir))
    assert precise.exit_code == 1 and "six decimal places" in precise.stderr
    huge = serai("balance", "topup", "acme", "1e30", "--reason", "x", "--data-dir", str(data_dir))
    assert huge.exit_code == 1 and "more than 1,000,000,000 currency units" in huge.stderr
    word = serai("balance", "topup", "acme", "ten", "--reason", "x", "--data-dir", str(data_dir))
    assert word.exit_code == 1 and "is not an amount of money" in word.stderr
    window = serai("plans", "create", "p", "--window", "requests:many:5h",
                   "--data-dir", str(data_dir))
    assert window.exit_code == 1 and "METRIC:LIMIT:DURATION" in window.stderr
    missing = serai("orgs", "update", "nobody", "--rpm", "1", "--data-dir", str(data_dir))
    assert missing.exit_code == 1 and "No organization 'nobody'" in missing.stderr
