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


def test_every_table_key_is_documented() -> None:
    """`[[upstreams]]` and `[[models]]` keys each have a row in their table."""
    from serai.config import EmbeddedModelSettings, UpstreamSettings

    text = (DOCS / "configuration.md").read_text()
    for entry, section in ((UpstreamSettings, "## Upstream models"),
                           (EmbeddedModelSettings, "## Several embedded models")):
        table = text.split(section, 1)[1].split("\n## ", 1)[0]
        documented = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
        assert documented == set(entry.model_fields), section
