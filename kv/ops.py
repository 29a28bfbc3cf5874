# Operations of the replicated KV store and the CRDT type each one implies.
# Lives here (sans-IO): turning a user operation into a delta against the current state of a
# key, and rendering a state as the plain value a user reads. Time and actor are arguments.
# Also here: the size limits every op meets wherever it enters (the embedding API, HTTP, and
# ops forwarded by peers): check_op on arrival, check_growth when it is applied, and the
# budget of stored state one forwarded request's ops may apply to (StateBudget).
# Must not live here: storage, networking, quorum logic.
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

import crdt

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024  # an op's encoded (msgpack) arguments: a value, members, a field
# a put's or hset's delta beyond its encoded arguments: timestamp, actor, type (measured: 72
# and 189 bytes). A set's delta is larger: a dot per member (check_growth bounds it).
DELTA_OVERHEAD_BYTES = 1024
# members one sadd or srem may name (too_large beyond): one op is applied in one step of the
# event loop, so its cost is bounded here as well as by its size in bytes
MAX_MEMBERS_PER_OP = 10_000
# ops that only take away: never refused for size (a key too large to grow can still shrink)
REMOVALS = frozenset({"delete", "srem", "hdel"})
# ops a coordinator may send to a second replica while the first is silent (kv/writes.py):
# applied by two replicas they leave, once merged, what one leaves. A put (or an hset's
# field) makes two LWW writes of the same value; an sadd adds the same members with two
# dots; srem and hdel each take away what their replica observed (a removal first merges a
# quorum's states), and the union of two observed removals is one of the same writes. A
# delete of a register, set or map is one of those; a delete of a counter decrements by the
# value it sees, twice if applied twice, so a replica refuses one sent as a hedge
# (not_hedged) and no deadline applies to it. incr is never sent twice.
HEDGEABLE = frozenset({"put", "delete", "sadd", "srem", "hset", "hdel"})

# The CRDT type a key gets from the first operation that writes it. A key keeps its type:
# an operation of another type fails with WrongType until the key is deleted.
TYPE_OF_OP = {
    "put": "lww",
    "delete": None,  # deletes whatever type the key has
    "incr": "pncounter",
    "sadd": "orset",
    "srem": "orset",
    "hset": "ormap",
    "hdel": "ormap",
}

OVERRIDE_OPS = ("put", "delete")  # the operations an operator may force past the skew bound
OVERRIDE_HELP = ("overwrite or delete it with override_skew (HTTP: ?override_skew=true; "
                 "CLI: --override-skew; embedding: override_skew=True)")

# how messages name the types ("key holds a set (orset), not a register (lww)")
_TYPE_WORDS = {"lww": "a register (lww)", "pncounter": "a counter (pncounter)",
               "orset": "a set (orset)", "ormap": "a map (ormap)", "mvreg": "a multi-value "
               "register (mvreg)", "gcounter": "a grow-only counter (gcounter)"}


def _words(type_name: str | None) -> str:
    return _TYPE_WORDS.get(type_name or "", f"a {type_name}")


class OpError(ValueError):
    """An operation that cannot apply: unknown kind, bad arguments, or the wrong type."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Op(NamedTuple):  # a tuple: made per key on the batched write path, so it must be cheap
    kind: str
    key: bytes
    args: tuple[Any, ...] = ()
    # an operator's override: a stored state beyond the clock skew bound is replaced, not
    # merged (kv/timebound.py); only put and delete take it
    override_skew: bool = False

    def to_wire(self) -> list[Any]:
        wire: list[Any] = [self.kind, self.key, list(self.args)]
        if self.override_skew:
            wire.append(True)
        return wire

    @classmethod
    def from_wire(cls, data: Any) -> Op:
        if not (isinstance(data, list) and len(data) in (3, 4) and isinstance(data[0], str)
                and isinstance(data[1], bytes) and isinstance(data[2], list)
                and (len(data) == 3 or type(data[3]) is bool)):
            raise OpError("bad_request", "operation must be [kind, key, args(, override)]")
        if data[0] not in TYPE_OF_OP:
            raise OpError("bad_request", f"unknown operation {data[0]!r}")
        override = len(data) == 4 and data[3]
        if override and data[0] not in OVERRIDE_OPS:
            raise OpError("bad_request", f"{data[0]} does not take override_skew")
        return cls(data[0], data[1], tuple(data[2]), override)


def shown_key(key: bytes) -> str:
    """A key for messages: as the user wrote it (quoted text), not as Python bytes."""
    return repr(key.decode(errors="backslashreplace")[:64])


def check_op(op: Op, max_key_bytes: int, max_value_bytes: int) -> int:
    """The size of `op`'s encoded arguments; OpError "too_large" if its key or arguments are
    larger than the store takes or it names more than MAX_MEMBERS_PER_OP members, "bad_value"
    if its arguments cannot be encoded. The one check of these limits: coordinators run it on
    every op they are given, replicas on every op a peer forwards."""
    if len(op.key) > max_key_bytes:
        raise OpError("too_large", f"key of {len(op.key)} bytes, limit {max_key_bytes}")
    if len(op.args) > MAX_MEMBERS_PER_OP:
        raise OpError("too_large", f"{op.kind} of {shown_key(op.key)} names {len(op.args)} "
                      f"members, limit {MAX_MEMBERS_PER_OP} per operation")
    try:
        size = len(msgpack.packb(op.args, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise OpError("bad_value",
                      f"value of {shown_key(op.key)} cannot be stored: {exc}") from None
    if size > max_value_bytes:
        raise OpError("too_large", f"value of {shown_key(op.key)} is {size} bytes, limit "
                      f"{max_value_bytes}")
    return size


def check_growth(op: Op, current: bytes | None, delta: bytes, max_item_bytes: int) -> None:
    """Refuse (OpError "too_large") an op whose delta, or the state it leaves, would not fit
    with its key in one replication item of `max_item_bytes`: such a state could never be
    replicated, handed off or read back whole. (A set's members carry a dot each, so the
    delta of a small-valued sadd can be many times its arguments.) Removals always pass."""
    check_growth_sized(op, None if current is None else len(current), delta, max_item_bytes,
                       lambda made: (len(current or b""), len(crdt.merge_encoded(current, made))),
                       delta)


def check_growth_sized(op: Op, current_size: int | None, delta: bytes, max_item_bytes: int,
                       exact: Callable[[Any], tuple[int, int]], made: Any) -> None:
    """check_growth for a state known by its size (None: no state), or an upper bound of it;
    `exact(made)` gives the exact sizes of the state and of the state with the delta (`made`,
    in whatever form `exact` takes it) merged, and is called only when the bound and the
    delta together do not fit."""
    if op.kind in REMOVALS:
        return
    room = max_item_bytes - len(op.key)
    if len(delta) > room:
        raise OpError("too_large", f"{op.kind} of {shown_key(op.key)} makes a {len(delta)}-byte "
                      f"change, limit {room}")
    if current_size is not None and current_size + len(delta) > room:
        size, grown = exact(made)
        if grown > room and grown > size:
            raise OpError("too_large", f"{op.kind} would grow {shown_key(op.key)} to {grown} "
                          f"bytes, limit {room}")


BUSY = "busy"  # the error of an op left unapplied by a request's budget: send it again


class StateBudget:
    """The stored state one forwarded request may have its ops apply to, in bytes: each op
    counts the size of the key's state it applies to (an op on a large set reads and merges
    that whole set). The first op is always admitted (so every request makes progress); once
    an op is refused (OpError "busy": not applied, to be sent again), so is every later op of
    the request, so that what is applied stays a prefix, in order, of each group."""

    __slots__ = ("limit", "spent", "admitted", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0
        self.admitted = 0
        self.refused = 0

    def spend(self, op: Op, state_bytes: int) -> None:
        if not self.refused and (not self.admitted or self.spent + state_bytes <= self.limit):
            self.spent += state_bytes
            self.admitted += 1
            return
        self.refused += 1
        # short: a reply may carry thousands of these
        raise OpError(BUSY, f"not applied: over the request's {self.limit} bytes of state; "
                      "send it again")


def type_name(state: Any) -> str:
    return str(state.TYPE_NAME)


def make_delta(op: Op, current: Any | None, actor: str, clock: crdt.HLC,
               now_ms: int) -> Any | None:
    """The delta that applies `op` to `current` (a decoded CRDT or None) as `actor`; None
    when it changes nothing (a removal from a key that holds nothing)."""
    wanted = TYPE_OF_OP[op.kind]
    if op.kind == "delete":
        return _delete_delta(current, actor, _stamp(current, clock, now_ms))
    if current is not None and type_name(current) != wanted:
        if type_name(current) == "lww" and _is_deleted(current):
            # its tombstone must stay until it is collected (a late replica would bring the
            # value back), and replicas cannot merge a state of another type into it
            raise OpError("wrong_type", f"{shown_key(op.key)} was deleted as a register "
                          f"(lww); it takes only put until its tombstone is collected "
                          f"(tombstone_grace_s after the delete), then any type")
        raise OpError("wrong_type", f"key holds {_words(type_name(current))}, "
                      f"not {_words(wanted)}")
    if current is None and op.kind in ("srem", "hdel"):
        if not op.args:
            raise OpError("bad_request", "no members given")
        return None  # as in Redis: removing from a missing key does not create it
    assert wanted is not None
    state: Any = current if current is not None else crdt.new(wanted)
    if op.kind == "put":
        (value,) = op.args
        return state.assign(value, _stamp(state, clock, now_ms), actor)
    if op.kind == "incr":
        (amount,) = op.args
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise OpError("bad_request", "increment must be an integer")
        return state.increment(actor, amount) if amount >= 0 else state.decrement(actor, -amount)
    if op.kind == "sadd":
        return state.add_many(actor, _members(op.args))
    if op.kind == "srem":
        return state.remove_many(_members(op.args))
    if op.kind == "hset":
        field, value = op.args
        if not isinstance(field, str):
            raise OpError("bad_request", "map fields must be strings")
        return state.update(actor, field, "lww",
                            lambda reg: reg.assign(value, _stamp(reg, clock, now_ms), actor))
    if op.kind == "hdel":
        (field,) = op.args
        return state.remove(field)
    raise OpError("bad_request", f"unknown operation {op.kind!r}")


def _members(members: tuple[Any, ...]) -> tuple[Any, ...]:
    # one delta for all of them, made by the types' bulk mutators in linear time (merging
    # one member's delta after another into the state is quadratic: seconds of event loop
    # for a few thousand members)
    if not members:
        raise OpError("bad_request", "no members given")
    return members


def _is_deleted(state: Any) -> bool:
    return type_name(state) == "lww" and state.deleted


def _stamp(state: Any | None, clock: crdt.HLC, now_ms: int) -> crdt.Timestamp:
    """A timestamp newer than the register's winning write and than this node's clock."""
    seen = getattr(state, "timestamp", None)
    if seen is None:
        return clock.now(now_ms)
    try:
        return clock.observe(seen, now_ms)
    except crdt.ClockDriftError as exc:
        raise OpError("clock_skew", f"the key holds a write from a clock beyond the skew bound "
                      f"({exc}); an operator may {OVERRIDE_HELP}") from None


def _delete_delta(current: Any | None, actor: str, stamp: crdt.Timestamp) -> Any:
    """Delete by type, each by observed-remove, so a late replica cannot bring back what was
    deleted: a register gets a tombstone newer than its value; a set loses every element it
    holds, a map every field; a counter is decremented by the value it shows. Writes
    concurrent with the delete survive it (add-wins), as the CRDT semantics require."""
    if current is None:
        return _delete_delta(crdt.new("lww"), actor, stamp)
    kind = type_name(current)
    if kind == "lww":
        return current.delete(stamp, actor)
    if kind == "pncounter":
        value = current.value()
        return current.decrement(actor, value) if value >= 0 else current.increment(actor, -value)
    if kind == "orset":
        return current.remove_many(current.value())
    if kind == "ormap":
        return current.remove_many(current.keys())
    raise OpError("wrong_type", f"cannot delete a {kind}")


def render(state: Any | None) -> Any:
    """The value a reader sees; None for a missing or deleted key."""
    if state is None or _is_deleted(state):
        return None
    value = state.value()
    if type_name(state) == "orset":
        return sorted(value, key=lambda v: (type(v).__name__, repr(v)))
    return value
