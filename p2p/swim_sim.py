# A sans-IO simulation of many p2p.swim nodes on a virtual clock (issue 18's model tests and
# the simulated half of benchmarks/membership.py).
# Lives here: the simulated network (delay within bounds, loss, duplication, partitions, crashed
# and slow nodes, restarts, joins and leaves), stand-in record signatures, and what a run
# records: convergence, detection of each crash, false positives, bytes sent per node. Also the
# scenarios the benchmark and the tests share.
# Must not live here: protocol logic (p2p/swim.py), real sockets or clocks, anything a node
# needs in production. Everything is driven by one seeded random.Random: a run is reproducible.
from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from .swim import (
    ALIVE,
    DEAD,
    KIND,
    LEFT,
    SUSPECT,
    Event,
    Offence,
    Output,
    RecordInfo,
    Send,
    Swim,
    SwimConfig,
    ViewSnapshot,
    carried_bytes,
    pack_record_body,
    unpack_record_body,
    wire_size,
)

_SECRET = b"tasknet swim simulation"
_SIG = 64  # bytes of the stand-in signature (an Ed25519 signature's size)
_KEYS: dict[str, bytes] = {}
TICK, DELIVER, CALL = 0, 1, 2
INF = math.inf
_LIVE = (ALIVE, SUSPECT)


# -- stand-in identities and signatures -----------------------------------------------------
def sim_peer_id(i: int) -> str:
    """A 52-character id, as long as a libp2p Ed25519 peer id, so byte counts are real."""
    return "12D3KooW" + hashlib.sha256(f"node-{i}".encode()).hexdigest()[:44]


def sim_addrs(i: int, peer_id: str) -> tuple[str, ...]:
    return (f"/ip4/10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}/tcp/4001/p2p/{peer_id}",)


def _key(peer_id: str) -> bytes:
    key = _KEYS.get(peer_id)
    if key is None:
        key = _KEYS[peer_id] = hashlib.blake2b(peer_id.encode(), key=_SECRET,
                                               digest_size=32).digest()
    return key


def sim_sign_as(signer: str, info: RecordInfo) -> bytes:
    """`info` signed with `signer`'s stand-in key (a forgery unless signer is info's peer)."""
    body = pack_record_body(info)
    return body + hashlib.blake2b(body, key=_key(signer), digest_size=_SIG).digest()


def sim_sign(info: RecordInfo) -> bytes:
    return sim_sign_as(info.peer_id, info)


def sim_sign_claim_as(signer: str, body: bytes) -> bytes:
    """A claim signed with `signer`'s stand-in key."""
    return hashlib.blake2b(b"claim" + body, key=_key(signer), digest_size=_SIG).digest()


def sim_verify_claim(peer_id: str, body: bytes, signature: bytes) -> bool:
    return sim_sign_claim_as(peer_id, body) == signature


def sim_verify(peer_id: str, record: bytes) -> RecordInfo | None:
    """The signature must be peer_id's own (as a real node checks it against the public key
    its peer id holds)."""
    if len(record) <= _SIG:
        return None
    body, sig = record[:-_SIG], record[-_SIG:]
    if hashlib.blake2b(body, key=_key(peer_id), digest_size=_SIG).digest() != sig:
        return None
    info = unpack_record_body(body)
    return info if info is not None and info.peer_id == peer_id else None


# -- the simulation --------------------------------------------------------------------------
@dataclass
class FalsePositive:
    at: float
    observer: int
    member: int
    incarnation: int


class Simulation:
    """N Swim nodes exchanging messages over a simulated network. Nodes are numbered; every
    fault is a method that acts now (schedule it with `at`). Counters:
    - `converged()`: every live node sees every other live node alive;
    - `crashed_at` / `detected_at`: when each crashed node stopped, and when the last live node
      that had known it alive came to hold it dead (or forgot it);
    - `false_positives`: dead declarations (by any node) about a node whose process runs;
      `false_suspicions` the same for suspicions;
    - `bytes_sent[i]`: msgpack bytes node i sent (len(p2p.swim.encode(message)), what a real
      node counts in its swim_bytes_sent); `kind_bytes` / `kind_messages`: all nodes' bytes and
      messages per message kind (p2p.swim.KIND, as a node's swim_bytes_sent_<kind>), and
      `carried_bytes` the part of the bytes that updates and entries took."""

    def __init__(
        self, n: int, *, seed: int = 0, config: SwimConfig | None = None, loss: float = 0.0,
        delay: tuple[float, float] = (0.002, 0.03), duplicate: float = 0.0,
        start: str = "converged", bootstrap: int = 3, transport_feedback: bool = False,
    ) -> None:
        if start not in ("converged", "cold"):
            raise ValueError("start is 'converged' or 'cold'")
        self.config = config or SwimConfig()
        self.period = self.config.period
        self.rng = random.Random(seed)
        self.loss, self.delay, self.duplicate = loss, delay, duplicate
        self.transport_feedback = transport_feedback
        self.now = 0.0
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._count = itertools.count()
        self.nodes: list[Swim] = []
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.running: list[bool] = []
        self.leaving: list[bool] = []
        self._gen: list[int] = []
        self._first_incarnation: list[int] = []
        self._tick_at: list[float] = []
        self._ok: list[int] = []  # live nodes it sees alive
        self._member_ok: list[int] = []  # live nodes it sees alive or suspect
        self._group: list[int] = []
        self._partitioned = False
        self._slow: dict[int, tuple[float, float]] = {}
        self.live: set[int] = set()
        self.bytes_sent: list[int] = []
        self.messages_sent: list[int] = []
        self.messages_lost = 0
        self.kind_bytes: Counter[str] = Counter()
        self.kind_messages: Counter[str] = Counter()
        self.carried_bytes = 0
        self.false_positives: list[FalsePositive] = []
        self.false_suspicions = 0
        self.crashed_at: dict[int, float] = {}
        self.detected_at: dict[int, float] = {}
        self._pending_dead: dict[int, set[int]] = {}
        self.restart_seen: dict[int, set[int]] = {}
        self.left_seen: dict[int, set[int]] = {}
        self.events: Counter[str] = Counter()
        self.offences: Counter[str] = Counter()  # Offence outputs by reason (honest runs: none)
        self.bootstrap = list(range(min(bootstrap, n)))
        if start == "converged":
            for _ in range(n):
                self._add(self._spawn_index(), running=True)
            snapshot = ViewSnapshot(node.me for node in self.nodes)
            for i, node in enumerate(self.nodes):
                node.preload(snapshot, 0.0)
                self._ok[i] = self._member_ok[i] = n - 1
                self._schedule(i)
        else:
            for _ in range(n):
                self._add(self._spawn_index(), running=False)
            for i in range(n):
                self.at(self.rng.uniform(0, self.period), partial(self._cold_start, i))

    # -- nodes -----------------------------------------------------------------------------
    def _spawn_index(self) -> int:
        i = len(self.ids)
        pid = sim_peer_id(i)
        self.ids.append(pid)
        self.index[pid] = i
        self.running.append(False)
        self.leaving.append(False)
        self._gen.append(0)
        self._first_incarnation.append(0)
        self._tick_at.append(INF)
        self._ok.append(0)
        self._member_ok.append(0)
        self._group.append(-1)
        self.bytes_sent.append(0)
        self.messages_sent.append(0)
        self.nodes.append(self._make_node(i, 0))
        return i

    def _make_node(self, i: int, incarnation: int) -> Swim:
        pid = self.ids[i]
        return Swim(pid, sim_addrs(i, pid), sign_record=sim_sign, verify_record=sim_verify,
                    sign_claim=functools.partial(sim_sign_claim_as, pid),
                    verify_claim=sim_verify_claim, incarnation=incarnation,
                    boot=self.rng.getrandbits(63), config=self.config,
                    rng=random.Random(self.rng.getrandbits(64)), now=self.now)

    def _add(self, i: int, running: bool) -> None:
        if running:
            self.running[i] = True
            self.live.add(i)

    def _cold_start(self, i: int) -> None:
        node = self.nodes[i] = self._make_node(i, 0)
        self._go_live(i)
        seeds = [(self.ids[b], sim_addrs(b, self.ids[b])) for b in self.bootstrap if b != i]
        self._dispatch(i, node.join(seeds, self.now))
        self._schedule(i)

    def _go_live(self, i: int) -> None:
        self.running[i] = True
        self.leaving[i] = False
        self._gen[i] += 1
        self._tick_at[i] = INF
        self.live.add(i)
        pid = self.ids[i]
        for j in self.live:
            if j != i:
                m = self.nodes[j].get(pid)
                if m is not None:
                    self._ok[j] += m.state is ALIVE
                    self._member_ok[j] += m.state in _LIVE
        seen = [m.state for m in self.nodes[i].members()
                if self.index.get(m.peer_id, -1) in self.live]
        self._ok[i] = sum(1 for state in seen if state is ALIVE)
        self._member_ok[i] = sum(1 for state in seen if state in _LIVE)
        self._pending_dead.pop(i, None)

    def _leave_live(self, i: int) -> None:
        """i no longer counts as a live node (crashed or leaving)."""
        self.live.discard(i)
        pid = self.ids[i]
        for j in self.live:
            m = self.nodes[j].get(pid)
            if m is not None:
                self._ok[j] -= m.state is ALIVE
                self._member_ok[j] -= m.state in _LIVE
        for victim, pending in list(self._pending_dead.items()):
            pending.discard(i)
            if not pending and victim not in self.detected_at:
                self.detected_at[victim] = self.now

    def seeds_for(self, count: int = 3, exclude: Collection[int] = ()) -> list[
            tuple[str, tuple[str, ...]]]:
        candidates = [j for j in self.live if j not in exclude]
        picked = self.rng.sample(sorted(candidates), min(count, len(candidates)))
        return [(self.ids[j], sim_addrs(j, self.ids[j])) for j in picked]

    # -- faults and changes (each acts now) ------------------------------------------------
    def at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._count), CALL, -1, action))

    def add_node(self, seeds: int | Sequence[int] = 3) -> int:
        """A new node joins through `seeds` (that many random live nodes, or those nodes)."""
        i = self._spawn_index()
        self.nodes[i] = self._make_node(i, 0)
        joined = (self.seeds_for(seeds, exclude=(i,)) if isinstance(seeds, int)
                  else [(self.ids[j], sim_addrs(j, self.ids[j])) for j in seeds])
        self._go_live(i)
        self._dispatch(i, self.nodes[i].join(joined, self.now))
        self._schedule(i)
        return i

    def crash(self, i: int) -> None:
        """Node i's process stops: no more messages in or out, timers gone."""
        if not self.running[i]:
            return
        self.running[i] = False
        self._gen[i] += 1
        self._tick_at[i] = INF
        was_live = i in self.live
        self._leave_live(i)
        if not was_live:
            return
        self.crashed_at[i] = self.now
        self.detected_at.pop(i, None)
        pid = self.ids[i]
        pending = set()
        for j in self.live:
            m = self.nodes[j].get(pid)
            if m is not None and m.state in (ALIVE, SUSPECT):
                pending.add(j)
        self._pending_dead[i] = pending
        if not pending:
            self.detected_at[i] = self.now

    def restart(self, i: int, seeds: int = 3) -> None:
        """A new process for node i: same peer id, a new boot, the next incarnation its data
        directory would give it; it joins through `seeds` random live nodes."""
        self.crash(i)
        self._first_incarnation[i] += 1
        self.nodes[i] = self._make_node(i, self._first_incarnation[i])
        self._go_live(i)
        self.restart_seen[i] = set()
        self._dispatch(i, self.nodes[i].join(self.seeds_for(seeds, exclude=(i,)), self.now))
        self._schedule(i)

    def leave(self, i: int, linger: float | None = None) -> None:
        """Node i leaves for good; its process answers for `linger` seconds, then stops."""
        if i not in self.live:
            return
        self.leaving[i] = True
        self._leave_live(i)
        self.left_seen[i] = set()
        self._dispatch(i, self.nodes[i].leave(self.now))
        linger = 3 * self.period if linger is None else linger
        gen = self._gen[i]
        self.at(self.now + linger, lambda: self._stop_left(i, gen))

    def _stop_left(self, i: int, gen: int) -> None:
        if self._gen[i] == gen:
            self.running[i] = False
            self._gen[i] += 1
            self._tick_at[i] = INF

    def partition(self, groups: Sequence[Iterable[int]]) -> None:
        """Nodes in different groups cannot reach each other (nodes in no group reach all)."""
        self._group = [-1] * len(self.ids)
        for g, members in enumerate(groups):
            for i in members:
                self._group[i] = g
        self._partitioned = True

    def heal(self) -> None:
        self._partitioned = False

    def slow(self, i: int, extra: tuple[float, float]) -> None:
        """Node i handles every message it receives `extra` seconds late (its CPU is
        saturated); its timers still fire on time."""
        self._slow[i] = extra

    def unslow(self, i: int) -> None:
        self._slow.pop(i, None)

    # -- the event loop --------------------------------------------------------------------
    def run(self, until: float) -> None:
        heap, nodes, tick_at, gen = self._heap, self.nodes, self._tick_at, self._gen
        pop, push, count = heapq.heappop, heapq.heappush, self._count
        outs: list[Output]
        while heap and heap[0][0] <= until:
            t, _, kind, i, payload = pop(heap)
            self.now = t
            if kind == DELIVER:
                sender, message, g = payload
                if g != gen[i]:
                    continue
                outs = nodes[i].receive(sender, message, t)
            elif kind == TICK:
                if tick_at[i] != t or payload != gen[i]:
                    continue
                tick_at[i] = INF
                outs = nodes[i].tick(t)
            else:
                payload()
                continue
            if outs:
                self._dispatch(i, outs)
            w = nodes[i].next_wakeup()
            if w < tick_at[i]:
                if w < t:
                    w = t
                tick_at[i] = w
                push(heap, (w, next(count), TICK, i, gen[i]))
        if until > self.now:
            self.now = until

    def _schedule(self, i: int) -> None:
        w = max(self.nodes[i].next_wakeup(), self.now)
        if w < self._tick_at[i]:
            self._tick_at[i] = w
            heapq.heappush(self._heap, (w, next(self._count), TICK, i, self._gen[i]))

    def _dispatch(self, i: int, outs: list[Output]) -> None:
        for o in outs:
            if type(o) is Send:
                self._send(i, o)
            elif type(o) is Offence:
                self.offences[o.reason] += 1
            else:
                assert isinstance(o, Event)
                self._observe(i, o)

    def _send(self, i: int, o: Send) -> None:
        message = o.message
        size = wire_size(message)
        self.bytes_sent[i] += size
        self.messages_sent[i] += 1
        kind = KIND[type(message)]
        self.kind_bytes[kind] += size
        self.kind_messages[kind] += 1
        self.carried_bytes += carried_bytes(message)
        j = self.index.get(o.to)
        if j is None:
            return
        if not self.running[j]:
            if self.transport_feedback:
                gen = self._gen[i]
                self.at(self.now + self.delay[1], lambda: self._unreachable(i, gen, o.to))
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            self.messages_lost += 1
            return
        if self._partitioned:
            gi, gj = self._group[i], self._group[j]
            if gi >= 0 and gj >= 0 and gi != gj:
                self.messages_lost += 1
                return
        d0, d1 = self.delay
        copies = 2 if self.duplicate and rng.random() < self.duplicate else 1
        for _ in range(copies):
            t = self.now + d0 + (d1 - d0) * rng.random()
            slow = self._slow.get(j)
            if slow is not None:
                t += slow[0] + (slow[1] - slow[0]) * rng.random()
            heapq.heappush(self._heap, (t, next(self._count), DELIVER, j,
                                        (self.ids[i], message, self._gen[j])))

    def _unreachable(self, i: int, gen: int, to: str) -> None:
        if self._gen[i] == gen and self.running[i]:
            self._dispatch(i, self.nodes[i].unreachable(to, self.now))
            self._schedule(i)

    def _observe(self, i: int, ev: Event) -> None:
        cur, prev = ev.current, ev.previous
        self.events[f"{prev and prev.value}->{cur and cur.value}"] += 1
        if i not in self.live:
            return
        j = self.index.get(ev.peer_id)
        if j is None:
            return
        if j in self.live:
            self._ok[i] += (cur is ALIVE) - (prev is ALIVE)
            self._member_ok[i] += (cur in _LIVE) - (prev in _LIVE)
        process_runs = self.running[j] and not self.leaving[j] and (
            ev.member.boot == self.nodes[j].me.boot)
        if process_runs and cur is DEAD:
            self.false_positives.append(FalsePositive(self.now, i, j, ev.member.incarnation))
        if process_runs and cur is SUSPECT:
            self.false_suspicions += 1
        pending = self._pending_dead.get(j)
        if pending is not None and j not in self.detected_at:
            if cur is None or cur is DEAD or cur is LEFT:
                pending.discard(i)
                if not pending:
                    self.detected_at[j] = self.now
            else:
                pending.add(i)
        if ev.restarted and j in self.restart_seen:
            self.restart_seen[j].add(i)
        if (cur is LEFT or (cur is None and prev is LEFT)) and j in self.left_seen:
            self.left_seen[j].add(i)

    # -- what a run shows ------------------------------------------------------------------
    def converged(self, suspect_ok: bool = False) -> bool:
        """Every live node sees every other live node alive (or, with `suspect_ok`, at least
        as a member: alive or suspect, which is all sustained message loss lets one ask)."""
        want = len(self.live) - 1
        ok = self._member_ok if suspect_ok else self._ok
        return all(ok[i] == want for i in self.live)

    def run_until(self, condition: Callable[[], bool], timeout: float,
                  step: float | None = None) -> float | None:
        """Run in steps until `condition()` holds; the time it took, or None at `timeout`."""
        start = self.now
        step = self.period / 4 if step is None else step
        while not condition():
            if self.now - start >= timeout:
                return None
            self.run(self.now + step)
        return self.now - start

    def run_until_converged(self, timeout: float, step: float | None = None) -> float | None:
        return self.run_until(self.converged, timeout, step)

    def undetected(self) -> list[int]:
        return [i for i in self.crashed_at if i not in self.detected_at]

    def fp_members(self) -> set[tuple[int, int]]:
        """Distinct (member, incarnation) a node declared dead while its process ran."""
        return {(fp.member, fp.incarnation) for fp in self.false_positives}

    def view_of(self, i: int, j: int) -> str | None:
        m = self.nodes[i].get(self.ids[j])
        return None if m is None else m.state.value

    def total_bytes(self) -> int:
        return sum(self.bytes_sent)

    def stats(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for i in self.live:
            total.update(self.nodes[i].stats)
        return total


# -- scenarios shared by the benchmark and the tests -----------------------------------------
@dataclass
class NetworkFigures:
    """What `measure_network` saw in one run (periods are protocol periods)."""

    n: int
    joiners: int
    crashes: int
    converge_periods: float | None  # joiners in: until every live node sees every other alive
    detect_periods: list[float | None]  # per crash: until every live node holds it dead
    idle_bytes_per_node_per_period: float  # a converged network, nothing changing
    churn_bytes_per_node_per_period: float  # from the joins to the last crash's detection
    false_positives: int  # dead declarations about running nodes, by anyone
    periods: float  # simulated, in all

    @property
    def detect_mean(self) -> float | None:
        found = [d for d in self.detect_periods if d is not None]
        return sum(found) / len(found) if found and len(found) == len(self.detect_periods) \
            else None


def measure_network(n: int, *, joiners: int = 10, crashes: int = 5, seed: int = 1,
                    loss: float = 0.0, idle_periods: float = 20.0,
                    crash_spacing_periods: float = 2.0, timeout_periods: float = 200.0,
                    config: SwimConfig | None = None) -> NetworkFigures:
    """A converged network of n nodes: `idle_periods` with nothing happening; then `joiners`
    new nodes join at one moment, each through 3 random members of the original n (periods
    until every live node sees every other live node alive); then `crashes` random original
    members crash, `crash_spacing_periods` apart (per crash, periods until every live node
    holds it dead)."""
    sim = Simulation(n, seed=seed, loss=loss, config=config)
    period = sim.period
    sim.run(idle_periods * period)
    idle = sim.total_bytes() / (n * idle_periods)
    b0, t0 = sim.total_bytes(), sim.now
    original = list(range(n))
    for _ in range(joiners):
        sim.add_node(seeds=sim.rng.sample(original, min(3, n)))
    took = sim.run_until_converged(timeout_periods * period, step=period / 20)
    victims = sim.rng.sample(original, crashes)
    t1 = sim.now
    for k, v in enumerate(victims):
        sim.at(t1 + k * crash_spacing_periods * period, partial(sim.crash, v))
    sim.run(t1 + (crashes - 1) * crash_spacing_periods * period)
    sim.run_until(lambda: all(v in sim.detected_at for v in victims), timeout_periods * period)
    churn_periods = max(sim.now - t0, period) / period
    churn = (sim.total_bytes() - b0) / ((n + joiners) * churn_periods)
    detect = [None if v not in sim.detected_at else
              (sim.detected_at[v] - sim.crashed_at[v]) / period for v in victims]
    return NetworkFigures(n, joiners, crashes, None if took is None else took / period, detect,
                          idle, churn, len(sim.false_positives), sim.now / period)


@dataclass
class FalsePositiveFigures:
    n: int
    loss: float
    periods: float
    declared_dead: int  # distinct (member, incarnation) declared dead while its process ran
    per_hour: float
    false_suspicions: int  # suspect events about running nodes (each node's view counts)
    refutations: int


def measure_false_positives(n: int, loss: float, periods: float, *, seed: int = 3,
                            config: SwimConfig | None = None) -> FalsePositiveFigures:
    """A converged network of n nodes and nothing but message loss for `periods` periods."""
    sim = Simulation(n, seed=seed, loss=loss, config=config)
    sim.run(periods * sim.period)
    hours = periods * sim.period / 3600
    declared = len(sim.fp_members())
    return FalsePositiveFigures(n, loss, periods, declared, declared / hours,
                                sim.false_suspicions, sim.stats()["refutations"])


@dataclass
class IdleFigures:
    """What `measure_idle` saw: per node and second, over the measured window."""

    n: int
    seconds: float  # simulated, measured (after the warm-up)
    bytes_per_s: float
    kind_bytes_per_s: dict[str, float]  # by p2p.swim.KIND name (kinds sent at all)
    kind_messages_per_s: dict[str, float]
    carried_bytes_per_s: float  # of bytes_per_s: the updates and entries messages carried


def measure_idle(n: int, *, config: SwimConfig | None = None, seed: int = 1,
                 warmup: float | None = None, seconds: float | None = None) -> IdleFigures:
    """A converged network of n nodes with nothing changing: the membership traffic a node
    sends per second. The default warm-up lets every node's first periodic push-pull go out
    (its timer starts at a random point of the jittered interval) and the default window
    takes four sync intervals, so the push-pull counts at its steady rate."""
    sim = Simulation(n, seed=seed, config=config)
    cfg = sim.config
    warmup = 1.25 * cfg.sync_interval if warmup is None else warmup
    seconds = 4 * cfg.sync_interval if seconds is None else seconds
    sim.run(warmup)
    b0, k0, m0, c0 = (sim.total_bytes(), Counter(sim.kind_bytes), Counter(sim.kind_messages),
                      sim.carried_bytes)
    sim.run(warmup + seconds)
    per = n * seconds
    return IdleFigures(
        n, seconds, (sim.total_bytes() - b0) / per,
        {k: (v - k0[k]) / per for k, v in sorted(sim.kind_bytes.items()) if v > k0[k]},
        {k: (v - m0[k]) / per for k, v in sorted(sim.kind_messages.items()) if v > m0[k]},
        (sim.carried_bytes - c0) / per)
