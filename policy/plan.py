"""The plan of one call: the profile keys it joins and the limits it meets.

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
