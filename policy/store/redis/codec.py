"""Call records and script arguments as the Redis store writes and reads them. Pure: no I/O.

A call's record is a hash with few fields (each one costs Redis time on every reserve):

- ``d``: JSON written and read by the client only, never parsed in Lua:
  ``[account, from, to, call_id, from_tag, node, init_ts, [[profile, value|null], ...]]``.
  Its beginning ``[account,from,to,`` is the call's *identity prefix*: reserve.lua compares it
  with a repeated check's to tell a duplicate (same call) from a conflict.
- ``s`` state (``early``/``active``), ``st`` start time (once answered), ``to`` lease length,
  ``e`` lease expiry.
- ``n`` the token of the admission that holds the call; after a takeover by a repeated check
  also ``c`` (the token that created the record) and ``b`` (the token before the takeover),
  so that undoing an unanswered reserve never releases an admission someone else confirmed.
- ``k`` the node and every key the call joined (the kids), length-prefixed (``<bytes>:<text>``),
  what end.lua releases.
- ``v:<name>`` one per call variable.

Times in Redis are in Redis's time base (the service's clock plus the offset measured on
connect); records are converted back with the reader's own offset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from policy.errors import StoreError
from policy.store.base import CallInfo, CallRecord, PlanEntry, RateEntry
from policy.store.redis.keys import CACHE_SIZE, KeyLayout, escape, kid

#: Fixed ARGV of reserve.lua before the per-key arguments (see its header).
RESERVE_FIXED = 15


def pack_items(items: Iterable[str]) -> str:
    """Strings as one ``<bytes>:<text>`` sequence (what _codec.lua's `items` splits)."""
    return "".join(f"{len(s.encode())}:{s}" for s in items)


def unpack_items(text: str) -> list[str]:
    """The strings of a `pack_items` sequence."""
    data = text.encode()
    out: list[str] = []
    pos = 0
    while pos < len(data):
        colon = data.index(b":", pos)
        n = int(data[pos:colon])
        out.append(data[colon + 1 : colon + 1 + n].decode())
        pos = colon + 1 + n
    return out


def num(x: float) -> str:
    """A float as text that Redis and Lua parse back to the same double."""
    return repr(float(x))


def decode_record(flat: Sequence[Any], offset: float) -> CallRecord:
    """A record from its HGETALL reply; times moved from Redis's base to the reader's."""
    try:
        it = iter(flat)
        h: dict[str, str] = dict(zip(it, it, strict=False))
        account, from_uri, to_uri, call_id, from_tag, node, init, profiles = orjson.loads(h["d"])
        st = h.get("st")
        return CallRecord(
            call_id, from_uri, to_uri, account, h["s"], init - offset, float(st) - offset if st else None,
            float(h["to"]), float(h["e"]) - offset, [(p, v) for p, v in profiles], from_tag, node, h["n"],
            # base fields: d s to e n k (+ st c b): more means variables
            {k[2:]: v for k, v in h.items() if k[:2] == "v:"} if len(h) > 6 else {},
        )
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise StoreError(f"malformed call record in redis: {exc!r}") from None


def maybe_record(reply: Any, offset: float) -> CallRecord | None:
    """A record, or None for a nil/empty reply."""
    if not reply:
        return None
    if not isinstance(reply, list):
        raise StoreError(f"unexpected reply from redis: {reply!r}")
    return decode_record(reply, offset)


def live_record(reply: Any, offset: float, now: float) -> CallRecord | None:
    """A record read with HGETALL, or None when it is gone or its lease ended by `now`."""
    rec = maybe_record(reply, offset)
    return rec if rec is not None and rec.expires > now else None


class _KeyInfo:
    """What reserve needs about one profile key (cached per (profile, value))."""

    __slots__ = ("eprofile", "piece", "value", "values_key", "zset")

    def __init__(self, layout: KeyLayout, profile: str, value: str | None) -> None:
        k = kid(profile, value)
        self.zset = layout.p + "k:" + k
        self.eprofile = escape(profile)
        self.values_key = None if value is None else layout.values(profile)
        self.value = "" if value is None else value
        self.piece = f"{len(k.encode())}:{k}"


class ReserveCommand:
    """KEYS and ARGV of one reserve.lua call, and how to read its reply."""

    __slots__ = ("args", "keys", "profiles", "rates", "slots")

    def __init__(self, keys: list[str], args: list[Any], profiles: list[tuple[str, str | None]],
                 slots: list[int], rates: int = 0) -> None:
        self.keys = keys
        self.args = args
        self.profiles = profiles  # the distinct keys, in plan order
        self.slots = slots  # for each plan entry, the index of its key among `profiles`
        self.rates = rates  # rate buckets sent (their figures follow the sizes in the reply)


class ReserveEncoder:
    """Builds reserve.lua's arguments (the hot path: ~10 us per check, so key names are cached)."""

    def __init__(self, layout: KeyLayout) -> None:
        self.layout = layout
        self._cache: dict[tuple[str, str | None], _KeyInfo] = {}

    def _info(self, key: tuple[str, str | None]) -> _KeyInfo:
        info = self._cache.get(key)
        if info is None:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            info = self._cache[key] = _KeyInfo(self.layout, key[0], key[1])
        return info

    def encode(self, call: CallInfo, plan: Sequence[PlanEntry], base_now: float, timeout: float,
               token: str, epoch: str, flags: str, rates: Sequence[RateEntry] = ()) -> ReserveCommand:
        """The command for `call` with times already in Redis's base (`base_now`); `rates` go
        last (their bucket keys after the value indexes, their triples after the variables)."""
        distinct: dict[tuple[str, str | None], int] = {}
        infos: list[_KeyInfo] = []
        slots: list[int] = []
        checks: list[int] = []
        cache = self._cache
        for i, e in enumerate(plan):
            key = (e.profile, e.value)
            slot = distinct.get(key)
            if slot is None:
                slot = distinct[key] = len(infos)
                infos.append(cache.get(key) or self._info(key))
            slots.append(slot)
            if e.limit is not None and not e.shadow:
                checks += (i, slot + 1, e.limit)
        layout = self.layout
        values_keys: list[str] = []
        vslot_of: dict[str, int] = {}
        per_key: list[Any] = []
        valued: dict[str, bool] = {}  # eprofile with a valued key -> whether it has its None key too
        pieces = [f"{len(call.node.encode())}:{call.node}"]
        for info in infos:
            vk = info.values_key
            if vk is None:
                vslot = 0
            else:
                vslot = vslot_of.get(vk, 0)
                if not vslot:
                    vslot = vslot_of[vk] = len(values_keys) + 1
                    values_keys.append(vk)
                valued.setdefault(info.eprofile, False)
            per_key += (vslot, info.value)
            pieces.append(info.piece)
        if len(valued) and len(valued) < len(infos):  # a profile in both a valued key and its None key?
            for info in infos:
                if info.values_key is None and info.eprofile in valued:
                    valued[info.eprofile] = True
        profile_fields = ["p:" + ep for ep in valued]
        profile_fields += ["x:" + ep for ep, both in valued.items() if both]
        uid = call.uid
        profiles = list(distinct)
        w = orjson.dumps([call.account, call.from_uri, call.to_uri])[:-1] + b","
        d = w + orjson.dumps([call.call_id, call.from_tag, call.node, base_now, profiles])[1:]
        expires = base_now + timeout
        var_args: list[str] = []
        if call.vars:
            for name, value in call.vars.items():
                var_args += (name, value)
        keys = [layout.record(uid), layout.exp, layout.counts, layout.node(call.node),
                *[info.zset for info in infos], *values_keys]
        # (floats go as they are: hiredis writes them as repr() does, which Lua reads back exactly)
        args: list[Any] = [base_now, expires, timeout, uid, d, w, token, "".join(pieces), epoch, flags,
                           len(infos), len(values_keys), len(profile_fields), len(checks) // 3,
                           len(var_args) // 2, *per_key, *profile_fields, *checks, *var_args]
        if rates:
            for r in rates:
                keys.append(layout.rate(r.rule, r.value))
                args += (float(r.rate), r.burst, "s" if r.shadow else "")
        return ReserveCommand(keys, args, profiles, slots, len(rates))
