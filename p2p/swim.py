# SWIM membership with Lifeguard's refinements, sans-IO (issue 18): who is in the network,
# failure detection by probing, dissemination by piggybacked gossip and digest-based push-pull.
# Lives here: the member entries and their merge (a join-semilattice), the protocol messages and
# their wire form, and `Swim`, one node's state machine. Time comes in as `now` (seconds),
# randomness from the `random.Random` it is given, signatures through two callbacks.
# Must not live here: sockets, clocks, trio, threads, cryptography, or anything about how a
# message reaches a peer (the caller delivers `Send`s, authenticates every sender and scores
# down the peers an `Offence` names).
#
# The protocol. Every period a node probes one member, taken from a shuffled round-robin of
# the live ones: `Ping`; without an `Ack` within the probe timeout it pings again and sends
# `PingReq` to k others, who ping the target and forward its ack, or a `Nack` when it stays
# silent (only a live member's ping-reqs are served, within a budget per requester: an honest
# one asks about once a period; the excess is refused and reported as an `Offence`). A probe
# with no ack by the end of the period fails; after as many consecutive failed probes as the
# node's measured message loss calls for (one at low loss), the target becomes suspect.
# A suspicion becomes a death after a timeout that grows with log N and shrinks with
# independent confirmations (each one its origin's own word: sent by it, or signed by it),
# unless the suspect refutes it first by raising its incarnation
# (the suspector tells it directly, and so does every node that probes it meanwhile). Changes
# ride on pings and acks, a few per message, each sent about mult*log10(N+1) times; news (an
# incarnation, a death, a leave) is also pushed at once to a few random members, who do the
# same (`Gossip`). Every sync interval a node reconciles with one random member: equal root
# hashes end the exchange, otherwise bucket hashes, then the per-member digests of the buckets
# that differ, then only the entries that differ. A node's local health multiplier (0..8) grows
# while it misses acks and nacks and stretches its own timeouts, so a node that is itself slow
# stops accusing others.
from __future__ import annotations

import hashlib
import math
import random
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any, NamedTuple

import msgpack


class MemberState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"  # the member announced it leaves the network for good (signed by it)


ALIVE, SUSPECT, DEAD, LEFT = (MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD,
                              MemberState.LEFT)
# at equal incarnation a later state wins; the rank is also the state's code on the wire
RANK: dict[MemberState, int] = {ALIVE: 0, SUSPECT: 1, DEAD: 2, LEFT: 3}
STATE_OF_RANK: tuple[MemberState, ...] = (ALIVE, SUSPECT, DEAD, LEFT)
_LIVE = frozenset((ALIVE, SUSPECT))

MAX_META = 1024
MAX_ADDRS = 16
MAX_ADDR_LEN = 256
MAX_PEER_ID_LEN = 128
MAX_RECORD = 4096
MAX_PROOF = 128  # a suspicion's signature (Ed25519: 64 bytes, msgpack-framed)
# An update is 5 fields, 6 with a proof; fields after those are a later release's and are
# ignored (and not relayed), up to UPDATE_FIELDS_MAX in all, each a scalar or a string of at
# most UPDATE_EXTRA_MAX bytes, so that the next extension of an update upgrades a network in
# place (the release before signed suspicions refused a sixth field as malformed, and scored
# its sender down).
UPDATE_FIELDS_MAX = 10
UPDATE_EXTRA_MAX = 256
MAX_INCARNATION = 2**62  # leaves room to refute; a peer cannot push us past the wire's uint64
FINE_BITS = 8  # the push-pull digest's finest level: 256 buckets by the peer id's hash
FINE = 1 << FINE_BITS
# A node's message sequence numbers (what acks, nacks and sync answers echo) go round this
# range: a counter from 0 grew from 1 to 3 bytes within minutes and to 5 after ~65k messages,
# a third more bytes in every ping and ack of a long-running idle node. A number comes back
# round after 65,280 messages, far longer than any exchange waits for its answer.
SEQ_LOW, SEQ_HIGH = 256, 1 << 16
_FINE_SHIFT = 64 - FINE_BITS


# -- records and entries --------------------------------------------------------------------
class RecordInfo(NamedTuple):
    """What a member signs about itself. `boot` tells one run of its process from the next
    (a new value means it restarted); `left` marks the record it signs when it leaves."""

    peer_id: str
    incarnation: int
    addrs: tuple[str, ...]
    meta: bytes
    boot: int
    left: bool = False


def pack_record_body(info: RecordInfo) -> bytes:
    """The canonical bytes a member signs (the caller adds the signature around them)."""
    return msgpack.packb([info.peer_id, info.incarnation, list(info.addrs), info.meta,
                          info.boot, info.left])


def unpack_record_body(body: bytes) -> RecordInfo | None:
    """The inverse of pack_record_body; None for anything malformed."""
    try:
        fields = msgpack.unpackb(body, raw=False)
    except Exception:
        return None
    if not isinstance(fields, list) or len(fields) != 6:
        return None
    peer_id, inc, addrs, meta, boot, left = fields
    if (not isinstance(peer_id, str) or not _is_uint(inc) or not isinstance(addrs, list)
            or not all(isinstance(a, str) for a in addrs) or not isinstance(meta, bytes)
            or not _is_uint(boot) or not isinstance(left, bool)):
        return None
    return RecordInfo(peer_id, inc, tuple(addrs), meta, boot, left)


def _is_uint(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**64


@lru_cache(maxsize=1 << 16)
def bucket_key(peer_id: str) -> int:
    """A member's 64-bit place in the push-pull digest (the same on every node)."""
    return int.from_bytes(hashlib.blake2b(peer_id.encode(), digest_size=8).digest(), "big")


def _entry_digest(peer_id: str, incarnation: int, state: MemberState, record: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{peer_id}\0{incarnation}\0{RANK[state]}\0".encode())
    h.update(record)
    return int.from_bytes(h.digest(), "big")


@dataclass(frozen=True, slots=True)
class Member:
    """One member as a node sees it. Everything but `state` comes from the member's signed
    `record` at `incarnation`; `state` beyond alive is a claim by others (or its own leave)."""

    peer_id: str
    incarnation: int
    state: MemberState
    addrs: tuple[str, ...]
    meta: bytes
    boot: int
    record: bytes
    digest: int = field(init=False, repr=False, compare=False)  # of the whole entry
    bucket: int = field(init=False, repr=False, compare=False)  # bucket_key(peer_id)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", _entry_digest(self.peer_id, self.incarnation,
                                                         self.state, self.record))
        object.__setattr__(self, "bucket", bucket_key(self.peer_id))

    @property
    def left(self) -> bool:
        return self.state is LEFT

    def with_state(self, state: MemberState) -> Member:
        return Member(self.peer_id, self.incarnation, state, self.addrs, self.meta, self.boot,
                      self.record)

    def order(self) -> tuple[int, int, bytes]:
        """The merge order of entries for one member: incarnation, then state, then record."""
        return (self.incarnation, RANK[self.state], self.record)

    def to_dict(self) -> dict[str, object]:
        return {"peer_id": self.peer_id, "addrs": list(self.addrs),
                "incarnation": self.incarnation, "state": self.state.value,
                "left": self.left, "meta_bytes": len(self.meta)}


def merge(a: Member, b: Member) -> Member:
    """The join of two entries for the same member: higher incarnation, then dead/left over
    suspect over alive, then the greater record bytes (only a member that signed two records
    at one incarnation makes that tie)."""
    if a.peer_id != b.peer_id:
        raise ValueError("merge of entries for different members")
    return a if a.order() >= b.order() else b


def merge_views(a: Mapping[str, Member], b: Mapping[str, Member]) -> dict[str, Member]:
    """The join of two views: every member of either, each entry merged."""
    out = dict(a)
    for peer_id, entry in b.items():
        mine = out.get(peer_id)
        out[peer_id] = entry if mine is None else merge(mine, entry)
    return out


def claim_body(suspect: str, incarnation: int, origin: str) -> bytes:
    """What a suspicion's origin signs: that it suspects `suspect` at `incarnation`."""
    return bytes(msgpack.packb(["suspect", suspect, incarnation, origin]))


def _newer(a: Member, b: Member) -> bool:
    """a > b in the merge order."""
    if a.incarnation != b.incarnation:
        return a.incarnation > b.incarnation
    ra, rb = RANK[a.state], RANK[b.state]
    if ra != rb:
        return ra > rb
    return a.record > b.record


# -- messages --------------------------------------------------------------------------------
@dataclass(slots=True, eq=True)
class Update:
    """A change carried in a message. ALIVE and LEFT always carry the member's record (they
    announce an incarnation); SUSPECT and DEAD are claims by others and carry it only when the
    claim is about an incarnation the receiver may not know yet. `origin` names who suspects
    (independent suspicions shorten the timer) and `proof` is its signature over the claim
    (`claim_body`): a relayed suspicion counts as its origin's only with it."""

    peer_id: str
    incarnation: int
    state: MemberState
    record: bytes | None = None
    origin: str | None = None
    proof: bytes | None = None
    _size: int = field(default=-1, repr=False, compare=False)
    _member: Member | None = field(default=None, repr=False, compare=False)
    _verifier: object = field(default=None, repr=False, compare=False)

    def wire(self) -> list[Any]:
        fields = [self.peer_id, self.incarnation, RANK[self.state], self.record, self.origin]
        if self.proof is not None:
            fields.append(self.proof)
        return fields

    def size(self) -> int:
        """Its msgpack size (cached: an update is immutable once made)."""
        if self._size < 0:
            self._size = len(msgpack.packb(self.wire()))
        return self._size


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Nack:
    """An intermediary of an indirect probe heard nothing from the target in time."""

    seq: int


@dataclass(frozen=True, slots=True)
class PingReq:
    seq: int
    target: str
    updates: tuple[Update, ...] = ()


@dataclass(frozen=True, slots=True)
class Gossip:
    """News pushed at once (one way) to a few random members by the first node that makes or
    hears it: a new incarnation, a death, a leave. Piggybacking alone would take log N periods
    to reach everyone; the push reaches most nodes within a few message delays."""

    seq: int
    updates: tuple[Update, ...]


@dataclass(frozen=True, slots=True)
class Sync:
    """Push-pull, 1/4: the initiator's root hash (the XOR of every entry's digest)."""

    seq: int
    root: int


@dataclass(frozen=True, slots=True)
class SyncHashes:
    """2/4: the responder's bucket hashes (8 bytes each, a power of two of them, chosen from
    its view's size), or none when the roots are equal (the exchange ends there)."""

    seq: int
    hashes: bytes


@dataclass(frozen=True, slots=True)
class SyncDigest:
    """3/4: the initiator's (peer_id, incarnation, state code, low 32 bits of the entry digest)
    for each of its members in the buckets that differ."""

    seq: int
    buckets: int  # how many buckets `differ` counts in
    differ: tuple[int, ...]
    digest: tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class SyncEntries:
    """4/4 (and the initiator's answer): full entries the other side lacks or holds older, and
    the members the sender wants in return (answered by the initiator only)."""

    seq: int
    entries: tuple[Update, ...]
    want: tuple[str, ...] = ()


Message = (Ping | Ack | Nack | PingReq | Sync | SyncHashes | SyncDigest | SyncEntries
           | Gossip)
_TYPE_CODE: dict[type, int] = {Ping: 0, Ack: 1, Nack: 2, PingReq: 3, Sync: 4, SyncHashes: 5,
                               SyncDigest: 6, SyncEntries: 7, Gossip: 8}


# each message type's name in per-kind counters (the node's metrics, the simulation's counts)
KIND: dict[type, str] = {Ping: "ping", Ack: "ack", Nack: "nack", PingReq: "ping_req",
                         Sync: "sync", SyncHashes: "sync_hashes", SyncDigest: "sync_digest",
                         SyncEntries: "sync_entries", Gossip: "gossip"}


def carried_bytes(message: Message) -> int:
    """Bytes of the updates or entries a message carries (the records and claims in it, as
    opposed to its own few bytes of header)."""
    if isinstance(message, SyncEntries):
        return sum(u.size() for u in message.entries)
    if isinstance(message, Ping | Ack | PingReq | Gossip):
        return sum(u.size() for u in message.updates)
    return 0


class MalformedMessage(ValueError):
    """A message that does not decode into one of the protocol's messages."""


def to_wire(message: Message) -> list[Any]:
    """The msgpack-ready form: a list whose first item is the type code."""
    t = type(message)
    if t is Ping or t is Ack or t is Gossip:
        assert isinstance(message, Ping | Ack | Gossip)
        return [_TYPE_CODE[t], message.seq, [u.wire() for u in message.updates]]
    if isinstance(message, Nack):
        return [2, message.seq]
    if isinstance(message, PingReq):
        return [3, message.seq, message.target, [u.wire() for u in message.updates]]
    if isinstance(message, Sync):
        return [4, message.seq, message.root]
    if isinstance(message, SyncHashes):
        return [5, message.seq, message.hashes]
    if isinstance(message, SyncDigest):
        return [6, message.seq, message.buckets, list(message.differ),
                [list(d) for d in message.digest]]
    if isinstance(message, SyncEntries):
        return [7, message.seq, [u.wire() for u in message.entries], list(message.want)]
    raise TypeError(f"not a protocol message: {message!r}")


def encode(message: Message) -> bytes:
    return msgpack.packb(to_wire(message))


def _uint_size(n: int) -> int:
    return 1 if n < 128 else 2 if n < 256 else 3 if n < 65536 else 5 if n < 2**32 else 9


def _array_header(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


def _str_size(text: str) -> int:
    n = len(text.encode())
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)


def wire_size(message: Message) -> int:
    """len(encode(message)), computed without encoding the common messages again."""
    t = type(message)
    if t is Ping or t is Ack or t is Gossip:
        assert isinstance(message, Ping | Ack | Gossip)
        ups = message.updates
        return (2 + _uint_size(message.seq) + _array_header(len(ups))
                + sum(u.size() for u in ups))
    if isinstance(message, Nack):
        return 2 + _uint_size(message.seq)
    if isinstance(message, PingReq):
        ups = message.updates
        return (2 + _uint_size(message.seq) + _str_size(message.target)
                + _array_header(len(ups)) + sum(u.size() for u in ups))
    return len(encode(message))


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise MalformedMessage(what)


def _peer_id(value: object) -> str:
    _check(isinstance(value, str) and 0 < len(value) <= MAX_PEER_ID_LEN, "peer id")
    assert isinstance(value, str)
    return value


def _is_small_scalar(value: object) -> bool:
    if isinstance(value, (bytes, str)):
        return len(value) <= UPDATE_EXTRA_MAX
    return value is None or isinstance(value, (bool, int, float))


def _update_from(raw: object, max_record: int) -> Update:
    _check(isinstance(raw, list) and 5 <= len(raw) <= UPDATE_FIELDS_MAX, "update")
    assert isinstance(raw, list)
    peer_id, inc, rank, record, origin = raw[:5]
    proof = raw[5] if len(raw) >= 6 else None
    _check(all(_is_small_scalar(extra) for extra in raw[6:]), "a later release's field")
    _check(proof is None or (isinstance(proof, bytes) and len(proof) <= MAX_PROOF), "proof")
    _check(_is_uint(inc) and type(rank) is int and 0 <= rank < 4, "update fields")
    _check(record is None or (isinstance(record, bytes) and len(record) <= max_record), "record")
    state = STATE_OF_RANK[rank]
    _check(record is not None or state in (SUSPECT, DEAD), "alive or left without a record")
    return Update(_peer_id(peer_id), inc, state, record,
                  None if origin is None else _peer_id(origin), proof)


def _updates_from(raw: object, limit: int) -> tuple[Update, ...]:
    _check(isinstance(raw, list) and len(raw) <= limit, "update list")
    assert isinstance(raw, list)
    return tuple(_update_from(u, MAX_RECORD) for u in raw)


def from_wire(obj: object, *, max_updates: int = 64, max_entries: int = 100_000) -> Message:
    """Decode the form to_wire makes (after msgpack), refusing anything else with
    MalformedMessage."""
    _check(isinstance(obj, list) and len(obj) >= 2, "message")
    assert isinstance(obj, list)
    code, seq = obj[0], obj[1]
    _check(type(code) is int and _is_uint(seq), "message header")
    n = len(obj)
    if code in (0, 1, 8) and n == 3:
        ups = _updates_from(obj[2], max_updates)
        return Ping(seq, ups) if code == 0 else Ack(seq, ups) if code == 1 else Gossip(seq, ups)
    if code == 2 and n == 2:
        return Nack(seq)
    if code == 3 and n == 4:
        return PingReq(seq, _peer_id(obj[2]), _updates_from(obj[3], max_updates))
    if code == 4 and n == 3:
        _check(_is_uint(obj[2]), "root")
        return Sync(seq, obj[2])
    if code == 5 and n == 3:
        hashes = obj[2]
        _check(isinstance(hashes, bytes) and (hashes == b"" or _buckets_ok(len(hashes) // 8))
               and len(hashes) % 8 == 0, "hashes")
        return SyncHashes(seq, hashes)
    if code == 6 and n == 5:
        buckets, differ, digest = obj[2], obj[3], obj[4]
        _check(type(buckets) is int and _buckets_ok(buckets), "bucket count")
        _check(isinstance(differ, list) and len(differ) <= buckets
               and all(type(b) is int and 0 <= b < buckets for b in differ), "buckets")
        _check(isinstance(digest, list) and len(digest) <= max_entries, "digest")
        items = []
        for d in digest:
            _check(isinstance(d, list) and len(d) == 4, "digest item")
            pid, inc, rank, low = d
            _check(_is_uint(inc) and type(rank) is int and 0 <= rank < 4
                   and _is_uint(low) and low < 2**32, "digest item fields")
            items.append((_peer_id(pid), inc, rank, low))
        return SyncDigest(seq, buckets, tuple(differ), tuple(items))
    if code == 7 and n == 4:
        entries, want = obj[2], obj[3]
        _check(isinstance(entries, list) and len(entries) <= max_entries, "entries")
        _check(isinstance(want, list) and len(want) <= max_entries, "want")
        ups = tuple(_update_from(e, MAX_RECORD) for e in entries)
        _check(all(u.record is not None for u in ups), "entry without a record")
        return SyncEntries(seq, ups, tuple(_peer_id(w) for w in want))
    raise MalformedMessage(f"unknown message type {code!r} of {n} fields")


def decode(data: bytes, **limits: int) -> Message:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise MalformedMessage(f"not msgpack: {exc}") from None
    return from_wire(obj, **limits)


def _buckets_ok(n: int) -> bool:
    return 1 <= n <= FINE and n & (n - 1) == 0


# -- outputs ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    """Deliver `message` to `to` (its addresses as this node knows them; () for a sender it
    does not know, which the caller reaches over the connection the request came on)."""

    to: str
    addrs: tuple[str, ...]
    message: Message


@dataclass(frozen=True, slots=True)
class Event:
    """A change of one member, shaped like p2p.membership.MemberEvent: `previous` is None for a
    member seen for the first time, `current` None for one forgotten after long dead."""

    peer_id: str
    previous: MemberState | None
    current: MemberState | None
    member: Member
    restarted: bool = False


@dataclass(frozen=True, slots=True)
class Offence:
    """`peer` sent something an honest member does not send (`reason`, a p2p.scoring offence
    name): the caller scores it down. The core has already refused what it sent."""

    peer: str
    reason: str


Output = Send | Event | Offence


# -- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SwimConfig:
    """The protocol's knobs (times in seconds). Every node of a network should use the same;
    the suspicion timeouts and the retransmissions take N from the node's own view."""

    period: float = 1.0  # protocol period: one probe per period (stretched by local health)
    probe_timeout: float = 0.5  # wait for a direct ack before asking others (x (1 + LHM))
    indirect_k: int = 3  # members asked to probe a silent target (the direct ping is resent)
    # A live member fails a probe with a probability this node estimates from its own ack
    # rate; it suspects after as many consecutive failed probes (one period each) as keep the
    # expected false suspicions of the whole network under `false_suspicion_budget` per period
    suspect_after: int = 1  # ... at least
    suspect_after_max: int = 6  # ... at most
    false_suspicion_budget: float = 0.05
    ack_rate_alpha: float = 0.1  # weight of the latest answered probe in the direct-ack rate
    loss_floor: float = 0.01  # the message loss assumed however well the acks come back
    nack_fraction: float = 0.8  # an intermediary nacks after this share of its probe timeout
    suspicion_alpha: float = 4.0  # min suspicion timeout = alpha * log10(N) periods ...
    suspicion_floor: float = 4.0  # ... but at least this many seconds
    suspicion_beta: float = 6.0  # a suspicion nobody confirms lasts beta times that
    suspicion_k: int = 3  # independent confirmations that bring it down to the minimum
    retransmit_mult: int = 4  # an update goes out mult * ceil(log10(N + 1)) times
    max_updates: int = 8  # per message ...
    max_update_bytes: int = 4096  # ... and the bytes they may take together (an alive
    # update is ~300 bytes with one address and no meta, so 8 of those fit)
    sync_interval: float = 15.0  # push-pull with one random member (+-25% jitter)
    join_retry: float = 1.0  # after joining, sync again this soon (it picks up members that
    # joined meanwhile) and as often for as long as no member is known; also the least time
    # between syncs with senders this node does not know or holds dead
    reconnect_interval: float = 30.0  # push-pull with a random dead member: heals partitions
    sync_timeout: float = 10.0  # a push-pull exchange is forgotten after this long
    sync_retry: float = 2.0  # a periodic one not finished by then is retried with another
    sync_tries: int = 5  # member, this many times in all (messages get lost)
    sync_chunk_bytes: int = 256 * 1024  # full entries per SyncEntries message, at most
    forget_after: float = 300.0  # a dead or left member is dropped this long after
    lhm_max: int = 8  # local health multiplier's ceiling (0 turns Lifeguard's LHM off)
    leave_fanout: int = 4  # members told directly when this node leaves
    gossip_fanout: int = 3  # members news is pushed to at once (0: piggybacking only) ...
    gossip_interval: float = 0.2  # ... and again this often while any is left to send
    notice_backoff_max: float = 8.0  # periods between pings telling a member this node
    # suspects it: after 1, 2, 4, ... up to this many (until the suspicion ends)
    refute: bool = True  # only experiments turn this off (tests show what it prevents)
    # ping-reqs served per requester: a token bucket of `ping_req_burst` that refills by
    # `ping_req_rate` per period. An honest member asks one helper at most once per probe, so
    # about once a period; the excess of a member that asks more (each request costs this
    # node a ping and a forward kept) is refused and reported as an Offence
    ping_req_rate: float = 2.0
    ping_req_burst: float = 4.0

    def __post_init__(self) -> None:
        if not 0 < self.probe_timeout < self.period:
            raise ValueError("probe_timeout must be in (0, period)")
        if self.indirect_k < 0 or self.suspicion_k < 0 or self.lhm_max < 0:
            raise ValueError("counts must not be negative")
        if self.max_updates < 1 or self.retransmit_mult < 1:
            raise ValueError("max_updates and retransmit_mult must be positive")
        if self.ping_req_rate <= 0 or self.ping_req_burst < 1:
            raise ValueError("ping_req_rate must be positive and ping_req_burst at least 1")


# -- the state machine -----------------------------------------------------------------------
@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    incarnation: int
    timeout_at: float
    end_at: float
    sample: bool = True  # counts towards the direct-ack rate
    helpers: tuple[str, ...] = ()
    indirect: bool = False
    nacks: int = 0


@dataclass(slots=True)
class _Forward:
    requester: str
    req_seq: int
    target: str
    nack_at: float
    expires: float
    nacked: bool = False


@dataclass(slots=True)
class _Suspicion:
    incarnation: int
    start: float
    min_t: float
    max_t: float
    k: int
    confirmers: set[str]
    deadline: float
    update: Update  # sent first to the suspect itself (Lifeguard's buddy system)
    notify_at: float = math.inf  # when to tell the suspect again (see Swim._notify)
    notify_every: float = 0.0


class _Gossip:
    """Updates waiting to be piggybacked, one per member (a newer one replaces the older).
    News that settles something (an incarnation, a death, a leave) goes before suspicions;
    within each, the least transmitted first and among those the newest. Under overload,
    suspicions spread slowest and refutations fastest, which is the safe way round."""

    __slots__ = ("_classes", "_where", "_counts")

    def __init__(self) -> None:
        # per class (0: news, 1: suspicions), per transmissions so far: peer id -> update
        self._classes: tuple[list[dict[str, Update]], list[dict[str, Update]]] = ([{}], [{}])
        self._where: dict[str, tuple[int, int]] = {}  # peer id -> (class, transmissions)
        self._counts = [0, 0]

    def __len__(self) -> int:
        return len(self._where)

    def put(self, update: Update) -> None:
        pid = update.peer_id
        self.drop(pid)
        cls = 1 if update.state is SUSPECT else 0
        self._classes[cls][0][pid] = update
        self._where[pid] = (cls, 0)
        self._counts[cls] += 1

    def has_news(self, below: int) -> bool:
        """Anything but suspicions queued and transmitted fewer than `below` times."""
        return self._counts[0] > 0 and any(self._classes[0][:below])

    def drop(self, peer_id: str) -> None:
        where = self._where.pop(peer_id, None)
        if where is not None:
            del self._classes[where[0]][where[1]][peer_id]
            self._counts[where[0]] -= 1

    def take(self, max_n: int, max_bytes: int, limit: int, first: Update | None,
             count: bool = True, news_only: bool = False,
             below: int | None = None) -> tuple[Update, ...]:
        """Up to max_n updates in max_bytes, `first` first; each counts as transmitted once
        more (and leaves the queue at `limit`) unless `count` is False. `news_only`: no
        suspicions; `below`: only updates transmitted fewer times than that."""
        if not self._where:
            return () if first is None else (first,)
        chosen: list[Update] = []
        picked: list[tuple[int, int, str]] = []
        budget = max_bytes
        if first is not None:
            chosen.append(first)
            budget -= first.size()
            where = self._where.get(first.peer_id)
            if where is not None and self._classes[where[0]][where[1]][first.peer_id] is first:
                picked.append((where[0], where[1], first.peer_id))
        scan = 4 * max_n
        for cls in (0,) if news_only else (0, 1):
            if not self._counts[cls]:
                continue
            for level, items in enumerate(self._classes[cls]):
                if below is not None and level >= below:
                    break
                if not items:
                    continue
                for pid, update in reversed(items.items()):
                    scan -= 1
                    if update is not first:
                        size = update._size if update._size >= 0 else update.size()
                        if size <= budget or not chosen:  # one fits, however large
                            chosen.append(update)
                            budget -= size
                            picked.append((cls, level, pid))
                    if len(chosen) >= max_n or scan <= 0:
                        break
                if len(chosen) >= max_n or scan <= 0:
                    break
            if len(chosen) >= max_n or scan <= 0:
                break
        if count:
            self._count(picked, limit)
        return tuple(chosen)

    def _count(self, picked: list[tuple[int, int, str]], limit: int) -> None:
        where = self._where
        for cls, level, pid in picked:
            levels = self._classes[cls]
            update = levels[level].pop(pid)
            if level + 1 >= limit:
                del where[pid]
                self._counts[cls] -= 1
                continue
            if level + 1 == len(levels):
                levels.append({})
            levels[level + 1][pid] = update
            where[pid] = (cls, level + 1)


class _BucketIndex:
    """Peer ids sorted by bucket key, to list a node's members in given buckets. The index of
    a ViewSnapshot is shared by every node preloaded from it: each id goes in once and never
    leaves (each node keeps only the ids it holds when it reads the index)."""

    __slots__ = ("keys", "ids", "present")

    def __init__(self, members: Iterable[Member] = (), shared: bool = False) -> None:
        order = sorted(members, key=lambda m: m.bucket)
        self.keys: list[int] = [m.bucket for m in order]
        self.ids: list[str] = [m.peer_id for m in order]
        self.present: set[str] | None = set(self.ids) if shared else None

    def add(self, key: int, pid: str) -> None:
        if self.present is not None:
            if pid in self.present:
                return
            self.present.add(pid)
        i = bisect_left(self.keys, key)
        self.keys.insert(i, key)
        self.ids.insert(i, pid)

    def remove(self, key: int, pid: str) -> None:
        if self.present is not None:
            return
        keys, ids = self.keys, self.ids
        i = bisect_left(keys, key)
        while i < len(keys) and keys[i] == key:
            if ids[i] == pid:
                del keys[i]
                del ids[i]
                return
            i += 1

    def between(self, lo: int, hi: int) -> list[str]:
        keys = self.keys
        return self.ids[bisect_left(keys, lo):bisect_left(keys, hi)]


SignRecord = Callable[[RecordInfo], bytes]
VerifyRecord = Callable[[str, bytes], RecordInfo | None]
SignClaim = Callable[[bytes], bytes]  # this node's signature over a claim_body
VerifyClaim = Callable[[str, bytes, bytes], bool]  # (signer's peer id, claim_body, signature)


class ViewSnapshot:
    """A view several nodes may start from without replaying it (Swim.preload): a persisted
    view, or a simulation's converged network. Its entries are trusted as they are."""

    def __init__(self, members: Iterable[Member]) -> None:
        self.members: dict[str, Member] = {m.peer_id: m for m in members}
        fine = array("Q", bytes(8 * FINE))
        root = 0
        for m in self.members.values():
            fine[m.bucket >> _FINE_SHIFT] ^= m.digest
            root ^= m.digest
        self.fine = fine
        self.root = root
        self.index = _BucketIndex(self.members.values(), shared=True)
        self.live_ids: list[str] = [m.peer_id for m in self.members.values()
                                    if m.state in _LIVE]
        self.dead_ids: list[str] = [m.peer_id for m in self.members.values()
                                    if m.state not in _LIVE]


class Swim:
    """One node's membership. Feed it `tick(now)` at `next_wakeup()` (or just often), every
    message with `receive(sender, message, now)`, and deliver the `Send`s it returns; the
    `Event`s it returns are the member changes to act on."""

    def __init__(
        self, peer_id: str, addrs: Sequence[str], *, sign_record: SignRecord,
        verify_record: VerifyRecord, sign_claim: SignClaim | None = None,
        verify_claim: VerifyClaim | None = None, meta: bytes = b"", incarnation: int = 0,
        boot: int | None = None, config: SwimConfig | None = None,
        rng: random.Random | None = None, now: float = 0.0,
    ) -> None:
        if len(meta) > MAX_META:
            raise ValueError(f"meta of {len(meta)} bytes exceeds {MAX_META}")
        self.peer_id = peer_id
        self.config = cfg = config or SwimConfig()
        self._rng = rng if rng is not None else random.Random(peer_id)
        self._sign = sign_record
        self._verify = verify_record
        self._sign_claim = sign_claim
        self._verify_claim = verify_claim
        self._addrs = tuple(addrs)
        self._meta = meta
        self._boot = boot if boot is not None else self._rng.getrandbits(63)
        self._incarnation = incarnation
        self._members: dict[str, Member] = {}
        self._fine = array("Q", bytes(8 * FINE))
        self._root = 0
        self._index = _BucketIndex()
        self._live = 0  # members other than this node that are alive or suspect
        self._dead_since: OrderedDict[str, float] = OrderedDict()  # oldest first
        self._suspicions: dict[str, _Suspicion] = {}
        self._gossip = _Gossip()
        self._probe: _Probe | None = None
        self._next_probe_at = now + self._rng.uniform(0, cfg.period)
        self._plist: list[str] = []
        self._pidx = 0
        self._failed: dict[str, int] = {}  # target -> consecutive failed probes
        self._ack_rate = 1.0  # share of probes whose direct ping was acked within the timeout
        self._ack_samples = 0
        self._reprobe: str | None = None  # the next probe's target after a failed probe
        self._forwards: dict[int, _Forward] = {}
        # live member -> (ping-reqs it may still send, when that was counted): see _on_ping_req
        self._ping_req_budget: dict[str, tuple[float, float]] = {}
        self._syncs: dict[int, tuple[str, float, bool]] = {}  # seq -> (peer, expires, answered)
        self._serving: dict[tuple[str, int], float] = {}  # (initiator, seq) -> expires
        self._next_sync_at = now + self._jitter(cfg.sync_interval)
        self._periodic: int | None = None  # seq of the periodic exchange not finished yet
        self._periodic_retry_at = math.inf
        self._periodic_tries = 0
        self._next_reconnect_at = now + self._jitter(cfg.reconnect_interval)
        self._seeds: list[tuple[str, tuple[str, ...]]] = []
        self._push: list[tuple[Update, str]] = []  # news to push, and whom it came from
        self._stranger_sync_at = now  # next sync allowed with a sender this node does not know
        self._next_gossip_at = now
        self._limit_n, self._limit = -1, 0  # see _retransmit_limit
        self._lhm = 0
        self._left = False
        # the last sequence number used; numbers run round [SEQ_LOW, SEQ_HIGH) from a random
        # start, so every message's number takes 3 bytes on the wire however long it runs
        self._seq = self._rng.randrange(SEQ_LOW, SEQ_HIGH)
        self.stats: dict[str, int] = dict.fromkeys(
            ("probes", "probes_failed", "indirect_probes", "suspicions", "confirmations",
             "confirmations_unproven", "declared_dead", "refutations", "suspected_not_refuted",
             "records_rejected", "syncs", "sync_entries_received", "ping_reqs_refused",
             "ping_reqs_not_member"), 0)
        me = self._make_self(incarnation, left=False)
        self._store(me, now)
        self._gossip.put(Update(peer_id, incarnation, ALIVE, me.record))

    # -- queries ---------------------------------------------------------------------------
    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def local_health(self) -> int:
        """Lifeguard's local health multiplier: 0 healthy .. lhm_max."""
        return self._lhm

    @property
    def me(self) -> Member:
        return self._members[self.peer_id]

    def members(self) -> list[Member]:
        """Every known member but this node, by peer id."""
        return sorted((m for pid, m in self._members.items() if pid != self.peer_id),
                      key=lambda m: m.peer_id)

    def get(self, peer_id: str) -> Member | None:
        return self._members.get(peer_id)

    def alive_ids(self) -> set[str]:
        """Members other than this node that are alive (not suspect)."""
        me = self.peer_id
        return {pid for pid, m in self._members.items() if m.state is ALIVE and pid != me}

    def size(self) -> int:
        """Members alive or suspect, this node included: the N of the timeouts."""
        return self._live + 1

    def pending_updates(self) -> int:
        """Updates queued for piggybacking."""
        return len(self._gossip)

    def suspicion_deadline(self, peer_id: str) -> float | None:
        """When this node declares `peer_id` dead unless it hears otherwise (None: no
        suspicion running)."""
        s = self._suspicions.get(peer_id)
        return None if s is None else s.deadline

    def next_wakeup(self) -> float:
        """The earliest moment tick() has something to do."""
        if self._left:
            return math.inf
        t = min(self._next_probe_at, self._next_sync_at, self._next_reconnect_at)
        if self._periodic is not None and self._periodic_retry_at < t:
            t = self._periodic_retry_at
        p = self._probe
        if p is not None and not p.indirect and p.timeout_at < t:
            t = p.timeout_at
        if self._suspicions:
            for s in self._suspicions.values():
                if s.deadline < t:
                    t = s.deadline
                if s.notify_at < t:
                    t = s.notify_at
        if self._forwards:
            for fw in self._forwards.values():
                due = fw.expires if fw.nacked else fw.nack_at
                if due < t:
                    t = due
        if self._dead_since:
            first = next(iter(self._dead_since.values())) + self.config.forget_after
            if first < t:
                t = first
        if (self._next_gossip_at < t and self.config.gossip_fanout
                and self._gossip.has_news(self._retransmit_limit() // 2)):
            t = self._next_gossip_at
        return t

    # -- inputs ----------------------------------------------------------------------------
    def preload(self, snapshot: ViewSnapshot, now: float) -> None:
        """Start from `snapshot` (trusted, no events), before any other input."""
        if len(self._members) != 1:
            raise RuntimeError("preload only into a fresh node")
        mine = self._members[self.peer_id]
        self._members = dict(snapshot.members)
        self._fine = array("Q", snapshot.fine)
        self._root = snapshot.root
        self._index = snapshot.index
        self._live = len(snapshot.live_ids)
        self._plist = list(snapshot.live_ids)
        self._pidx = 0
        self._gossip = _Gossip()  # what the snapshot holds is no news to anyone
        for pid in snapshot.dead_ids:
            self._dead_since[pid] = now
        for m in self._members.values():
            if m.state is SUSPECT:
                self._start_suspicion(m, "", now, Update(m.peer_id, m.incarnation, SUSPECT))
        theirs = self._members.get(self.peer_id)
        if theirs is None:
            self._store(mine, now)
            return
        if theirs.state in _LIVE:
            self._live -= 1
        else:
            self._dead_since.pop(self.peer_id, None)
        self._members[self.peer_id] = theirs
        self._store(mine, now)
        if theirs.incarnation > mine.incarnation or (
                theirs.incarnation == mine.incarnation and theirs.record != mine.record):
            self._refute(theirs.incarnation, now, suspected=False)

    def join(self, seeds: Iterable[tuple[str, Sequence[str]]], now: float) -> list[Output]:
        """Push-pull with one random seed (each one costs a full view); another one every
        join_retry seconds for as long as no member is known."""
        self._seeds = [(pid, tuple(addrs)) for pid, addrs in seeds if pid != self.peer_id]
        out: list[Output] = []
        if self._seeds:
            pid, addrs = self._rng.choice(self._seeds)
            self._start_sync(pid, addrs, now, out)
        self._next_sync_at = min(self._next_sync_at, now + self.config.join_retry)
        return out

    def sync_with(self, peer_id: str, addrs: Sequence[str], now: float) -> list[Output]:
        """Push-pull with `peer_id` now (the transport just reached a member this view does
        not hold alive: a restarted seed, the other side of a healed partition)."""
        out: list[Output] = []
        if peer_id != self.peer_id and not self._left:
            self._start_sync(peer_id, tuple(addrs), now, out)
        return out

    def leave(self, now: float) -> list[Output]:
        """Announce that this node leaves for good (a left record at incarnation + 1, pushed
        to a few members at once and gossiped on every ack it sends from now on)."""
        if self._left:
            return []
        self._left = True
        self._incarnation += 1
        me = self._make_self(self._incarnation, left=True)
        self._store(me, now)
        update = Update(self.peer_id, self._incarnation, LEFT, me.record)
        self._gossip.put(update)
        self._probe = None
        self._suspicions.clear()
        out: list[Output] = []
        for pid in self._random_live(self.config.leave_fanout, ()):
            self._next_seq()
            out.append(Send(pid, self._addrs_of(pid), Ping(self._seq, (update,))))
        return out

    def update_local(self, now: float, *, addrs: Sequence[str] | None = None,
                     meta: bytes | None = None) -> list[Output]:
        """New addresses or meta for this node: a new incarnation, gossiped."""
        if meta is not None:
            if len(meta) > MAX_META:
                raise ValueError(f"meta of {len(meta)} bytes exceeds {MAX_META}")
            self._meta = meta
        if addrs is not None:
            self._addrs = tuple(addrs)
        out: list[Output] = []
        if not self._left:
            self._refute(self._incarnation, now, suspected=False)
            self._flush_push(now, out)
        return out

    def unreachable(self, peer_id: str, now: float) -> list[Output]:
        """The transport could not deliver to `peer_id`: as if its ack had been missed."""
        out: list[Output] = []
        p = self._probe
        if p is not None and p.target == peer_id and not p.indirect:
            self._indirect(p, out)
        for fw in self._forwards.values():
            if fw.target == peer_id and not fw.nacked:
                fw.nacked = True
                out.append(Send(fw.requester, self._addrs_of(fw.requester), Nack(fw.req_seq)))
        return out

    def tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        if self._left:
            return out
        if self._forwards:
            self._expire_forwards(now, out)
        self._run_probe(now, out)
        if self._suspicions:
            self._expire_suspicions(now, out)
        if now >= self._next_sync_at:
            self._periodic_sync(now, out)
        elif now >= self._periodic_retry_at and self._periodic is not None:
            self._periodic_sync(now, out, retry=True)
        if now >= self._next_reconnect_at:
            self._reconnect(now, out)
        if self._dead_since:
            self._forget(now, out)
        if self._push:
            self._flush_push(now, out)
        elif (now >= self._next_gossip_at
              and self._gossip.has_news(self._retransmit_limit() // 2)):
            self._gossip_round(now, out)
        return out

    def receive(self, sender: str, message: Message, now: float) -> list[Output]:
        """A message from `sender` (authenticated by the caller)."""
        out: list[Output] = []
        t = type(message)
        if ((t is Ping or t is PingReq or t is Gossip) and now >= self._stranger_sync_at
                and (sender not in self._members or self._members[sender].state is DEAD)):
            # a member that knows this node while this node does not know it (it joined
            # through a node that knew few), or holds it dead (after a partition): reconcile
            self._stranger_sync_at = now + self.config.join_retry
            self._start_sync(sender, (), now, out)
        if t is Ping:
            assert isinstance(message, Ping)
            fixes: list[Update] = []
            members = self._members
            for u in message.updates:
                known = members.get(u.peer_id)
                if known is not None and u.incarnation < known.incarnation:
                    # the sender missed a newer incarnation (a refutation, most often): the
                    # ack tells it first, so its stale suspicion dies out instead of its timer
                    if len(fixes) < 2:
                        fixes.append(self._full_update(known))
                    continue
                self._apply(u, sender, now, out, False)
            updates = self._piggyback(sender)
            out.append(Send(sender, self._addrs_of(sender),
                            Ack(message.seq, (*fixes, *updates) if fixes else updates)))
        elif t is Ack:
            assert isinstance(message, Ack)
            for u in message.updates:
                self._apply(u, sender, now, out, False)
            self._on_ack(sender, message.seq, out)
        elif t is Nack:
            p = self._probe
            if p is not None and p.seq == message.seq and sender in p.helpers:
                p.nacks += 1
        elif t is PingReq:
            assert isinstance(message, PingReq)
            for u in message.updates:
                self._apply(u, sender, now, out, False)
            self._on_ping_req(sender, message, now, out)
        elif t is Sync:
            assert isinstance(message, Sync)
            self._on_sync(sender, message, now, out)
        elif t is SyncHashes:
            assert isinstance(message, SyncHashes)
            self._on_sync_hashes(sender, message, now, out)
        elif t is SyncDigest:
            assert isinstance(message, SyncDigest)
            self._on_sync_digest(sender, message, now, out)
        elif t is SyncEntries:
            assert isinstance(message, SyncEntries)
            self._on_sync_entries(sender, message, now, out)
        elif t is Gossip:
            assert isinstance(message, Gossip)
            for u in message.updates:
                self._apply(u, sender, now, out, False)
        if self._push:
            self._flush_push(now, out)
        return out

    def _next_seq(self) -> None:
        self._seq = self._seq + 1 if self._seq < SEQ_HIGH - 1 else SEQ_LOW

    # -- probing ---------------------------------------------------------------------------
    def _run_probe(self, now: float, out: list[Output]) -> None:
        p = self._probe
        if p is not None:
            if now >= p.end_at:
                self._probe = None
                self._probe_failed(p, now, out)
            elif not p.indirect and now >= p.timeout_at:
                self._indirect(p, out)
        if self._probe is None and now >= self._next_probe_at:
            cfg = self.config
            scale = 1 + self._lhm
            self._next_probe_at = now + cfg.period * scale
            target = None
            if self._reprobe is not None:
                target = self._members.get(self._reprobe)
                self._reprobe = None
                if target is not None and target.state not in _LIVE:
                    target = None
            if target is None:
                target = self._next_target()
            if target is None:
                return
            self._next_seq()
            # a member's re-probes and suspects' probes say more about it than about loss
            sample = target.state is ALIVE and target.peer_id not in self._failed
            self._probe = _Probe(self._seq, target.peer_id, target.incarnation,
                                 now + cfg.probe_timeout * scale, self._next_probe_at, sample)
            self.stats["probes"] += 1
            out.append(Send(target.peer_id, target.addrs,
                            Ping(self._seq, self._piggyback(target.peer_id))))

    def _indirect(self, p: _Probe, out: list[Output]) -> None:
        """No ack within the probe timeout: ping again, and ask k others to ping it too."""
        p.indirect = True
        if p.sample:
            self._ack_sample(0.0)
        target = self._members.get(p.target)
        helpers = self._random_live(self.config.indirect_k, (p.target,))
        p.helpers = tuple(helpers)
        if helpers:
            self.stats["indirect_probes"] += 1
        if target is not None:
            out.append(Send(target.peer_id, target.addrs,
                            Ping(p.seq, self._piggyback(target.peer_id))))
        for pid in helpers:
            out.append(Send(pid, self._addrs_of(pid),
                            PingReq(p.seq, p.target, self._piggyback(pid))))

    def _on_ack(self, sender: str, seq: int, out: list[Output]) -> None:
        p = self._probe
        if p is not None and p.seq == seq and (sender == p.target or sender in p.helpers):
            self._probe = None
            if p.sample and not p.indirect:
                self._ack_sample(1.0)
            self._failed.pop(p.target, None)
            if self._lhm > 0:
                self._lhm -= 1
            return
        fw = self._forwards.get(seq)
        if fw is not None and sender == fw.target:
            del self._forwards[seq]
            out.append(Send(fw.requester, self._addrs_of(fw.requester),
                            Ack(fw.req_seq, self._piggyback(fw.requester))))

    def _probe_failed(self, p: _Probe, now: float, out: list[Output]) -> None:
        self.stats["probes_failed"] += 1
        # Lifeguard: missed nacks say the fault is (also) ours; all nacks back say it is not
        delta = len(p.helpers) - p.nacks if p.helpers else 1
        self._lhm = min(self.config.lhm_max, self._lhm + delta)
        target = self._members.get(p.target)
        if target is None or target.incarnation != p.incarnation:
            self._failed.pop(p.target, None)
            return
        failed = self._failed.get(p.target, 0) + 1
        if failed < self.failures_to_suspect():
            self._failed[p.target] = failed  # once more next period before suspecting
            self._reprobe = p.target
            return
        self._failed.pop(p.target, None)
        self._suspect(target, self.peer_id, now, out, None, self.peer_id)

    def _ack_sample(self, acked: float) -> None:
        """The direct-ack rate: the mean of the first samples (after a prior of 3 acks, so
        one early miss does not read as 90% loss), then an exponential average."""
        self._ack_samples += 1
        a = max(self.config.ack_rate_alpha, 1 / (self._ack_samples + 3))
        self._ack_rate += a * (acked - self._ack_rate)

    def failures_to_suspect(self) -> int:
        """Consecutive failed probes before this node suspects a member (see SwimConfig)."""
        cfg = self.config
        loss = min(0.9, max(cfg.loss_floor, 1 - math.sqrt(max(self._ack_rate, 0.0))))
        round_trip = (1 - loss) ** 2
        relayed = (1 - loss) ** 4  # request, ping, ack, forwarded ack
        p = (1 - round_trip) ** 2 * (1 - relayed) ** cfg.indirect_k
        want = math.log(cfg.false_suspicion_budget / max(self.size(), 1)) / math.log(p)
        return max(cfg.suspect_after, min(cfg.suspect_after_max, math.ceil(want)))

    def _on_ping_req(self, sender: str, msg: PingReq, now: float, out: list[Output]) -> None:
        known = self._members.get(sender)
        if known is None or known.state not in _LIVE or sender == self.peer_id:
            # only live members are served (a joiner's first requests carry its alive record,
            # applied before this, and an unknown sender got a sync started in receive())
            self.stats["ping_reqs_not_member"] += 1
            return
        cfg = self.config
        tokens, since = self._ping_req_budget.get(sender, (cfg.ping_req_burst, now))
        tokens = min(cfg.ping_req_burst,
                     tokens + max(0.0, now - since) * cfg.ping_req_rate / cfg.period)
        if tokens < 1.0:
            self._ping_req_budget[sender] = (tokens, now)
            self.stats["ping_reqs_refused"] += 1
            out.append(Offence(sender, "flood"))
            return
        self._ping_req_budget[sender] = (tokens - 1.0, now)
        if msg.target == self.peer_id:
            out.append(Send(sender, self._addrs_of(sender), Ack(msg.seq, ())))
            return
        target = self._members.get(msg.target)
        if target is None:
            out.append(Send(sender, self._addrs_of(sender), Nack(msg.seq)))
            return
        if len(self._forwards) >= 1024:  # a flood of requests: forget the oldest
            del self._forwards[next(iter(self._forwards))]
        self._next_seq()
        self._forwards[self._seq] = _Forward(
            sender, msg.seq, msg.target, now + cfg.nack_fraction * cfg.probe_timeout,
            now + cfg.period * (1 + cfg.lhm_max))
        out.append(Send(target.peer_id, target.addrs,
                        Ping(self._seq, self._piggyback(target.peer_id))))

    def _expire_forwards(self, now: float, out: list[Output]) -> None:
        for seq, fw in list(self._forwards.items()):
            if now >= fw.expires:
                del self._forwards[seq]
            elif not fw.nacked and now >= fw.nack_at:
                fw.nacked = True
                out.append(Send(fw.requester, self._addrs_of(fw.requester), Nack(fw.req_seq)))

    def _next_target(self) -> Member | None:
        """The next member of a shuffled round-robin over the live ones (a Fisher-Yates shuffle
        done one step per pick, so members added mid-round land among the unvisited)."""
        members, me, rng = self._members, self.peer_id, self._rng
        for _ in range(2):
            pl = self._plist
            n = len(pl)
            while self._pidx < n:
                i = self._pidx
                j = i + int(rng.random() * (n - i))
                pl[i], pl[j] = pl[j], pl[i]
                self._pidx = i + 1
                m = members.get(pl[i])
                if m is not None and m.state in _LIVE and m.peer_id != me:
                    return m
            self._plist = [pid for pid, m in members.items() if m.state in _LIVE and pid != me]
            self._pidx = 0
            if not self._plist:
                return None
        return None

    def _random_live(self, k: int, exclude: Sequence[str]) -> list[str]:
        """Up to k distinct random live members other than this node and `exclude`."""
        pl, members, rng = self._plist, self._members, self._rng
        chosen: list[str] = []
        if not pl or k <= 0:
            return chosen
        for _ in range(4 * k + 8):
            pid = pl[int(rng.random() * len(pl))]
            m = members.get(pid)
            if (m is not None and m.state in _LIVE and pid != self.peer_id
                    and pid not in exclude and pid not in chosen):
                chosen.append(pid)
                if len(chosen) == k:
                    break
        return chosen

    # -- suspicion -------------------------------------------------------------------------
    def _suspect(self, known: Member, origin: str, now: float, out: list[Output],
                 update: Update | None, sender: str, notify: bool = False) -> None:
        """`origin` suspects `known`, as `sender` says (itself, or relaying). It counts as
        the origin's confirmation only on the origin's own word (see `_confirmer`): `origin`
        is a name anyone can write."""
        pid = known.peer_id
        if known.state is ALIVE:
            proven = self._proven(known, origin, update)
            confirmer = self._confirmer(origin, sender, proven)
            new = known.with_state(SUSPECT)
            self._change(known, new, now, out)
            if update is None:
                update = self._suspicion_update(pid, known.incarnation, None, origin)
            else:
                update = self._relayable(update, origin, proven)
            self._start_suspicion(new, confirmer, now, update)
            self._gossip.put(update)
            if origin == self.peer_id:
                self.stats["suspicions"] += 1
            if origin == self.peer_id or notify:
                self._notify(new, self._suspicions[pid], now, out)
        elif known.state is SUSPECT:
            s = self._suspicions.get(pid)
            if s is None or s.incarnation != known.incarnation or origin in s.confirmers:
                return
            proven = self._proven(known, origin, update)
            confirmer = self._confirmer(origin, sender, proven)
            if confirmer is None:
                self.stats["confirmations_unproven"] += 1  # not counted: see above
                return
            s.confirmers.add(confirmer)
            self.stats["confirmations"] += 1
            s.deadline = s.start + self._suspicion_timeout(s)
            self._gossip.put(self._suspicion_update(pid, known.incarnation, None, origin)
                             if update is None else self._relayable(update, origin, proven))
            if origin == self.peer_id:
                self._notify(known, s, now, out)

    def _proven(self, known: Member, origin: str, update: Update | None) -> bool:
        """Whether `update` carries `origin`'s signature over its suspicion of `known` (at
        `known`'s incarnation)."""
        if (update is None or update.proof is None or update.origin != origin
                or self._verify_claim is None):
            return False
        body = claim_body(known.peer_id, known.incarnation, origin)
        return self._verify_claim(origin, body, update.proof)

    def _confirmer(self, origin: str, sender: str, proven: bool) -> str | None:
        """Whom a suspicion counts as confirming it: its origin if that is the sender (the
        peer the connection authenticated) or this node, or if the update carries the
        origin's signature over the claim (`proven`); nobody otherwise (a member that wrote
        other members' names as origins would bring a suspicion to its shortest timeout
        alone)."""
        if proven or origin == sender or origin == self.peer_id:
            return origin
        return None

    @staticmethod
    def _relayable(update: Update, origin: str, proven: bool) -> Update:
        """`update` as this node passes it on: with its proof only if the proof verified
        here. A suspicion its origin sent first-hand counts without its proof (the
        connection says who sent it), but a proof that does not verify is never relayed:
        the members further on would refuse it as the relaying node's forgery. The origin
        is always written out: one left out would name the relaying node to the next."""
        if update.origin == origin and (update.proof is None or proven):
            return update
        return Update(update.peer_id, update.incarnation, SUSPECT, update.record, origin,
                      update.proof if proven else None)

    def _suspicion_update(self, pid: str, incarnation: int, record: bytes | None,
                          origin: str) -> Update:
        """The update that spreads a suspicion; signed when this node is its origin."""
        proof = None
        if origin == self.peer_id and self._sign_claim is not None:
            proof = self._sign_claim(claim_body(pid, incarnation, origin))
        return Update(pid, incarnation, SUSPECT, record, origin, proof)

    def _notify(self, m: Member, s: _Suspicion, now: float, out: list[Output]) -> None:
        """Tell the suspect directly that this node suspects it (its own suspicion, or one it
        learned in a sync): under load a suspicion may spread too slowly for the suspect to
        hear of it in time, and one raised on the far side of a partition never reached it.
        Again after 1, 2, 4, ... periods while the suspicion lasts; the ack brings the
        refutation back."""
        cfg = self.config
        s.notify_every = min(max(cfg.period, 2 * s.notify_every),
                             cfg.notice_backoff_max * cfg.period)
        s.notify_at = now + s.notify_every
        self._next_seq()
        out.append(Send(m.peer_id, m.addrs, Ping(self._seq, self._piggyback(m.peer_id))))

    def _start_suspicion(self, m: Member, confirmer: str | None, now: float,
                         update: Update) -> None:
        cfg = self.config
        n = self.size()
        scale = 1 + self._lhm
        min_t = max(cfg.suspicion_floor,
                    cfg.suspicion_alpha * math.log10(max(n, 1)) * cfg.period) * scale
        max_t = cfg.suspicion_beta * min_t
        k = max(0, min(cfg.suspicion_k, n - 2))
        s = _Suspicion(m.incarnation, now, min_t, max_t, k,
                       set() if confirmer is None else {confirmer}, now, update)
        s.deadline = now + self._suspicion_timeout(s)
        self._suspicions[m.peer_id] = s

    @staticmethod
    def _suspicion_timeout(s: _Suspicion) -> float:
        """max_t shrinking towards min_t as log(confirmations + 1) / log(k + 1)."""
        if s.k < 1:
            return s.min_t
        confirmations = max(0, len(s.confirmers) - 1)
        fraction = math.log(confirmations + 1) / math.log(s.k + 1)
        return max(s.min_t, s.max_t - (s.max_t - s.min_t) * fraction)

    def _expire_suspicions(self, now: float, out: list[Output]) -> None:
        for pid, s in self._suspicions.items():
            if now >= s.notify_at:
                self._notify(self._members[pid], s, now, out)
        due = [pid for pid, s in self._suspicions.items() if now >= s.deadline]
        for pid in due:
            s = self._suspicions.pop(pid)
            known = self._members.get(pid)
            if known is None or known.state is not SUSPECT or known.incarnation != s.incarnation:
                continue
            self.stats["declared_dead"] += 1
            self._change(known, known.with_state(DEAD), now, out)
            self._news(Update(pid, known.incarnation, DEAD, None, None), self.peer_id)

    # -- applying updates ------------------------------------------------------------------
    def _apply(self, u: Update, sender: str, now: float, out: list[Output],
               from_sync: bool) -> None:
        pid = u.peer_id
        if pid == self.peer_id:
            self._about_me(u, now)
            return
        known = self._members.get(pid)
        if (known is not None and known.incarnation == u.incarnation and known.state is u.state
                and u.state is not SUSPECT  # (a suspicion may bring a new confirmation)
                and (u.record is None or u.record == known.record)):
            return  # heard it already: the common case
        if u.record is None:  # a claim about an incarnation the receiver must already hold
            if known is None or known.incarnation != u.incarnation:
                return
            if u.state is SUSPECT:
                self._suspect(known, u.origin or sender, now, out, None if from_sync else u,
                              sender)
            elif u.state is DEAD and known.state in _LIVE:
                self._change(known, known.with_state(DEAD), now, out)
                if not from_sync:
                    self._news(u, sender)
            return
        m = self._member_from(u, known)
        if m is None:
            self.stats["records_rejected"] += 1
            return
        if known is None:
            if m.state is DEAD or m.state is LEFT:
                return  # nobody learns of a member by its death
        elif not _newer(m, known):
            if (m.state is SUSPECT and known.state is SUSPECT
                    and m.incarnation == known.incarnation):
                self._suspect(known, u.origin or sender, now, out, None if from_sync else u,
                              sender)
            return
        first_hand = sender == pid
        if m.state is DEAD and from_sync and known is not None and known.state in _LIVE:
            # anti-entropy may not kill: a death only heard of in a sync becomes a suspicion,
            # which the member can still refute (after a partition both sides hold the other
            # dead; taking that at its word would split the network for good)
            if m.incarnation == known.incarnation:
                self._suspect(known, sender, now, out, None, sender, notify=True)
                return
            m = m.with_state(SUSPECT)
            u = Update(pid, m.incarnation, SUSPECT, m.record, sender)
            from_sync = False
        self._change(known, m, now, out)
        if m.state is SUSPECT:
            origin = u.origin or sender
            proven = self._proven(m, origin, u)
            u = self._relayable(u, origin, proven)
            self._start_suspicion(m, self._confirmer(origin, sender, proven), now, u)
            if from_sync:
                self._notify(m, self._suspicions[pid], now, out)
        if (not from_sync or first_hand
                or (m.state is ALIVE and known is not None and known.state is not ALIVE)):
            # what a sync brings is mostly known around already, except a member back from a
            # suspicion or a death (after a partition heals, say): that is news to spread
            self._news(u, sender)

    def _member_from(self, u: Update, known: Member | None) -> Member | None:
        """The entry an update with a record stands for, once its record verifies."""
        cached = u._member
        if cached is not None and u._verifier is self._verify:
            return cached
        record = u.record
        assert record is not None
        if known is not None and known.incarnation == u.incarnation and known.record == record:
            m = known if known.state is u.state else known.with_state(u.state)
        else:
            if len(record) > MAX_RECORD:
                return None
            info = self._verify(u.peer_id, record)
            if (info is None or info.peer_id != u.peer_id or info.incarnation != u.incarnation
                    or info.left != (u.state is LEFT) or len(info.meta) > MAX_META
                    or len(info.addrs) > MAX_ADDRS
                    or any(len(a) > MAX_ADDR_LEN for a in info.addrs)
                    or info.incarnation > MAX_INCARNATION):
                return None
            m = Member(u.peer_id, u.incarnation, u.state, tuple(info.addrs), info.meta,
                       info.boot, record)
        u._member = m
        u._verifier = self._verify
        return m

    def _about_me(self, u: Update, now: float) -> None:
        if self._left:
            return
        mine = self._members[self.peer_id]
        if u.incarnation < mine.incarnation:
            return
        if u.record is None:
            if u.incarnation == mine.incarnation:  # suspect or dead at my incarnation
                self._refute(mine.incarnation, now, suspected=True)
            return  # a claim about an incarnation of mine nobody can show: ignored
        if u.incarnation == mine.incarnation and u.state is ALIVE and u.record == mine.record:
            return
        m = self._member_from(u, mine)
        if m is None:
            self.stats["records_rejected"] += 1
            return
        # a suspicion of me, or a record of mine from an earlier run at or past my incarnation
        self._refute(max(m.incarnation, mine.incarnation), now,
                     suspected=m.state is not ALIVE)

    def _refute(self, above: int, now: float, suspected: bool) -> None:
        if suspected and not self.config.refute:
            self.stats["suspected_not_refuted"] += 1
            return
        if suspected:
            self.stats["refutations"] += 1
            self._lhm = min(self.config.lhm_max, self._lhm + 1)
        self._incarnation = above + 1
        me = self._make_self(self._incarnation, left=False)
        self._store(me, now)
        self._news(Update(self.peer_id, self._incarnation, ALIVE, me.record), self.peer_id)

    def _make_self(self, incarnation: int, left: bool) -> Member:
        info = RecordInfo(self.peer_id, incarnation, self._addrs, self._meta, self._boot, left)
        return Member(self.peer_id, incarnation, LEFT if left else ALIVE, self._addrs,
                      self._meta, self._boot, self._sign(info))

    # -- the view --------------------------------------------------------------------------
    def _change(self, old: Member | None, new: Member, now: float, out: list[Output]) -> None:
        self._store(new, now)
        restarted = (old is not None and new.state is ALIVE and new.incarnation > old.incarnation
                     and new.boot != old.boot)
        if old is None or old.state is not new.state or old.incarnation != new.incarnation:
            out.append(Event(new.peer_id, None if old is None else old.state, new.state, new,
                             restarted))

    def _store(self, new: Member, now: float) -> None:
        pid = new.peer_id
        members = self._members
        old = members.get(pid)
        members[pid] = new
        fine = new.bucket >> _FINE_SHIFT
        if old is None:
            self._index.add(new.bucket, pid)
            self._fine[fine] ^= new.digest
            self._root ^= new.digest
        else:
            x = old.digest ^ new.digest
            self._fine[fine] ^= x
            self._root ^= x
        if pid == self.peer_id:
            return
        was_live = old is not None and old.state in _LIVE
        is_live = new.state in _LIVE
        if is_live:
            if not was_live:
                self._live += 1
                self._dead_since.pop(pid, None)
                self._plist.append(pid)  # among the unvisited: picks draw from the rest
        else:
            if was_live:
                self._live -= 1
            if pid not in self._dead_since:
                self._dead_since[pid] = now
            self._failed.pop(pid, None)
            self._ping_req_budget.pop(pid, None)
        if new.state is not SUSPECT:
            self._suspicions.pop(pid, None)

    def _forget(self, now: float, out: list[Output]) -> None:
        ds = self._dead_since
        limit = now - self.config.forget_after
        while ds:
            pid, since = next(iter(ds.items()))
            if since > limit:
                break
            del ds[pid]
            m = self._members.pop(pid, None)
            if m is None:
                continue
            self._fine[m.bucket >> _FINE_SHIFT] ^= m.digest
            self._root ^= m.digest
            self._index.remove(m.bucket, pid)
            self._gossip.drop(pid)
            out.append(Event(pid, m.state, None, m))

    def _in_buckets(self, nb_bits: int, buckets: Iterable[int]) -> list[Member]:
        """This node's entries whose bucket (of 2**nb_bits) is one of `buckets`."""
        index, members = self._index, self._members
        shift = 64 - nb_bits
        found: list[Member] = []
        for b in buckets:
            for pid in index.between(b << shift, (b + 1) << shift):
                m = members.get(pid)
                if m is not None:
                    found.append(m)
        return found

    def _hashes(self, nb: int) -> list[int]:
        fine = self._fine
        step = FINE // nb
        out = []
        for b in range(nb):
            h = 0
            for x in fine[b * step:(b + 1) * step]:
                h ^= x
            out.append(h)
        return out

    # -- gossip ----------------------------------------------------------------------------
    def _news(self, u: Update, sender: str) -> None:
        """Queue `u` for piggybacking; an incarnation, a death or a leave is also pushed."""
        self._gossip.put(u)
        if u.state is not SUSPECT and self.config.gossip_fanout > 0:
            self._push.append((u, sender))

    def _flush_push(self, now: float, out: list[Output]) -> None:
        news, self._push = self._push, []
        if not news:
            return
        self._next_gossip_at = now + self.config.gossip_interval
        exclude = {self.peer_id}
        for u, sender in news:
            exclude.add(sender)
            exclude.add(u.peer_id)
        cfg = self.config
        limit = self._retransmit_limit()
        first = news[-1][0]
        for pid in self._random_live(cfg.gossip_fanout, tuple(exclude)):
            # the news (the newest in the queue, so first), then whatever else is queued
            ups = self._gossip.take(cfg.max_updates, cfg.max_update_bytes, limit, first)
            self._next_seq()
            out.append(Send(pid, self._addrs_of(pid), Gossip(self._seq, ups)))

    def _retransmit_limit(self) -> int:
        """mult * ceil(log10(N + 1)) transmissions per update (cached per N)."""
        if self._limit_n != self._live:
            self._limit_n = self._live
            self._limit = self.config.retransmit_mult * math.ceil(math.log10(self._live + 2))
        return self._limit

    def _gossip_round(self, now: float, out: list[Output]) -> None:
        """Push queued news (not suspicions) to a few random members: the first half of its
        retransmissions go out within a second or so, the rest rides on probes for free."""
        cfg = self.config
        self._next_gossip_at = now + cfg.gossip_interval
        limit = self._retransmit_limit()
        for pid in self._random_live(cfg.gossip_fanout, ()):
            ups = self._gossip.take(cfg.max_updates, cfg.max_update_bytes, limit, None,
                                    news_only=True, below=limit // 2)
            if not ups:
                break
            self._next_seq()
            out.append(Send(pid, self._addrs_of(pid), Gossip(self._seq, ups)))

    def _piggyback(self, to: str) -> tuple[Update, ...]:
        s = self._suspicions.get(to)
        cfg = self.config
        limit = self._retransmit_limit()
        return self._gossip.take(cfg.max_updates, cfg.max_update_bytes, limit,
                                 s.update if s is not None else None)

    def _addrs_of(self, peer_id: str) -> tuple[str, ...]:
        m = self._members.get(peer_id)
        return m.addrs if m is not None else ()

    def _jitter(self, interval: float) -> float:
        return interval * self._rng.uniform(0.75, 1.25)

    # -- push-pull -------------------------------------------------------------------------
    def _start_sync(self, peer: str, addrs: tuple[str, ...], now: float,
                    out: list[Output]) -> None:
        self._next_seq()
        self._syncs[self._seq] = (peer, now + self.config.sync_timeout, False)
        self.stats["syncs"] += 1
        out.append(Send(peer, addrs, Sync(self._seq, self._root)))

    def _periodic_sync(self, now: float, out: list[Output], retry: bool = False) -> None:
        cfg = self.config
        for seq in [s for s, (_, exp, _) in self._syncs.items() if exp <= now]:
            del self._syncs[seq]
        for key in [k for k, exp in self._serving.items() if exp <= now]:
            del self._serving[key]
        if self._live == 0 and self._seeds:
            pid, addrs = self._rng.choice(self._seeds)
            self._start_sync(pid, addrs, now, out)
            self._next_sync_at = now + cfg.join_retry
            return
        if not retry:
            self._next_sync_at = now + self._jitter(cfg.sync_interval)
            self._periodic_tries = 0
        last = self._syncs.get(-1 if self._periodic is None else self._periodic)
        partner = self._random_live(1, () if last is None else (last[0],))
        self._periodic = None
        self._periodic_retry_at = math.inf
        if partner:
            self._start_sync(partner[0], self._addrs_of(partner[0]), now, out)
            self._periodic = self._seq
            self._periodic_tries += 1
            if self._periodic_tries < cfg.sync_tries:
                self._periodic_retry_at = now + cfg.sync_retry

    def _sync_done(self, seq: int) -> None:
        self._syncs.pop(seq, None)
        if seq == self._periodic:
            self._periodic = None
            self._periodic_retry_at = math.inf

    def _reconnect(self, now: float, out: list[Output]) -> None:
        self._next_reconnect_at = now + self._jitter(self.config.reconnect_interval)
        dead = [pid for pid in self._dead_since if self._members[pid].state is DEAD]
        if dead:
            pid = dead[int(self._rng.random() * len(dead))]
            self._start_sync(pid, self._addrs_of(pid), now, out)

    def _on_sync(self, sender: str, msg: Sync, now: float, out: list[Output]) -> None:
        if msg.root == self._root:
            out.append(Send(sender, self._addrs_of(sender), SyncHashes(msg.seq, b"")))
            return
        nb = 1
        while nb * 2 <= min(FINE, self.size() // 16):
            nb *= 2
        if len(self._serving) >= 4096:
            del self._serving[next(iter(self._serving))]
        self._serving[(sender, msg.seq)] = now + self.config.sync_timeout
        hashes = b"".join(h.to_bytes(8, "big") for h in self._hashes(nb))
        out.append(Send(sender, self._addrs_of(sender), SyncHashes(msg.seq, hashes)))

    def _on_sync_hashes(self, sender: str, msg: SyncHashes, now: float,
                        out: list[Output]) -> None:
        pending = self._syncs.get(msg.seq)
        nb = len(msg.hashes) // 8
        if pending is None or pending[0] != sender:
            return
        if not msg.hashes:  # the same root
            self._sync_done(msg.seq)
            return
        if not _buckets_ok(nb):
            return
        mine = self._hashes(nb)
        differ = tuple(b for b in range(nb)
                       if int.from_bytes(msg.hashes[8 * b:8 * b + 8], "big") != mine[b])
        if not differ:
            self._sync_done(msg.seq)
            return
        digest = tuple((m.peer_id, m.incarnation, RANK[m.state], m.digest & 0xFFFFFFFF)
                       for m in self._in_buckets(nb.bit_length() - 1, differ))
        out.append(Send(sender, self._addrs_of(sender), SyncDigest(msg.seq, nb, differ, digest)))

    def _on_sync_digest(self, sender: str, msg: SyncDigest, now: float,
                        out: list[Output]) -> None:
        if self._serving.pop((sender, msg.seq), None) is None or not _buckets_ok(msg.buckets):
            return
        members = self._members
        entries: list[Member] = []
        want: list[str] = []
        theirs: set[str] = set()
        for pid, inc, rank, low in msg.digest:
            theirs.add(pid)
            mine = members.get(pid)
            if mine is None:
                if rank < 2:
                    want.append(pid)  # a live member this node does not know
                continue
            a, b = (mine.incarnation, RANK[mine.state]), (inc, rank)
            if a > b:
                entries.append(mine)
            elif a < b:
                want.append(pid)
            elif mine.digest & 0xFFFFFFFF != low:
                entries.append(mine)
                want.append(pid)
        for m in self._in_buckets(msg.buckets.bit_length() - 1, msg.differ):
            if m.peer_id not in theirs and m.state in _LIVE:
                entries.append(m)
        self._send_entries(sender, msg.seq, entries, tuple(want), out)

    def _full_update(self, m: Member) -> Update:
        u = Update(m.peer_id, m.incarnation, m.state, m.record)
        u._member, u._verifier = m, self._verify
        return u

    def _send_entries(self, to: str, seq: int, entries: list[Member], want: tuple[str, ...],
                      out: list[Output]) -> None:
        addrs = self._addrs_of(to)
        chunk: list[Update] = []
        size = 0
        limit = self.config.sync_chunk_bytes
        for m in entries:
            chunk.append(self._full_update(m))
            size += len(m.record) + len(m.peer_id) + 16
            if size >= limit:
                out.append(Send(to, addrs, SyncEntries(seq, tuple(chunk), want)))
                chunk, size, want = [], 0, ()
        if chunk or want:
            out.append(Send(to, addrs, SyncEntries(seq, tuple(chunk), want)))

    def _on_sync_entries(self, sender: str, msg: SyncEntries, now: float,
                         out: list[Output]) -> None:
        self.stats["sync_entries_received"] += len(msg.entries)
        if msg.seq == self._periodic and msg.seq in self._syncs:
            self._periodic = None  # the responder answered the digest: the exchange went
            self._periodic_retry_at = math.inf
        for u in msg.entries:
            if u.record is not None:
                self._apply(u, sender, now, out, True)
        if msg.want:
            pending = self._syncs.get(msg.seq)
            if pending is None or pending[0] != sender or pending[2]:
                return
            self._syncs[msg.seq] = (sender, pending[1], True)
            members = self._members
            found = [m for m in (members.get(pid) for pid in msg.want) if m is not None]
            self._send_entries(sender, msg.seq, found, (), out)
