"""The plan of one call: the profile keys it joins, the limits it meets, and the call rates
it must fit under.

A neutral module: the rules produce plans, the stores carry them out, and neither imports
the other. Pure: no I/O.
"""

from __future__ import annotations

from typing import NamedTuple


class PlanEntry(NamedTuple):
    """One profile key a call joins; with `limit`, a cap that must have room first.

    A NamedTuple, not a dataclass: one is built per profile per check, on the hot path.
    """

    profile: str
    value: str | None
    limit: int | None = None
    shadow: bool = False
    rule: str = ""

    @property
    def key(self) -> tuple[str, str | None]:
        """The profile key (profile, value)."""
        return (self.profile, self.value)


class RateEntry(NamedTuple):
    """A call rate a call must fit under: a token bucket per (rule, value).

    The bucket holds at most `burst` tokens and gains `rate` tokens a second; an admitted call
    takes one. So in any window of T seconds at most `rate * T + burst` calls pass it. A
    `shadow` rate never refuses: it takes a token when it has one, and a call it had none for
    is reported as a would-deny. `value` is None for one bucket per rule.
    """

    rule: str
    value: str | None
    rate: float  # tokens a second (the rule's max / per)
    burst: int  # the bucket's size
    shadow: bool = False

    @property
    def key(self) -> tuple[str, str | None]:
        """The bucket's key (rule, value)."""
        return (self.rule, self.value)
