"""The rules: TOML files -> compiled rules -> a plan for one call. Pure, except `load_rules`
and `rule_files`, which read and stat files.

- `fields`: the request fields rules can see, and `request_fields(msg)` that builds them;
- `conditions`: the operators (`eq`, `regex`, `cidr`, ...) and combinators, each giving the
  interpreter's test, the generated code and the description at once;
- `schedule`: weekly time windows in a time zone, local time;
- `model`: the compiled `Ruleset`, `Rule`, `Limit`, `Rate`, ..., and `Evaluation`;
- `compiler`: TOML -> model, every load error a `RuleError` naming file, rule and key;
- `codegen`: the straight-line evaluator the hot path runs;
- `interp`: the reference interpreter, with explanations;
- `loader`: reading the files.

Keys, meanings and load errors: docs/rules.md.
"""

from __future__ import annotations

from policy.errors import RuleError
from policy.plan import PlanEntry, RateEntry
from policy.rules.compiler import compile_sources
from policy.rules.conditions import COMBINATORS, OPERATORS, Cond
from policy.rules.fields import (
    ATTR_PREFIX,
    BUILTIN_FIELDS,
    PEER_FIELDS,
    REQUEST_FIELDS,
    TIME_FIELDS,
    URI_FIELDS,
    request_fields,
)
from policy.rules.loader import load_rules, rule_files
from policy.rules.model import (
    Classifier,
    Evaluation,
    Join,
    Limit,
    Rate,
    Rule,
    RuleOutcome,
    Ruleset,
    Step,
    Template,
)
from policy.rules.schedule import Window

__all__ = [
    "ATTR_PREFIX",
    "BUILTIN_FIELDS",
    "COMBINATORS",
    "OPERATORS",
    "PEER_FIELDS",
    "REQUEST_FIELDS",
    "TIME_FIELDS",
    "URI_FIELDS",
    "Classifier",
    "Cond",
    "Evaluation",
    "Join",
    "Limit",
    "PlanEntry",
    "Rate",
    "RateEntry",
    "Rule",
    "RuleError",
    "RuleOutcome",
    "Ruleset",
    "Step",
    "Template",
    "Window",
    "compile_sources",
    "load_rules",
    "request_fields",
    "rule_files",
]
