"""Conditions: one builder per operator, each returning the interpreter's test, the generated
code and the human description together, so an operator is added in one place and the
interpreter and the generated evaluator cannot drift apart.

An operator is registered with `@operator(name, parse)`: `parse` turns the TOML argument
into a checked value (raising `BadArg` with a message; the compiler adds file, rule and
key), the decorated builder makes the `Cond` for a field and that value. `literals` tells
which values an operator compares a field with for equality, so the compiler can refuse a
value the field never takes (a classify attribute's values, `weekday` names, ...).

Combinators (`all_of`, `any_of`, `not_of`) combine built conditions; they refuse to be empty.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from policy.rules.schedule import Moment, Window

Request = Mapping[str, str]
Test = Callable[[Request, Moment], bool]

_ids = itertools.count()


def const(consts: dict[str, Any], value: Any) -> str:
    """Register a constant for generated code; returns its (unique) name."""
    name = f"_k{next(_ids)}"
    consts[name] = value
    return name


def clock_var(tz: str) -> str:
    """The generated evaluator's local variable holding the minute of the week in zone `tz`."""
    return "w_" + tz.encode().hex()


class BadArg(Exception):
    """An operator's argument is invalid; the message says why (the compiler adds file/rule/key)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Cond:
    """A compiled condition.

    `test(request, moment)` is the interpreter's; `code` is the same test as a Python
    expression over `r` (the request) naming the constants in `consts`, and the local
    minute-of-week variables of the zones in `zones` (see `clock_var`), for the generated
    evaluator; `desc` says it in words for explanations.
    """

    __slots__ = ("code", "consts", "desc", "test", "zones")

    def __init__(self, desc: str, test: Test, code: str, consts: dict[str, Any] | None = None,
                 zones: Mapping[str, Any] | None = None) -> None:
        self.desc = desc
        self.test = test
        self.code = code
        self.consts = consts or {}
        self.zones: dict[str, Any] = dict(zones or {})  # tz name -> tzinfo


@dataclass(frozen=True, slots=True)
class Operator:
    """A field operator: parse its TOML argument, build its condition."""

    name: str
    parse: Callable[[Any], Any]
    build: Callable[[str, Any], Cond]
    literals: Callable[[Any], Iterable[str]] | None
    doc: str


#: Every field operator by its TOML name.
OPERATORS: dict[str, Operator] = {}


def operator(name: str, parse: Callable[[Any], Any], literals: Callable[[Any], Iterable[str]] | None = None,
             ) -> Callable[[Callable[[str, Any], Cond]], Callable[[str, Any], Cond]]:
    """Register the decorated builder as the operator `name`."""

    def register(build: Callable[[str, Any], Cond]) -> Callable[[str, Any], Cond]:
        OPERATORS[name] = Operator(name, parse, build, literals, (build.__doc__ or "").strip())
        return build

    return register


# -- argument parsers ---------------------------------------------------------------------


def type_name(value: Any) -> str:
    """'a string', 'an integer', ... for messages."""
    return {
        str: "a string",
        int: "an integer",
        bool: "a boolean",
        float: "a float",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def parse_str(arg: Any) -> str:
    """A string."""
    if not isinstance(arg, str):
        raise BadArg(f"must be a string, not {type_name(arg)}")
    return arg


def parse_bool(arg: Any) -> bool:
    """A boolean."""
    if not isinstance(arg, bool):
        raise BadArg(f"must be a boolean, not {type_name(arg)}")
    return arg


def parse_str_list(arg: Any) -> tuple[str, ...]:
    """A string or a non-empty array of strings."""
    items = [arg] if isinstance(arg, str) else arg
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise BadArg(f"must be a string or an array of strings, not {type_name(arg)}")
    if not items:
        raise BadArg("must not be empty")
    return tuple(items)


def parse_regex(arg: Any) -> re.Pattern[str]:
    """A regular expression (Python `re` syntax, searched anywhere in the value)."""
    src = parse_str(arg)
    try:
        return re.compile(src)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise BadArg(f"bad regex {src!r}: {exc}") from None


def parse_networks(arg: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """An IPv4/IPv6 network or an array of them."""
    nets = []
    for s in parse_str_list(arg):
        try:
            nets.append(ipaddress.ip_network(s, strict=False))
        except ValueError as exc:
            raise BadArg(f"bad network {s!r}: {exc}") from None
    return tuple(nets)


# -- field operators --------------------------------------------------------------------------


@operator("eq", parse_str, literals=lambda v: (v,))
def eq(name: str, value: str) -> Cond:
    """The field equals the string (also written `field = "value"`)."""
    return Cond(f"{name} == {value!r}", lambda r, m: r.get(name) == value, f"r.get({name!r}) == {value!r}")


@operator("ne", parse_str, literals=lambda v: (v,))
def ne(name: str, value: str) -> Cond:
    """The field differs from the string (an absent field differs from every string)."""
    return Cond(f"{name} != {value!r}", lambda r, m: r.get(name) != value, f"r.get({name!r}) != {value!r}")


@operator("regex", parse_regex)
def regex(name: str, rx: re.Pattern[str]) -> Cond:
    """The regular expression matches somewhere in the field (an absent field is "")."""
    consts: dict[str, Any] = {}
    k = const(consts, rx)
    return Cond(f"{name} =~ /{rx.pattern}/", lambda r, m: rx.search(r.get(name, "")) is not None,
                f"{k}.search(r.get({name!r}, '')) is not None", consts)


@operator("prefix", parse_str_list)
def prefix(name: str, prefixes: tuple[str, ...]) -> Cond:
    """The field starts with the string, or with one of the array's."""
    return Cond(f"{name} starts with {' or '.join(map(repr, prefixes))}",
                lambda r, m: r.get(name, "").startswith(prefixes), f"r.get({name!r}, '').startswith({prefixes!r})")


@operator("in", lambda a: frozenset(parse_str_list(a)), literals=lambda v: sorted(v))
def in_(name: str, values: frozenset[str]) -> Cond:
    """The field is one of the array's strings."""
    consts: dict[str, Any] = {}
    k = const(consts, values)
    return Cond(f"{name} in {sorted(values)}", lambda r, m: r.get(name) in values, f"r.get({name!r}) in {k}", consts)


@operator("not_in", lambda a: frozenset(parse_str_list(a)), literals=lambda v: sorted(v))
def not_in(name: str, values: frozenset[str]) -> Cond:
    """The field is none of the array's strings (an absent field is none of them)."""
    consts: dict[str, Any] = {}
    k = const(consts, values)
    return Cond(f"{name} not in {sorted(values)}", lambda r, m: r.get(name) not in values,
                f"r.get({name!r}) not in {k}", consts)


@operator("cidr", parse_networks)
def cidr(name: str, nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> Cond:
    """The field is an IP address inside the network, or inside one of the array's."""

    def test(r: Request, m: Moment | None = None) -> bool:
        raw = r.get(name)
        if not raw:
            return False
        try:
            addr = ipaddress.ip_address(raw)
        except ValueError:
            return False
        return any(addr in net for net in nets)

    consts: dict[str, Any] = {}
    k = const(consts, test)
    return Cond(f"{name} in {', '.join(map(str, nets))}", test, f"{k}(r)", consts)


@operator("present", parse_bool)
def present(name: str, want: bool) -> Cond:
    """`true`: the field is present and not empty; `false`: it is absent or empty."""
    if want:
        return Cond(f"{name} is present", lambda r, m: bool(r.get(name)), f"bool(r.get({name!r}))")
    return Cond(f"{name} is absent", lambda r, m: not r.get(name), f"not r.get({name!r})")


# -- combinators and time ---------------------------------------------------------------------


def _merge(conds: Iterable[Cond]) -> tuple[dict[str, Any], dict[str, Any]]:
    consts: dict[str, Any] = {}
    zones: dict[str, Any] = {}
    for c in conds:
        consts.update(c.consts)
        zones.update(c.zones)
    return consts, zones


def all_of(conds: list[Cond]) -> Cond:
    """Every condition holds (`all = [...]`, and the conditions of one table)."""
    if not conds:
        raise ValueError("all_of() needs a condition")
    if len(conds) == 1:
        return conds[0]
    tup = tuple(conds)
    consts, zones = _merge(tup)
    return Cond("(" + " and ".join(c.desc for c in tup) + ")", lambda r, m: all(c.test(r, m) for c in tup),
                " and ".join(f"({c.code})" for c in tup), consts, zones)


def any_of(conds: list[Cond]) -> Cond:
    """At least one condition holds (`any = [...]`)."""
    if not conds:
        raise ValueError("any_of() needs a condition")
    if len(conds) == 1:
        return conds[0]
    tup = tuple(conds)
    consts, zones = _merge(tup)
    return Cond("(" + " or ".join(c.desc for c in tup) + ")", lambda r, m: any(c.test(r, m) for c in tup),
                " or ".join(f"({c.code})" for c in tup), consts, zones)


def not_of(cond: Cond) -> Cond:
    """The condition does not hold (`not = {...}`)."""
    return Cond(f"not {cond.desc}", lambda r, m: not cond.test(r, m), f"not ({cond.code})", cond.consts, cond.zones)


#: The combinators by their TOML name: the kind of argument ("array" of condition tables or one
#: "table"), and the builder over the conditions of each table.
COMBINATORS: dict[str, tuple[str, Callable[[list[list[Cond]]], Cond]]] = {
    "all": ("array", lambda groups: all_of([c for g in groups for c in g])),
    "any": ("array", lambda groups: any_of([all_of(g) for g in groups])),
    "not": ("table", lambda groups: not_of(all_of(groups[0]))),
}


def in_schedule(windows: tuple[Window, ...]) -> Cond:
    """The evaluation time is inside one of the windows (a rule's `schedule`)."""
    consts: dict[str, Any] = {}
    parts = [f"{const(consts, w.week)}[{clock_var(w.tz)}]" for w in windows]
    zones = {w.tz: w.zone for w in windows}
    desc = "time in " + " or ".join(w.desc for w in windows)
    return Cond(desc, lambda r, m: any(m.inside(w) for w in windows), " or ".join(parts), consts, zones)
