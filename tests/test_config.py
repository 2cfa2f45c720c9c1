"""Settings precedence and model selection, as an operator configures them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serai.cli import app
from serai.config import BUNDLED_MODEL_NAME, load_settings
from serai.engines.models import check_gguf, prepare_bundled_model, resolve_model
from serai.errors import ModelFileError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("SERAI_DATA_DIR", "SERAI_PORT", "SERAI_CONFIG", "SERAI_MODEL", "SERAI_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = load_settings()
    assert (settings.host, settings.port, settings.data_dir) == ("127.0.0.1", 8000, Path("serai-data"))
    assert settings.resolved_database_url.endswith("serai-data/serai.db")
    assert settings.max_body_bytes == 4 * 1024 * 1024


def test_flags_beat_environment_beat_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "serai.toml").write_text('port = 7000\ncontext_length = 2048\nhost = "0.0.0.0"\n')
    assert load_settings().port == 7000
    assert load_settings().context_length == 2048
    monkeypatch.setenv("SERAI_PORT", "7100")
    assert load_settings().port == 7100
    assert load_settings(port=7200).port == 7200
    assert load_settings(port=None).port == 7100  # a flag the user did not give changes nothing
    assert load_settings().host == "0.0.0.0"


def test_config_file_named_by_serai_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text('data_dir = "/srv/serai"\n')
    monkeypatch.setenv("SERAI_CONFIG", str(config))
    assert load_settings().data_dir == Path("/srv/serai")


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "serai.toml").write_text("prot = 7000\n")
    result = CliRunner().invoke(app, ["db", "upgrade"])
    assert result.exit_code == 2
    assert "prot" in result.output


def test_any_gguf_is_served_under_its_file_name(tmp_path: Path) -> None:
    bundled = prepare_bundled_model(tmp_path / "models")
    mine = tmp_path / "my-model-Q4_K_M.gguf"
    shutil.copy(bundled, mine)
    path, name = resolve_model(load_settings(model=mine))
    assert (path, name) == (mine, "my-model-Q4_K_M")
    assert resolve_model(load_settings(model=mine, model_name="house-model"))[1] == "house-model"
    assert resolve_model(load_settings(data_dir=tmp_path))[1] == BUNDLED_MODEL_NAME


def test_bundled_model_is_prepared_once_and_repaired_when_damaged(tmp_path: Path) -> None:
    first = prepare_bundled_model(tmp_path)
    size = first.stat().st_size
    with first.open("r+b") as f:  # a damaged file (an interrupted copy, a bad disk) is rebuilt
        f.seek(1000)
        f.write(b"\0" * 16)
    again = prepare_bundled_model(tmp_path)
    assert again == first and again.stat().st_size == size
    check_gguf(again)


def test_files_that_are_not_gguf_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        check_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ModelFileError, match="not a file"):
        check_gguf(tmp_path)
    pickle = tmp_path / "model.bin"
    pickle.write_bytes(b"\x80\x04\x95 not a gguf")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        check_gguf(pickle)


def test_serve_refuses_a_bad_model_before_touching_the_data_dir(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("hello")
    result = CliRunner().invoke(app, ["serve", "--model", str(bad), "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "not a GGUF file" in result.output
    assert not (tmp_path / "d" / "serai.db").exists()
