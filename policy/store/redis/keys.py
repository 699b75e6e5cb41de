"""The Redis key layout of the counter store. Pure: names only, no I/O.

Every key starts with the hash tag ``{prefix}`` (``P`` below is ``{prefix}:``), so a Redis
Cluster places all of them in one slot, which the multi-key scripts need.

=====================  =====  ====================================================================
key                    type   holds
=====================  =====  ====================================================================
``P c:<uid>``          hash   one call's record (fields: see ``codec.py``)
``P exp``              zset   every held call (uid) scored by its lease expiry, in Redis time
``P n``                hash   the counters: ``k:<kid>`` calls in a key with a value (a key
                              without value: its zset's ZCARD), ``p:<eprofile>`` calls in any
                              valued key of a profile, ``x:<eprofile>`` of those also in its
                              key without value, ``active``, ``processed``, ``expired``,
                              ``failed``, ``seq`` (admissions so far: the listing order) and
                              ``epoch`` (the data-loss marker)
``P k:<kid>``          zset   the calls (uid) of one profile key, scored by admission ``seq``
``P v:<eprofile>``     zset   a profile's non-empty values (all scored 0: lexicographic order)
``P o:<node>``         zset   the calls a node admitted, scored by admission ``seq``
``P x``                list   records of expired calls that no `sweep` has reported yet
``P r:<rid>``          hash   one call-rate bucket: ``t`` its tokens, ``ts`` their time (Redis
                              time); it expires once it would be full again (reserve.lua)
=====================  =====  ====================================================================

``uid`` is the call's identity (``call_uid``: Call-ID, space, From-tag). ``eprofile`` is the
profile name with ``%`` and ``=`` escaped (``%25``, ``%3D``); ``kid`` is ``eprofile`` for a key
without value and ``eprofile=value`` for one with a value (the first ``=`` splits them, values
are taken as they are), so (profile, value) -> key is one-to-one. ``rid`` is the same for a
rate bucket: the rule's name escaped like a profile's, then ``=value`` when the rate has one.
"""

from __future__ import annotations

#: Key names remembered per layout (the cache is cleared when it is full).
CACHE_SIZE = 50_000


def escape(profile: str) -> str:
    """A profile name as it appears in key names and counter fields."""
    return profile.replace("%", "%25").replace("=", "%3D")


def kid(profile: str, value: str | None) -> str:
    """The id of one profile key: ``eprofile`` or ``eprofile=value``."""
    ep = escape(profile)
    return ep if value is None else f"{ep}={value}"


def hash_tag(prefix: str) -> str:
    """``{prefix}``; a prefix already in braces is used as it is."""
    return prefix if prefix.startswith("{") and prefix.endswith("}") else "{" + prefix + "}"


class KeyLayout:
    """The key names of one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.p = hash_tag(prefix) + ":"
        self.exp = self.p + "exp"
        self.counts = self.p + "n"
        self.reports = self.p + "x"
        self._record = self.p + "c:"
        self._node = self.p + "o:"
        self._nodes: dict[str, str] = {}

    def record(self, uid: str) -> str:
        """The hash of one call."""
        return self._record + uid

    def node(self, node: str) -> str:
        """The zset of the calls a node admitted."""
        key = self._nodes.get(node)
        if key is None:
            if len(self._nodes) >= CACHE_SIZE:
                self._nodes.clear()
            key = self._nodes[node] = self._node + node
        return key

    def key(self, profile: str, value: str | None) -> str:
        """The zset of one profile key."""
        return self.p + "k:" + kid(profile, value)

    def values(self, profile: str) -> str:
        """The zset of a profile's non-empty values."""
        return self.p + "v:" + escape(profile)

    def value_key_base(self, profile: str) -> str:
        """What a value is appended to for the zset of (profile, value)."""
        return self.p + "k:" + escape(profile) + "="

    def rate(self, rule: str, value: str | None) -> str:
        """The hash of one call-rate bucket (rule, value)."""
        return self.p + "r:" + kid(rule, value)

    @staticmethod
    def profile_field(profile: str) -> str:
        """The counter of a profile's calls in any of its valued keys (each call once)."""
        return "p:" + escape(profile)
