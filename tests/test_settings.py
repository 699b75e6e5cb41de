"""service.toml: unknown keys and sections are errors that name the key and the file (README,
"Settings"), so a typo never silently leaves a default in force."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from policy.errors import SettingsError
from policy.settings import _SCHEMA, load_settings


@pytest.mark.parametrize(("body", "key", "expected"), [
    ("[store]\nsnapshot_intervall = 5\n", "store.snapshot_intervall", "snapshot_interval"),
    ("[protocol]\nmax_var = 2\n", "protocol.max_var", "max_vars"),
    ("[listen]\ntpc = '127.0.0.1:5099'\n", "listen.tpc", "tcp"),
    ("[stor]\nbackend = 'embedded'\n", "stor", "store"),
    ("[Store]\nbackend = 'embedded'\n", "Store", "store"),
    ("backend = 'redis'\n", "backend", "store"),  # a key outside any section
])
def test_unknown_keys_and_sections_are_refused(tmp_path: Path, body: str, key: str, expected: str) -> None:
    """The error names the file and the unknown key (or section) and lists what is expected."""
    cfg = tmp_path / "service.toml"
    cfg.write_text(body)
    with pytest.raises(SettingsError) as info:
        load_settings(cfg)
    err = info.value
    assert err.file == str(cfg) and err.key == key
    text = str(err)
    assert text.startswith(f"{cfg}: key {key!r}: unknown "), text
    assert re.search(rf"expected one of: .*\b{expected}\b", text), text


@pytest.mark.parametrize("section", sorted(_SCHEMA))
def test_every_section_refuses_an_unknown_key(tmp_path: Path, section: str) -> None:
    """No section accepts a key it does not know."""
    cfg = tmp_path / "service.toml"
    cfg.write_text(f"[{section}]\nno_such_key = 1\n")
    with pytest.raises(SettingsError, match=re.escape(f"{cfg}: key '{section}.no_such_key': unknown key")):
        load_settings(cfg)


def test_a_known_key_loads(tmp_path: Path) -> None:
    """The counterpart: the correctly spelt keys load and take effect."""
    cfg = tmp_path / "service.toml"
    cfg.write_text("[store]\nsnapshot_interval = 5\n[protocol]\nmax_vars = 2\n")
    s = load_settings(cfg)
    assert s.snapshot_interval == 5 and s.max_vars == 2
