"""The docs must keep up with the code: every setting is documented."""

from __future__ import annotations

from pathlib import Path

from serai.config import Settings

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_setting_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = [name for name in Settings.model_fields
               if f"`SERAI_{name.upper()}`" not in text or f"`{name}`" not in text]
    assert missing == [], f"settings missing from docs/configuration.md: {missing}"


def test_every_documented_setting_exists() -> None:
    text = (DOCS / "configuration.md").read_text()
    documented = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `SERAI_")}
    assert documented == {f"SERAI_{name.upper()}" for name in Settings.model_fields}
