"""The Redis Cluster key layout of the counter store. Pure: names and slots only, no I/O.

Two kinds of place (P is the prefix, which must not hold ``{`` or ``}``):

**Profile keys, each in its own slot.** ``P:k:<kid>`` (kid as in `keys.kid`) is a sorted set of
the calls (uid) in that key, scored by the call's lease expiry (cluster time). No hash tag:
Redis hashes the whole name (a value holding ``{...}`` brings its own tag; that only decides the
slot). A key's size is the number of members whose lease has not ended (`ZCOUNT (now +inf`);
every script that adds to it first drops the ended ones, so a size never needs a sweep.

**Call-rate buckets, each in its own slot.** ``P:r:<rid>`` (rid: the rule's name escaped like a
profile's, then ``=value`` when the rate has one, as `keys.py`) is a hash: the bucket's tokens
and their time, and the holds of reserves in flight (`cluster_rate.lua`). No hash tag either.

**Shards: a call's record and every index of it, in one slot.** A call belongs to shard
``crc32(uid) % SHARDS``; each shard has a hash tag ``{P:s<i>.<n>}`` chosen so that its slot
lies in the i-th of SHARDS equal slot ranges (a cluster created with even ranges puts the same
number of shards on every primary). Under tag T:

=================  =====  ======================================================================
key                type   holds
=================  =====  ======================================================================
``T:c:<uid>``      hash   the call's record (fields as `codec.py`, plus ``l`` lock expiry and
                          ``lo`` lock owner while a multi-step operation holds the call; ``s``
                          is also ``pending`` (being reserved), ``ending`` (being released)
                          or ``repair`` (a placeholder lock of the repair); until the commit,
                          ``r``: the hold id and the rate buckets the reserve may take from)
``T:exp``          zset   the shard's held calls by lease expiry (sweeps, "sweep first")
``T:l``            zset   the shard's locked records by lock expiry (sweeps take over ended locks)
``T:n``            hash   counters: ``active`` ``processed`` ``expired`` ``failed`` ``epoch``,
                          ``p:<eprofile>``/``x:<eprofile>`` (as the single store) and ``k:<kid>``
                          (the shard's calls in a key with a value: its values index)
``T:o``            zset   the shard's calls by node: members ``<len>:<node><uid>``, all scored 0
``T:v``            zset   kids ``eprofile=value`` of valued keys with a call of this shard
``T:x``            list   records of expired calls no `sweep` has reported yet
=================  =====  ======================================================================

So every script touches the keys of one slot and declares them all in KEYS: a shard script the
record(s) and the shard's fixed keys, a step script its one profile key, a rate script its one
bucket.
"""

from __future__ import annotations

import zlib
from binascii import crc_hqx

from policy.errors import StoreError
from policy.store.redis.keys import CACHE_SIZE, escape, kid

#: Redis Cluster's hash slots.
SLOTS = 16384
#: Shards of call records and their indexes. A constant of the layout: every instance sharing a
#: cluster and prefix must use the same (changing it needs an empty prefix).
SHARDS = 48


def key_slot(key: str | bytes) -> int:
    """The cluster slot of a key (CRC16/XMODEM of its hash tag, or of the whole key)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    return crc_hqx(data, 0) % SLOTS


def shard_of(uid: str) -> int:
    """The shard of a call (stable across instances and versions of Python)."""
    return zlib.crc32(uid.encode()) % SHARDS


def node_member(node: str, uid: str) -> str:
    """A call's member in its shard's node index."""
    return f"{len(node.encode())}:{node}{uid}"


def node_prefix(node: str) -> bytes:
    """The start of every member of `node` in a node index (a ZRANGEBYLEX range)."""
    return f"{len(node.encode())}:{node}".encode()


class Shard:
    """The key names of one shard."""

    __slots__ = ("counts", "exp", "index", "locks", "nodes", "reports", "slot", "tag", "values")

    def __init__(self, index: int, tag: str) -> None:
        self.index = index
        self.tag = tag
        self.slot = key_slot(tag)
        self.exp = tag + ":exp"
        self.locks = tag + ":l"
        self.counts = tag + ":n"
        self.nodes = tag + ":o"
        self.values = tag + ":v"
        self.reports = tag + ":x"

    def record(self, uid: str) -> str:
        """The hash of one call of this shard."""
        return self.tag + ":c:" + uid


class ClusterLayout:
    """Key names and slots of one prefix in a cluster."""

    def __init__(self, prefix: str) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise StoreError(f"redis cluster prefix {prefix!r}: must be non-empty, without '{{' or '}}' "
                             "(the store chooses the hash tags)")
        self.prefix = prefix
        self.shards = [Shard(i, _shard_tag(prefix, i)) for i in range(SHARDS)]
        self._keys: dict[tuple[str, str | None], tuple[str, int, str]] = {}
        self._kids: dict[str, tuple[str, int]] = {}
        self._rates: dict[str, tuple[str, int]] = {}

    def shard(self, uid: str) -> Shard:
        """The shard of a call."""
        return self.shards[shard_of(uid)]

    def key(self, profile: str, value: str | None) -> tuple[str, int, str]:
        """(key name, slot, kid) of one profile key (cached)."""
        k = (profile, value)
        got = self._keys.get(k)
        if got is None:
            if len(self._keys) >= CACHE_SIZE:
                self._keys.clear()
            i = kid(profile, value)
            name = f"{self.prefix}:k:{i}"
            got = self._keys[k] = (name, key_slot(name), i)
        return got

    def key_of_kid(self, k: str) -> tuple[str, int]:
        """(key name, slot) of a kid read from a record (cached)."""
        got = self._kids.get(k)
        if got is None:
            if len(self._kids) >= CACHE_SIZE:
                self._kids.clear()
            name = f"{self.prefix}:k:{k}"
            got = self._kids[k] = (name, key_slot(name))
        return got

    def rate(self, rid: str) -> tuple[str, int]:
        """(key name, slot) of the call-rate bucket `rid` (`keys.kid(rule, value)`; cached)."""
        got = self._rates.get(rid)
        if got is None:
            if len(self._rates) >= CACHE_SIZE:
                self._rates.clear()
            name = f"{self.prefix}:r:{rid}"
            got = self._rates[rid] = (name, key_slot(name))
        return got

    @property
    def key_pattern(self) -> str:
        """A SCAN pattern matching every profile key of this prefix."""
        special = "*?[]\\"
        return "".join("\\" + c if c in special else c for c in self.prefix) + ":k:*"

    @staticmethod
    def value_range(profile: str) -> tuple[bytes, bytes]:
        """The ZRANGEBYLEX bounds of a profile's kids in a values index (inclusive start, end)."""
        base = (escape(profile) + "=").encode()
        return b"[" + base, b"[" + base + b"\xff"


def _shard_tag(prefix: str, index: int) -> str:
    """``{prefix:s<index>.<n>}`` with the first n whose slot lies in the index-th slot range."""
    lo = index * SLOTS // SHARDS
    hi = (index + 1) * SLOTS // SHARDS
    for n in range(1_000_000):
        tag = f"{{{prefix}:s{index}.{n}}}"
        if lo <= key_slot(tag) < hi:
            return tag
    raise StoreError(f"no hash tag for shard {index} of prefix {prefix!r}")  # (cannot happen)
