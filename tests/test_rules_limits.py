"""Caps that come from elsewhere: the request (`max_from`) and overrides files a billing system
rewrites (`overrides_file`), with reloads, versions and the watcher's file list."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from policy.errors import RuleError
from policy.rules import Ruleset, compile_sources, load_rules, rule_files
from policy.rules.overrides import DataError, parse_csv

PROFILES = """
[profiles]
no_value = ["total"]
with_value = ["account"]
"""
CAP = '[[rule]]\nname = "cap"\nlimit = { profile = "account", value = "{account}", max = 10%s }\n'


def reader(files: dict[str, str]):  # type: ignore[no-untyped-def]
    """A read callback over a dict of path -> text."""
    def read(path: str) -> str:
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory", path)
        return files[path]
    return read


def rules(extra: str, files: dict[str, str] | None = None) -> Ruleset:
    """A one-rule ruleset in r/rules.toml whose limit has `extra` keys."""
    return compile_sources([("r/rules.toml", PROFILES + CAP % extra)], read=reader(files or {}))


def cap(rs: Ruleset, **req: str) -> int | None:
    """The cap of the first plan entry, checked against the interpreter."""
    fast = rs.evaluate(dict(req))
    assert fast.plan == rs.interpret(dict(req)).plan
    return fast.plan[0].limit


# -- max_from --------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "want"), [
    ("5", 5), ("0", 0), ("007", 7), ("30", 30), ("31", 30), ("99999999999999999999999", 30),
    ("", 10), ("abc", 10), ("-1", 10), ("1.5", 10), (" 5", 10), ("²", 10), ("٣", 10), ("+3", 10), (None, 10),
])
def test_max_from_takes_the_request_count_within_the_ceiling(raw: str | None, want: int) -> None:
    """A count of ASCII digits is used up to the ceiling; missing or bad falls back to max."""
    rs = rules(', max_from = "attrs.channels", ceiling = 30')
    req = {"account": "a"} if raw is None else {"account": "a", "attrs.channels": raw}
    assert cap(rs, **req) == want


def test_max_from_falls_back_to_override_then_schedule_then_max() -> None:
    """Without a usable request count, the cap is what the limit gives otherwise."""
    rs = rules(', max_from = "attrs.channels", ceiling = 100, overrides = { acme = 3 }, '
               'schedule = [{ days = "mon-sun", max = 7 }]')
    assert cap(rs, account="acme") == 3
    assert cap(rs, account="other") == 7
    assert cap(rs, account="acme", **{"attrs.channels": "50"}) == 50
    caps = rs.explain({"account": "acme", "attrs.channels": "x"})[0]["caps"]
    assert caps == ["account=acme: 3 (attrs.channels = 'x' is not a count; override for 'acme' in limit.overrides)"]


def test_max_from_a_classify_attribute() -> None:
    """max_from reads any field, e.g. a class that maps accounts to counts."""
    rs = compile_sources([("t.toml", PROFILES + '''
[[classify]]
attr = "tier_cap"
field = "account"
cases = [{ value = "50", regex = "^gold-" }, { value = "5", regex = "^free-" }]
''' + CAP % ', max_from = "tier_cap", ceiling = 40')])
    assert cap(rs, account="gold-1") == 40
    assert cap(rs, account="free-1") == 5
    assert cap(rs, account="plain") == 10


# -- overrides files ---------------------------------------------------------------------------


def test_csv_overrides_file() -> None:
    """value,max lines with an optional header, comments, blank lines, CRLF, a BOM and quotes."""
    csv = '\ufeff# billing export\r\nvalue,max\r\n\r\nacme,3\r\n"a,b",7\r\n  # indented comment\r\nsip:x@y, 12\r\n'
    rs = rules(', overrides_file = "accounts.csv"', {"r/accounts.csv": csv})
    assert cap(rs, account="acme") == 3
    assert cap(rs, account="a,b") == 7
    assert cap(rs, account="sip:x@y") == 12
    assert cap(rs, account="other") == 10
    assert rs.data_files == ("r/accounts.csv",)
    assert rs.explain({"account": "a,b"})[0]["caps"] == ["account=a,b: 7 (override for 'a,b' in accounts.csv)"]


def test_csv_without_header_and_header_only_first() -> None:
    """The header is optional, and only the first line may be one."""
    assert parse_csv("acme,3\n") == {"acme": (3, 1)}
    assert parse_csv("Value , MAX\nacme,3\n") == {"acme": (3, 2)}
    with pytest.raises(DataError, match="not 'max'"):
        parse_csv("acme,3\nvalue,max\n")
    assert parse_csv("") == {}


def test_toml_overrides_file() -> None:
    """A .toml overrides file holds value = max pairs."""
    rs = rules(', overrides_file = "data/accounts.toml"', {"r/data/accounts.toml": 'acme = 3\n"sip:x@y" = 4\n'})
    assert cap(rs, account="acme") == 3
    assert cap(rs, account="sip:x@y") == 4


def test_overrides_from_every_source_merge_into_one_lookup() -> None:
    """Inline, file and [overrides.RULE] overrides are one dict: one lookup per call."""
    main = PROFILES + CAP % ', overrides = { a = 1 }, overrides_file = "accounts.csv"'
    rs = compile_sources([("r/a.toml", main), ("r/b.toml", "[overrides.cap]\nc = 3\n")],
                         read=reader({"r/accounts.csv": "b,2\n"}))
    assert [cap(rs, account=x) for x in "abcd"] == [1, 2, 3, 10]
    assert rs.source.count(".get(v0, 10)") == 1
    with pytest.raises(RuleError, match=r"r/b\.toml: key 'overrides\.cap\.b': override already set in "
                                        r"accounts\.csv \(limit\.overrides_file of rule 'cap'\)"):
        compile_sources([("r/a.toml", main), ("r/b.toml", "[overrides.cap]\nb = 3\n")],
                        read=reader({"r/accounts.csv": "b,2\n"}))


def test_two_rules_may_share_an_overrides_file() -> None:
    """A file read by two rules is read once and counted once in the version."""
    calls: list[str] = []
    files = {"r/accounts.csv": "acme,3\n"}

    def read(path: str) -> str:
        calls.append(path)
        return files[path]

    two = PROFILES + CAP % ', overrides_file = "accounts.csv"' + (CAP % ', overrides_file = "accounts.csv"').replace(
        '"cap"', '"cap2"')
    rs = compile_sources([("r/rules.toml", two)], read=read)
    assert calls == ["r/accounts.csv"]
    assert [e.limit for e in rs.evaluate({"account": "acme"}).plan] == [3, 3]


def test_an_overrides_file_must_not_be_a_rule_file() -> None:
    """A .toml overrides file among the rule files would be read as rules too: refused."""
    with pytest.raises(RuleError, match=r"is a rule file"):
        compile_sources([("r/a.toml", PROFILES + CAP % ', overrides_file = "b.toml"'), ("r/b.toml", "")])


def test_version_follows_the_overrides_file() -> None:
    """Editing the overrides file changes the version; the same content gives the same one."""
    v1 = rules(', overrides_file = "accounts.csv"', {"r/accounts.csv": "acme,3\n"}).version
    v2 = rules(', overrides_file = "accounts.csv"', {"r/accounts.csv": "acme,4\n"}).version
    v3 = rules(', overrides_file = "accounts.csv"', {"r/accounts.csv": "acme,3\n"}).version
    assert v1 != v2
    assert v1 == v3


# -- on disk: load_rules and rule_files --------------------------------------------------------


def write(path: Path, text: str) -> None:
    """Write a file and move its mtime on, so stat-based watchers see every write."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_rule_files_lists_the_overrides_files_for_the_watcher(tmp_path: Path) -> None:
    """rule_files: the *.toml in name order, then each overrides file they name (even missing)."""
    d = tmp_path / "rules"
    (d / "data").mkdir(parents=True)
    write(d / "a.toml", PROFILES + CAP % ', overrides_file = "data/accounts.csv"')
    write(d / "b.toml", "")
    assert rule_files(d) == [d / "a.toml", d / "b.toml", d / "data" / "accounts.csv"]
    with pytest.raises(RuleError, match="cannot read"):
        load_rules(d)
    write(d / "data" / "accounts.csv", "acme,3\n")
    rs = load_rules(d)
    assert rs.evaluate({"account": "acme"}).plan[0].limit == 3
    assert rs.files == (str(d / "a.toml"), str(d / "b.toml"))
    assert rs.data_files == (str(d / "data" / "accounts.csv"),)
    # the rule file names another file: the list follows
    write(d / "a.toml", PROFILES + CAP % ', overrides_file = "other.csv"')
    assert rule_files(d) == [d / "a.toml", d / "b.toml", d / "other.csv"]
    # a broken rule file names nothing (the reload reports the error)
    write(d / "a.toml", "[[[")
    assert rule_files(d) == [d / "a.toml", d / "b.toml"]


def test_ten_thousand_line_overrides_file_loads_fast(tmp_path: Path) -> None:
    """10,000 accounts load in well under a second and cost one lookup per call."""
    d = tmp_path / "rules"
    d.mkdir()
    write(d / "rules.toml", PROFILES + CAP % ', overrides_file = "accounts.csv"')
    write(d / "accounts.csv", "value,max\n" + "".join(f"acct{i},{i % 50}\n" for i in range(10_000)))
    t0 = time.perf_counter()
    rs = load_rules(d)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    assert rs.evaluate({"account": "acct4321"}).plan[0].limit == 4321 % 50
    assert len(rs.rules[0].limit.overrides) == 10_000  # type: ignore[union-attr]
