"""The `serai keys` and `serai db` commands, as an operator runs them on a data dir."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from serai import accounts
from serai.cli import app
from serai.errors import AuthenticationFailed
from serai.storage.db import Database

SECRET = re.compile(r"sk-serai-[A-Za-z0-9_-]{43}")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [n for n in os.environ if n.startswith("SERAI_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray serai.toml, and the default data dir lands here


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
