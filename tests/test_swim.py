# The sans-IO SWIM membership (p2p/swim.py) and its simulation (p2p/swim_sim.py), issue 18.
# Laws: the entry and view merge is a join-semilattice, a node's view is the join of what it
# was told whatever the order, nothing unsigned is ever accepted. Units: one probe, a refutation,
# the suspicion timeout, push-pull sending only differences, the wire form, the events. Models
# (simulated networks): convergence through loss, delay and a healed partition, detection of
# crashes within O(log N) periods, no false positive below a third of messages lost, Lifeguard
# with a slow node, refutation, leave, restart; and runs that show the assertions can fail.
# Abuse: a member's ping-reqs are served within a budget, and the driver (p2p/swim_net.py,
# on a stub network) scores down what the core refuses.
from __future__ import annotations

import functools
import math
import random
from types import SimpleNamespace

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p.identity import Identity
from p2p.swim import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Ack,
    Event,
    Gossip,
    MalformedMessage,
    Member,
    MemberState,
    Message,
    Nack,
    Offence,
    Ping,
    PingReq,
    RecordInfo,
    Send,
    Swim,
    SwimConfig,
    Sync,
    SyncDigest,
    SyncEntries,
    SyncHashes,
    Update,
    ViewSnapshot,
    claim_body,
    decode,
    encode,
    from_wire,
    merge,
    merge_views,
    to_wire,
    wire_size,
)
from p2p.swim_net import RecordSigner, SwimLink
from p2p.swim_sim import (
    Simulation,
    sim_addrs,
    sim_peer_id,
    sim_sign,
    sim_sign_as,
    sim_sign_claim_as,
    sim_verify,
    sim_verify_claim,
)

PEERS = [sim_peer_id(i) for i in range(5)]
ADDRS = [(), ("/ip4/10.0.0.1/tcp/4001",), ("/ip4/10.0.0.2/tcp/4001", "/dns4/x.example/tcp/1")]


def entry(peer: str, inc: int = 0, state: MemberState = ALIVE, addrs: tuple[str, ...] = (),
          meta: bytes = b"", boot: int = 0) -> Member:
    record = sim_sign(RecordInfo(peer, inc, addrs, meta, boot, state is LEFT))
    return Member(peer, inc, state, addrs, meta, boot, record)


def full(m: Member) -> Update:
    return Update(m.peer_id, m.incarnation, m.state, m.record)


@st.composite
def entries(draw: st.DrawFn, peers: list[str] = PEERS) -> Member:
    return entry(draw(st.sampled_from(peers)), draw(st.integers(0, 3)),
                 draw(st.sampled_from(list(MemberState))), draw(st.sampled_from(ADDRS)),
                 draw(st.binary(max_size=4)), draw(st.integers(0, 2)))


views = st.lists(entries(), max_size=8).map(lambda ms: {m.peer_id: m for m in ms})


def node(i: int, config: SwimConfig | None = None, now: float = 0.0, **kw: object) -> Swim:
    pid = sim_peer_id(i)
    return Swim(pid, sim_addrs(i, pid), sign_record=sim_sign, verify_record=sim_verify,
                sign_claim=functools.partial(sim_sign_claim_as, pid),
                verify_claim=sim_verify_claim, config=config, rng=random.Random(i), now=now,
                **kw)


def network(n: int, config: SwimConfig | None = None) -> list[Swim]:
    """n nodes that all know each other (alive, incarnation 0)."""
    nodes = [node(i, config) for i in range(n)]
    snapshot = ViewSnapshot(x.me for x in nodes)
    for x in nodes:
        x.preload(snapshot, 0.0)
    return nodes


def sends(outs: list, kind: type | None = None) -> list[Send]:
    return [o for o in outs if isinstance(o, Send) and (kind is None or type(o.message) is kind)]


def events(outs: list) -> list[Event]:
    return [o for o in outs if isinstance(o, Event)]


# -- the merge is a join-semilattice ---------------------------------------------------------
@given(st.data())
def test_entry_merge_is_commutative_associative_idempotent(data: st.DataObject) -> None:
    peer = data.draw(st.sampled_from(PEERS))
    a, b, c = (data.draw(entries([peer])) for _ in range(3))
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == a
    assert merge(a, b) in (a, b)  # a join of two states is one of them (a total order)


@given(views, views, views)
def test_view_merge_is_commutative_associative_idempotent(a: dict, b: dict, c: dict) -> None:
    assert merge_views(a, b) == merge_views(b, a)
    assert merge_views(merge_views(a, b), c) == merge_views(a, merge_views(b, c))
    assert merge_views(a, a) == a
    assert merge_views(a, {}) == a


def test_merge_order() -> None:
    p = PEERS[0]
    assert merge(entry(p, 1), entry(p, 2, ALIVE)).incarnation == 2
    assert merge(entry(p, 3, ALIVE), entry(p, 2, DEAD)).state is ALIVE
    for low, high in ((ALIVE, SUSPECT), (SUSPECT, DEAD), (DEAD, LEFT)):
        assert merge(entry(p, 1, low), entry(p, 1, high)).state is high
    with pytest.raises(ValueError):
        merge(entry(PEERS[0]), entry(PEERS[1]))


@settings(max_examples=60, deadline=None)
@given(st.lists(entries(PEERS[1:]), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_a_view_is_the_join_of_what_it_heard_in_any_order(ups: list[Member],
                                                          rnd: random.Random) -> None:
    """Gossip carrying full entries, delivered in two orders, leaves the same view: the join
    of the starting view and every entry (nobody is learned of by a death, so every peer is
    known from the start)."""
    start = {p: entry(p) for p in PEERS[1:]}
    finals = []
    for order in (ups, rnd.sample(ups, len(ups))):
        x = node(0)
        x.receive(PEERS[1], Gossip(1, tuple(full(m) for m in start.values())), 0.0)
        for k, m in enumerate(order):
            x.receive(PEERS[1 + k % 4], Gossip(k + 2, (full(m),)), 0.0)
        finals.append({m.peer_id: m for m in x.members()})
    expected = merge_views(start, {})
    for m in ups:
        expected = merge_views(expected, {m.peer_id: m})
    assert finals[0] == finals[1] == expected


# -- nothing unsigned is accepted ------------------------------------------------------------
bad_records = st.one_of(
    st.binary(max_size=300),  # garbage
    st.builds(lambda inc, signer: sim_sign_as(sim_peer_id(signer),
                                              RecordInfo(PEERS[2], inc, (), b"", 0)),
              st.integers(0, 9), st.integers(10, 12)),  # signed by someone else
    st.builds(lambda inc: sim_sign(RecordInfo(PEERS[3], inc, (), b"", 0)),
              st.integers(0, 9)),  # another member's record under PEERS[2]'s name
)


@settings(max_examples=80, deadline=None)
@given(bad_records, st.integers(0, 9), st.sampled_from([ALIVE, SUSPECT, DEAD, LEFT]),
       st.sampled_from(["ping", "ack", "gossip", "sync"]))
def test_a_record_that_does_not_verify_is_never_accepted(record: bytes, inc: int,
                                                         state: MemberState, via: str) -> None:
    x, y = node(0), node(1)
    before = x.get(PEERS[2])
    u = Update(PEERS[2], inc, state, record)
    message: Message = {"ping": Ping(7, (u,)), "ack": Ack(7, (u,)), "gossip": Gossip(7, (u,)),
                        "sync": SyncEntries(7, (u,))}[via]
    outs = x.receive(y.peer_id, message, 1.0)
    assert x.get(PEERS[2]) == before is None
    assert not events(outs)
    assert x.stats["records_rejected"] == 1


def test_a_forged_higher_incarnation_is_ignored() -> None:
    x, victim, forger = node(0), node(2), node(3)
    x.receive(victim.peer_id, Gossip(1, (full(victim.me),)), 0.0)
    assert x.get(victim.peer_id).incarnation == 0
    forged = sim_sign_as(forger.peer_id, RecordInfo(victim.peer_id, 7, ("/ip4/6.6.6.6/tcp/1",),
                                                     b"", 0))
    for state in (ALIVE, SUSPECT, DEAD):
        x.receive(forger.peer_id, Gossip(2, (Update(victim.peer_id, 7, state, forged),)), 1.0)
        # claims without a record about an incarnation nobody has shown are ignored too
        x.receive(forger.peer_id, Gossip(3, (Update(victim.peer_id, 7, state),)), 1.0)
    m = x.get(victim.peer_id)
    assert (m.incarnation, m.state, m.addrs) == (0, ALIVE, victim.me.addrs)
    # ... and one about the node itself does not make it refute
    forged_me = sim_sign_as(forger.peer_id, RecordInfo(x.peer_id, 9, (), b"", 0))
    x.receive(forger.peer_id, Gossip(4, (Update(x.peer_id, 9, SUSPECT, forged_me),)), 2.0)
    assert x.incarnation == 0 and x.stats["refutations"] == 0
    # a left record must say so in what the member signed
    alive_record = sim_sign(RecordInfo(victim.peer_id, 1, (), b"", 0, left=False))
    x.receive(forger.peer_id, Gossip(5, (Update(victim.peer_id, 1, LEFT, alive_record),)), 3.0)
    assert x.get(victim.peer_id).state is ALIVE
    # and a genuine record counts for the incarnation it names only
    x.receive(forger.peer_id, Gossip(6, (Update(victim.peer_id, 9, ALIVE, alive_record),)), 3.0)
    assert x.get(victim.peer_id).incarnation == 0
    assert x.stats["records_rejected"] == 3 + 1 + 1 + 1


def test_nobody_is_learned_of_by_its_death() -> None:
    x = node(0)
    outs = x.receive(PEERS[1], Gossip(1, (full(entry(PEERS[2], 0, DEAD)),)), 0.0)
    outs += x.receive(PEERS[1], SyncEntries(1, (full(entry(PEERS[2], 3, LEFT)),)), 0.0)
    assert x.get(PEERS[2]) is None and not events(outs)


# -- units ------------------------------------------------------------------------------------
def deliver(to: Swim, outs: list, sender: Swim, now: float, kind: type) -> list:
    got = []
    for s in sends(outs, kind):
        if s.to == to.peer_id:
            got += to.receive(sender.peer_id, s.message, now)
    return got


def test_a_probe_pings_then_asks_others_then_suspects_and_the_suspect_refutes() -> None:
    a, b, c = network(3)
    t = a.next_wakeup()
    outs = a.tick(t)
    (ping,) = sends(outs, Ping)
    target = b if ping.to == b.peer_id else c
    helper = c if target is b else b
    # the ping is lost: at the probe timeout, a pings again and asks the helper
    t_out = a.next_wakeup()
    assert t_out == pytest.approx(t + a.config.probe_timeout)
    outs = a.tick(t_out)
    assert [s.to for s in sends(outs, Ping)] == [target.peer_id]
    (req,) = sends(outs, PingReq)
    assert req.to == helper.peer_id and req.message.target == target.peer_id
    # the helper pings the target (lost too) and, the target silent, nacks
    h_outs = helper.receive(a.peer_id, req.message, t_out + 0.01)
    assert [s.to for s in sends(h_outs, Ping)] == [target.peer_id]
    nack_at = t_out + 0.01 + helper.config.nack_fraction * helper.config.probe_timeout
    (nack,) = sends(helper.tick(nack_at), Nack)
    assert nack.to == a.peer_id and nack.message.seq == req.message.seq
    assert sends(helper.tick(nack_at - 0.01), Nack) == []  # not before
    a.receive(helper.peer_id, nack.message, nack_at + 0.01)
    # no ack by the end of the period: suspect (every nack came back: a's health is fine)
    outs = a.tick(t + a.config.period)
    (ev,) = events(outs)
    assert (ev.peer_id, ev.previous, ev.current) == (target.peer_id, ALIVE, SUSPECT)
    assert a.local_health == 0
    # a tells the suspect at once (and gossips it); the suspect refutes in its ack
    notice = [s for s in sends(outs, Ping) if s.to == target.peer_id]
    (claim,) = [u for u in notice[0].message.updates
                if u.peer_id == target.peer_id and u.state is SUSPECT]
    # signed by a, so that those it reaches through others count it as a's
    assert claim.origin == a.peer_id and claim.proof is not None
    assert sim_verify_claim(a.peer_id, claim_body(target.peer_id, 0, a.peer_id), claim.proof)
    assert not sim_verify_claim(helper.peer_id, claim_body(target.peer_id, 0, a.peer_id),
                                claim.proof)
    t_outs = target.receive(a.peer_id, notice[0].message, t + 1.1)
    assert target.incarnation == 1 and target.stats["refutations"] == 1
    back = events(deliver(a, t_outs, target, t + 1.12, Ack))
    assert [(e.previous, e.current, e.member.incarnation, e.restarted) for e in back] == [
        (SUSPECT, ALIVE, 1, False)]
    assert a.suspicion_deadline(target.peer_id) is None


def test_missed_nacks_raise_local_health_and_stretch_the_timeouts() -> None:
    a, b, c = network(3)
    t = a.next_wakeup()
    a.tick(t)
    a.tick(a.next_wakeup())  # the probe timeout: a retry and one ping_req, all lost
    a.tick(t + a.config.period)  # no ack, no nack: a's own links may be the problem
    assert a.local_health == 1
    t2 = a.next_wakeup()
    outs = a.tick(t2)
    while not sends(outs, Ping):
        t2 = a.next_wakeup()
        outs = a.tick(t2)
    assert a.next_wakeup() - t2 == pytest.approx(2 * a.config.probe_timeout)


def offences(outs: list) -> list[Offence]:
    return [o for o in outs if isinstance(o, Offence)]


def ping_req(helper: Swim, requester: Swim, seq: int, target: Swim, now: float) -> list:
    return helper.receive(requester.peer_id, PingReq(seq, target.peer_id), now)


def test_a_member_asking_for_indirect_probes_at_an_honest_rate_is_always_served() -> None:
    h, a, target = network(3)
    period = h.config.period
    for i in range(50):  # one ping-req a period, the most an honest member sends a helper
        outs = ping_req(h, a, 100 + i, target, i * period)
        assert [s.to for s in sends(outs, Ping)] == [target.peer_id] and not offences(outs)
        # and twice in one period now and then (a late request and the next one together)
        if i % 10 == 5:
            outs = ping_req(h, a, 1000 + i, target, i * period + 0.01)
            assert len(sends(outs, Ping)) == 1 and not offences(outs)
    assert h.stats["ping_reqs_refused"] == 0


def test_a_ping_req_flood_is_cut_to_the_budget_and_spares_other_requesters() -> None:
    h, flooder, honest, target = network(4)
    cfg = h.config
    t = 10.0
    # the honest member's request is under way (its ping to the target is out) ...
    (fwd,) = sends(ping_req(h, honest, 7, target, t), Ping)
    # ... when another member sends thousands at once (more than the forwards h keeps)
    pings, reported = 0, 0
    for i in range(3000):
        outs = ping_req(h, flooder, 10_000 + i, target, t + 0.001)
        pings += len(sends(outs, Ping))
        reported += sum(o.peer == flooder.peer_id and o.reason == "flood"
                        for o in offences(outs))
    burst = int(cfg.ping_req_burst)
    assert pings == burst  # served up to the burst, no further
    assert reported == 3000 - burst == h.stats["ping_reqs_refused"]
    # the honest member's forward is still there: the target's ack goes back to it
    acks = sends(deliver(target, [fwd], h, t + 0.01, Ping), Ack)
    back = sends(h.receive(target.peer_id, acks[0].message, t + 0.02), Ack)
    assert [(s.to, s.message.seq) for s in back] == [(honest.peer_id, 7)]
    # and its next requests are served while the flooder's are still refused
    outs = ping_req(h, honest, 8, target, t + 0.03)
    assert len(sends(outs, Ping)) == 1 and not offences(outs)
    outs = ping_req(h, flooder, 20_000, target, t + 0.03)
    assert sends(outs, Ping) == [] and offences(outs)


def test_the_ping_req_budget_refills_with_time() -> None:
    h, a, target = network(3)
    cfg = h.config
    t = 5.0

    def served(n: int, now: float) -> int:
        return sum(len(sends(ping_req(h, a, 500 + i, target, now), Ping)) for i in range(n))

    assert served(100, t) == int(cfg.ping_req_burst)
    assert served(10, t + 0.1) == 0
    # a period later, ping_req_rate more (the time already waited counts)
    assert served(10, t + cfg.period) == int(cfg.ping_req_rate)
    # and after a long quiet spell the full burst again, no more
    assert served(100, t + 100 * cfg.period) == int(cfg.ping_req_burst)


def test_only_live_members_get_their_ping_reqs_served() -> None:
    h, dead, target = network(3)
    stranger = node(7)
    # a sender h does not know: no ping for it (h reconciles with it instead)
    outs = ping_req(h, stranger, 1, target, 1.0)
    assert sends(outs, Ping) == [] and [s.to for s in sends(outs, Sync)] == [stranger.peer_id]
    # a member h holds dead
    h.receive(target.peer_id, Gossip(1, (Update(dead.peer_id, 0, DEAD),)), 1.0)
    assert h.get(dead.peer_id).state is DEAD
    assert sends(ping_req(h, dead, 2, target, 1.1), Ping) == []
    assert h.stats["ping_reqs_not_member"] == 2
    # a joiner's requests carry its alive record, which makes it a member first: served
    joiner = node(8)
    req = PingReq(3, target.peer_id, (full(joiner.me),))
    outs = h.receive(joiner.peer_id, req, 1.2)
    assert [s.to for s in sends(outs, Ping)] == [target.peer_id]
    # the budget is kept for live members only: forgotten when one dies
    assert set(h._ping_req_budget) == {joiner.peer_id}
    h.receive(target.peer_id, Gossip(2, (Update(joiner.peer_id, 0, DEAD),)), 1.3)
    assert h._ping_req_budget == {}


class _StubNet:
    """What SwimLink uses of a Network, recording the penalties it is asked for."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id.to_base58()
        self.addrs = ["/ip4/127.0.0.1/tcp/1"]
        self.incarnation = 1
        self.config = SimpleNamespace(network_id="unit-net")
        self.penalized: list[tuple[str, str]] = []

    def admits(self, peer: str) -> bool:
        return True

    def penalize(self, peer: str, reason: str) -> None:
        self.penalized.append((peer, reason))


def test_the_driver_scores_down_a_member_whose_ping_reqs_the_core_refuses() -> None:
    net = _StubNet(Identity.generate())
    link = SwimLink(net, SwimConfig(), emit=lambda events: None)  # type: ignore[arg-type]
    flooder = Identity.generate()
    fid = flooder.peer_id.to_base58()
    record = RecordSigner(flooder, "unit-net").sign(RecordInfo(fid, 0, (), b"", 0))
    joined = (Update(fid, 0, ALIVE, record),)  # its first request makes it a member
    for i in range(20):
        data = encode(PingReq(i, sim_peer_id(9), joined if i == 0 else ()))
        trio.run(link._on_request, fid, data)
    refused = 20 - int(link.core.config.ping_req_burst)
    assert net.penalized == [(fid, "flood")] * refused
    assert link.metrics["swim_offences"] == refused == link.core.stats["ping_reqs_refused"]


def test_suspicion_timeout_grows_with_log_n_and_shrinks_with_confirmations() -> None:
    cfg = SwimConfig()
    for n in (10, 100, 1000):
        x, *others = network(n)[:6]
        target = others[0].peer_id
        x.receive(others[1].peer_id, Gossip(1, (Update(target, 0, SUSPECT, None,
                                                       others[1].peer_id),)), 0.0)
        min_t = max(cfg.suspicion_floor, cfg.suspicion_alpha * math.log10(n))
        assert x.suspicion_deadline(target) == pytest.approx(cfg.suspicion_beta * min_t)
        for k, confirmer in enumerate(others[2:5], start=1):
            x.receive(confirmer.peer_id, Gossip(2, (Update(target, 0, SUSPECT, None,
                                                           confirmer.peer_id),)), 0.0)
            frac = math.log(k + 1) / math.log(cfg.suspicion_k + 1)
            want = max(min_t, cfg.suspicion_beta * min_t * (1 - frac) + min_t * frac)
            assert x.suspicion_deadline(target) == pytest.approx(want)
        assert x.suspicion_deadline(target) == pytest.approx(min_t)


def test_relayed_suspicions_count_only_with_their_origins_signature() -> None:
    # a member that relays suspicions naming other members as their origins (no proof, or
    # one it signed itself) adds no confirmation: the suspicion keeps its longest timeout;
    # relayed suspicions their origins did sign count as if they came from them
    cfg = SwimConfig()
    n = 10
    x, liar, target_node, *others = network(n)
    target = target_node.peer_id
    min_t = max(cfg.suspicion_floor, cfg.suspicion_alpha * math.log10(n))
    x.receive(liar.peer_id, Gossip(1, (Update(target, 0, SUSPECT, None, liar.peer_id),)), 0.0)
    assert x.suspicion_deadline(target) == pytest.approx(cfg.suspicion_beta * min_t)
    body = {o.peer_id: claim_body(target, 0, o.peer_id) for o in others}
    forged = [Update(target, 0, SUSPECT, None, o.peer_id) for o in others[:3]]
    forged += [Update(target, 0, SUSPECT, None, o.peer_id,
                      sim_sign_claim_as(liar.peer_id, body[o.peer_id])) for o in others[3:6]]
    forged += [Update(target, 0, SUSPECT, None, others[6].peer_id,  # signed, other claim
                      sim_sign_claim_as(others[6].peer_id, claim_body(target, 1,
                                                                      others[6].peer_id)))]
    x.receive(liar.peer_id, Gossip(2, tuple(forged)), 0.0)
    assert x.suspicion_deadline(target) == pytest.approx(cfg.suspicion_beta * min_t)
    assert x.stats["confirmations"] == 0 and x.stats["confirmations_unproven"] == 7
    signed = [Update(target, 0, SUSPECT, None, o.peer_id,
                     sim_sign_claim_as(o.peer_id, body[o.peer_id])) for o in others[:3]]
    x.receive(liar.peer_id, Gossip(3, tuple(signed)), 0.0)
    assert x.stats["confirmations"] == 3
    assert x.suspicion_deadline(target) == pytest.approx(min_t)


def _relayed_suspicions(x: Swim, target: str, start: float) -> list[Update]:
    """The suspicions of `target` that `x` passes on (pushed, gossiped or piggybacked) over
    its next few gossip intervals."""
    out: list[Update] = []
    for step in range(40):
        for send in sends(x.tick(start + 0.05 * step)):
            out += [u for u in getattr(send.message, "updates", ())
                    if u.peer_id == target and u.state is SUSPECT]
    return out


@pytest.mark.parametrize("case", ["first-hand", "first-hand-confirming", "newer-incarnation",
                                  "origin-left-out"])
def test_a_suspicion_is_relayed_only_with_a_proof_that_verified_here(case: str) -> None:
    # whatever a member sends, what an honest node passes on carries no proof that fails
    # at the next member (which would take it for the relaying node's forgery) and names
    # its origin (one left out would name the relaying node as the origin to the next)
    x, liar, target_node, other, *_ = network(8)
    target, lid = target_node.peer_id, liar.peer_id
    inc = 1 if case == "newer-incarnation" else 0
    origin = other.peer_id if case == "newer-incarnation" else lid
    forged = sim_sign_claim_as(lid, claim_body(target, inc + 1, origin))  # another claim
    if case == "first-hand-confirming":  # already suspected: the liar's word confirms it
        x.receive(other.peer_id, Gossip(1, (Update(target, 0, SUSPECT, None, other.peer_id,
                                                   sim_sign_claim_as(other.peer_id, claim_body(
                                                       target, 0, other.peer_id))),)), 0.0)
    record = entry(target, inc).record if case == "newer-incarnation" else None
    sent = Update(target, inc, SUSPECT, record, None if case == "origin-left-out" else origin,
                  None if case == "origin-left-out" else forged)
    x.receive(lid, Gossip(2, (sent,)), 0.1)
    relayed = _relayed_suspicions(x, target, 0.1)
    if case == "first-hand-confirming":  # (the first suspicion, relayed as well)
        relayed = [u for u in relayed if u.origin != other.peer_id]
    assert relayed, "x passes the suspicion on"
    for u in relayed:
        assert u.origin == origin, u
        assert u.proof is None or sim_verify_claim(origin, claim_body(target, u.incarnation,
                                                                      origin), u.proof), u


@pytest.mark.parametrize("case", ["first-hand", "relayed", "confirming", "with-a-record"])
def test_a_signed_suspicion_is_relayed_with_its_proof_and_counts_further_on(case: str) -> None:
    # the other side of the test above: a proof that verified is passed on, so a node two
    # hops from the origin counts the origin's confirmation (Lifeguard's timeout shrinks as
    # fast across relays as first-hand)
    x, origin_node, target_node, first, y, *_ = network(8)
    target, oid = target_node.peer_id, origin_node.peer_id
    proof = sim_sign_claim_as(oid, claim_body(target, 0, oid))
    if case in ("confirming", "with-a-record"):  # x already suspects target, on first's word
        x.receive(first.peer_id, Gossip(1, (Update(target, 0, SUSPECT, None, first.peer_id),)),
                  0.0)
    record = entry(target, 0).record if case == "with-a-record" else None
    sender = oid if case == "first-hand" else first.peer_id
    x.receive(sender, Gossip(2, (Update(target, 0, SUSPECT, record, oid, proof),)), 0.1)
    relayed = [u for u in _relayed_suspicions(x, target, 0.1) if u.origin == oid]
    assert relayed and all(u.proof == proof for u in relayed), relayed
    before = y.stats["confirmations"]
    y.receive(first.peer_id, Gossip(3, (Update(target, 0, SUSPECT, None, first.peer_id),)), 0.2)
    y.receive(x.peer_id, Gossip(4, (relayed[0],)), 0.3)
    assert y.stats["confirmations"] == before + 1  # the origin's, proven two hops on


def test_real_claim_signatures_are_bound_to_the_signer_and_the_network() -> None:
    a, b = Identity.generate(), Identity.generate()
    aid, bid = a.peer_id.to_base58(), b.peer_id.to_base58()
    signer = RecordSigner(a, "net-one")
    body = claim_body(bid, 3, aid)
    proof = signer.sign_claim(body)
    assert RecordSigner(b, "net-one").verify_claim(aid, body, proof)
    assert not RecordSigner(b, "net-one").verify_claim(bid, body, proof)  # not b's
    assert not RecordSigner(b, "net-two").verify_claim(aid, body, proof)  # other network
    assert not RecordSigner(b, "net-one").verify_claim(aid, claim_body(bid, 4, aid), proof)
    refusing = RecordSigner(b, "net-one", admits=lambda peer: peer != aid)
    assert not refusing.verify_claim(aid, body, proof)  # not admitted: not counted


def test_push_pull_sends_a_root_then_only_what_differs() -> None:
    n = 2000
    a, b = network(n)[:2]
    first = sends(a.join([(b.peer_id, ())], 1.0))[0].message
    (same,) = sends(b.receive(a.peer_id, first, 1.0))
    assert same.message == SyncHashes(first.seq, b"")  # equal roots: two small messages, done
    assert wire_size(same.message) < 8
    # b learns three things: a refutation, a new member, a suspicion
    refuted = entry(sim_peer_id(5), 1)
    newcomer = entry(sim_peer_id(n + 1))
    b.receive(PEERS[3], Gossip(1, (full(refuted), full(newcomer),
                                   Update(sim_peer_id(6), 0, SUSPECT, None, PEERS[3]))), 1.5)
    (sync,) = sends(a.join([(b.peer_id, ())], 2.0))
    assert wire_size(sync.message) < 24
    (hashes,) = sends(b.receive(a.peer_id, sync.message, 2.0))
    assert isinstance(hashes.message, SyncHashes) and len(hashes.message.hashes) == 8 * 64
    (digest,) = sends(a.receive(b.peer_id, hashes.message, 2.0))
    assert isinstance(digest.message, SyncDigest) and len(digest.message.differ) <= 3
    assert len(digest.message.digest) < 3 * 3 * n / 64  # members of 3 buckets, not n
    (ents,) = sends(b.receive(a.peer_id, digest.message, 2.0))
    assert isinstance(ents.message, SyncEntries)
    assert {(u.peer_id, u.incarnation, u.state) for u in ents.message.entries} == {
        (refuted.peer_id, 1, ALIVE), (newcomer.peer_id, 0, ALIVE), (sim_peer_id(6), 0, SUSPECT)}
    assert ents.message.want == ()
    outs = a.receive(b.peer_id, ents.message, 2.0)
    assert {(e.peer_id, e.current) for e in events(outs)} == {
        (refuted.peer_id, ALIVE), (newcomer.peer_id, ALIVE), (sim_peer_id(6), SUSPECT)}
    assert a._root == b._root
    # a node that knows nobody gets the whole view (and gives its own entry)
    z = node(n + 7)
    (sync,) = sends(z.join([(b.peer_id, ())], 3.0))
    (hashes,) = sends(b.receive(z.peer_id, sync.message, 3.0))
    (digest,) = sends(z.receive(b.peer_id, hashes.message, 3.0))
    got = sends(b.receive(z.peer_id, digest.message, 3.0))
    assert sum(len(s.message.entries) for s in got) == n + 1  # b's view and b itself
    assert got[0].message.want == (z.peer_id,)
    (mine,) = sends(z.receive(b.peer_id, got[0].message, 3.0))
    for s in got[1:]:
        z.receive(b.peer_id, s.message, 3.0)
    assert [u.peer_id for u in mine.message.entries] == [z.peer_id]
    assert z.size() == n + 2


def test_events_are_shaped_like_member_events() -> None:
    x = node(0, SwimConfig(forget_after=60.0))
    p = PEERS[1]
    seen: list[tuple] = []

    def feed(outs: list) -> None:
        seen.extend((e.previous, e.current, e.restarted, e.member.left) for e in events(outs))

    feed(x.receive(p, Gossip(1, (full(entry(p, 0, boot=1)),)), 0.0))  # joined
    feed(x.receive(PEERS[2], Gossip(2, (Update(p, 0, SUSPECT, None, PEERS[2]),)), 1.0))
    feed(x.receive(PEERS[2], Gossip(3, (Update(p, 0, DEAD),)), 2.0))
    feed(x.receive(p, Gossip(4, (full(entry(p, 1, boot=2)),)), 3.0))  # a new process
    feed(x.receive(p, Gossip(5, (full(entry(p, 2, LEFT, boot=2)),)), 4.0))
    feed(x.tick(4.0 + 60.0))
    assert seen == [(None, ALIVE, False, False), (ALIVE, SUSPECT, False, False),
                    (SUSPECT, DEAD, False, False), (DEAD, ALIVE, True, False),
                    (ALIVE, LEFT, False, True), (LEFT, None, False, True)]
    assert x.get(p) is None and x.members() == [] and x.alive_ids() == set()


def test_leave_announces_a_signed_left_record() -> None:
    a, b, c = network(3)
    outs = a.leave(5.0)
    assert a.me.state is LEFT and a.incarnation == 1 and a.next_wakeup() == math.inf
    pinged = sends(outs, Ping)
    assert {s.to for s in pinged} == {b.peer_id, c.peer_id}
    (ev,) = events(b.receive(a.peer_id, pinged[0].message, 5.1))
    assert (ev.current, ev.member.left) == (LEFT, True)


def test_new_meta_is_a_new_incarnation_that_spreads() -> None:
    a, b, c = network(3)
    outs = a.update_local(1.0, meta=b"stake=5")
    assert a.incarnation == 1 and a.me.meta == b"stake=5"
    pushed = sends(outs, Gossip)
    assert {s.to for s in pushed} == {b.peer_id, c.peer_id}
    (ev,) = events(b.receive(a.peer_id, pushed[0].message, 1.1))
    assert (ev.previous, ev.current, ev.restarted, ev.member.meta) == (ALIVE, ALIVE, False,
                                                                       b"stake=5")
    with pytest.raises(ValueError):
        a.update_local(2.0, meta=bytes(1025))


def test_gossip_is_bounded_per_message_and_retransmitted_log_n_times() -> None:
    x, *others = network(50)
    news = [entry(o.peer_id, 1) for o in others[:20]]
    outs = x.receive(others[30].peer_id, Gossip(1, tuple(full(m) for m in news)), 0.0)
    assert {type(s.message) for s in sends(outs)} == {Gossip}  # news is pushed at once
    limit = x.config.retransmit_mult * math.ceil(math.log10(50 + 1))
    for k in range(200):  # then pushed again a few times, then piggybacked on acks
        t = x.next_wakeup()
        outs += x.tick(t) if t < 1.0 else []
        outs += x.receive(others[40].peer_id, Ping(k, ()), 1.0 + k)
    carried = [u for s in sends(outs) for u in s.message.updates]
    for s in sends(outs):
        ups = s.message.updates
        assert len(ups) <= x.config.max_updates
        assert sum(u.size() for u in ups) <= x.config.max_update_bytes
    assert sum(1 for u in carried if u.incarnation == 1) == 20 * limit
    assert x.pending_updates() == 0


# -- the wire form ----------------------------------------------------------------------------
updates = st.builds(
    lambda m, claim, origin, proof: Update(
        m.peer_id, m.incarnation, m.state,
        None if claim and m.state in (SUSPECT, DEAD) else m.record, origin,
        proof if origin is not None and m.state is SUSPECT else None),
    entries(), st.booleans(), st.one_of(st.none(), st.sampled_from(PEERS)),
    st.one_of(st.none(), st.binary(min_size=64, max_size=64)))
ups = st.lists(updates, max_size=8).map(tuple)
seqs = st.integers(0, 2**40)
messages = st.one_of(
    st.builds(Ping, seqs, ups), st.builds(Ack, seqs, ups), st.builds(Nack, seqs),
    st.builds(PingReq, seqs, st.sampled_from(PEERS), ups), st.builds(Gossip, seqs, ups),
    st.builds(Sync, seqs, st.integers(0, 2**64 - 1)),
    st.builds(SyncHashes, seqs, st.sampled_from([1, 2, 64, 256]).flatmap(
        lambda n: st.binary(min_size=8 * n, max_size=8 * n))),
    st.builds(lambda seq: SyncDigest(seq, 4, (0, 3), ((PEERS[0], 2, 1, 77),)), seqs),
    st.builds(SyncEntries, seqs, st.lists(entries().map(full), max_size=4).map(tuple),
              st.lists(st.sampled_from(PEERS), max_size=3).map(tuple)),
)


@given(messages)
def test_messages_round_trip_through_msgpack(message: Message) -> None:
    data = encode(message)
    assert msgpack.packb(to_wire(message)) == data and wire_size(message) == len(data)
    assert decode(data) == message


@pytest.mark.parametrize("obj", [
    [99, 1], [0, -1, []], "ping", [0, 1], [0, 1, [[PEERS[0], 0, 0, None, None]]],
    [0, 1, [[PEERS[0], 0, 9, b"r", None]]], [5, 1, b"\0" * 24], [3, 1, "", []],
    [6, 1, 3, [], []], [7, 1, [[PEERS[0], 0, 1, None, None]], []],
    [0, 1, [[PEERS[0], 0, 0, b"r", None]] * 65],
    [0, 1, [[PEERS[0], 0, 1, None, PEERS[1], "not bytes"]]],  # a proof is bytes ...
    [0, 1, [[PEERS[0], 0, 1, None, PEERS[1], b"\0" * 129]]],  # ... of at most 128
    [0, 1, [[PEERS[0], 0, 1, None, PEERS[1], b"s"] + [None] * 5]],  # 11 fields
    [0, 1, [[PEERS[0], 0, 1, None, PEERS[1], b"s", [1, 2]]]],  # a later field: a scalar ...
    [0, 1, [[PEERS[0], 0, 1, None, PEERS[1], b"s", b"x" * 257]]],  # ... or 256 bytes at most
])
def test_malformed_messages_are_refused(obj: object) -> None:
    with pytest.raises(MalformedMessage):
        from_wire(obj)


def test_an_update_s_fields_after_the_proof_are_a_later_release_s_and_ignored() -> None:
    # a later release may add fields to an update: this one takes the fields it knows, and
    # passes on (encodes) only those, instead of refusing the message and its sender
    proof = b"p" * 64
    for extra in ([1], [b"x" * 256, "k", 2.5, True], [None] * 4):
        msg = from_wire([0, 1, [[PEERS[0], 0, 1, None, PEERS[1], proof, *extra]]])
        assert isinstance(msg, Ping)
        assert msg.updates == (Update(PEERS[0], 0, SUSPECT, None, PEERS[1], proof),)
        assert decode(encode(msg)) == msg and len(to_wire(msg)[2][0]) == 6


# -- simulated networks ----------------------------------------------------------------------
def detect_bound(n: int) -> float:
    """O(log N) periods: what detection may take at most in these runs."""
    return 3 * math.log2(n)


def test_a_thousand_nodes_converge_through_loss_delay_and_a_healed_partition() -> None:
    n, cut = 1000, 30
    sim = Simulation(n, seed=11, loss=0.3, delay=(0.005, 0.1), duplicate=0.02)
    sim.run(3)
    sim.partition([range(cut), range(cut, n)])
    sim.run(23)
    held_dead = sum(1 for i in range(cut, n, 10) for j in range(cut) if sim.view_of(i, j) == "dead")
    assert held_dead > 0  # the sides took each other for dead ...
    sim.heal()
    # ... and after the partition heals, every node holds every other as a member again
    # (alive or suspect: with 30% of messages lost some suspicion is always in flight)
    assert sim.run_until(lambda: sim.converged(suspect_ok=True), 30) is not None
    assert all(sim.view_of(i, j) in ("alive", "suspect") for i in range(0, n, 25)
               for j in range(n) if i != j)
    # crashes under 10% loss (once the nodes' loss estimates settled): every live node
    # holds each dead within O(log N) periods
    sim.loss = 0.1
    sim.run(sim.now + 20)
    victims = [100, 500, 900]
    for v in victims:
        sim.crash(v)
    sim.run_until(lambda: all(v in sim.detected_at for v in victims), 2 * detect_bound(n))
    for v in victims:
        assert sim.detected_at[v] - sim.crashed_at[v] <= detect_bound(n)
    assert sim.offences == {}  # honest nodes stay within the ping-req budget (delay, copies)


@pytest.mark.parametrize("n", [100, 1000])
def test_joins_and_crashes_converge_and_are_detected_in_o_log_n(n: int) -> None:
    sim = Simulation(n, seed=4, loss=0.05, delay=(0.005, 0.05))
    sim.run(5)
    for _ in range(10):
        sim.add_node(seeds=sim.rng.sample(range(n), 3))
    assert sim.run_until_converged(10) is not None
    victims = sim.rng.sample(range(n), 3)
    for v in victims:
        sim.crash(v)
    sim.run_until(lambda: all(v in sim.detected_at for v in victims), 2 * detect_bound(n))
    assert max(sim.detected_at[v] - sim.crashed_at[v] for v in victims) <= detect_bound(n)
    assert sim.false_positives == []


def test_no_live_node_is_declared_dead_below_a_third_of_messages_lost() -> None:
    sim = Simulation(1000, seed=3, loss=0.3, delay=(0.005, 0.05))
    sim.run(200)
    assert sim.false_positives == []
    stats = sim.stats()
    assert stats["suspicions"] > 0 and stats["refutations"] > 0  # there was something to refute


def test_without_refutation_live_nodes_are_declared_dead() -> None:
    """What the assertion above would catch: the same kind of run with refutation off."""
    runs = {}
    for refute in (True, False):
        sim = Simulation(200, seed=3, loss=0.2, config=SwimConfig(refute=refute))
        sim.run(150)
        runs[refute] = sim
    assert runs[True].false_positives == []
    assert len(runs[False].fp_members()) > 0
    assert runs[False].stats()["suspected_not_refuted"] > 0


def test_a_slow_node_does_not_get_healthy_nodes_declared_dead() -> None:
    """Lifeguard: a node that handles its messages 1-3 s late misses acks and nacks; its local
    health multiplier stretches its timeouts, so it hardly accuses anyone. Without it (lhm_max
    0) it accuses many; either way, the refutations keep everyone alive."""
    suspicions = {}
    for lhm_max in (8, 0):
        sim = Simulation(200, seed=5, config=SwimConfig(lhm_max=lhm_max))
        sim.run(3)
        sim.slow(7, (1.0, 3.0))
        sim.run(150)
        assert sim.false_positives == [], lhm_max
        assert sim.offences == {}, lhm_max  # bunched up by the slow node, still in budget
        suspicions[lhm_max] = sim.nodes[7].stats["suspicions"]
        if lhm_max:
            assert sim.nodes[7].local_health > 0
    assert suspicions[0] >= 10 * max(1, suspicions[8])


def test_a_suspected_node_that_is_alive_refutes_and_stays_alive() -> None:
    sim = Simulation(300, seed=6, loss=0.02)
    sim.run(3)
    x = 42
    sim.partition([[x], [i for i in range(300) if i != x]])  # cut off for 4 periods
    sim.run(7)
    suspecting = [i for i in range(300) if sim.view_of(i, x) == "suspect"]
    assert suspecting
    sim.heal()
    assert sim.run_until_converged(10) is not None
    assert sim.nodes[x].incarnation > 0 and sim.nodes[x].stats["refutations"] > 0
    assert sim.false_positives == []
    assert all(sim.nodes[i].get(sim.ids[x]).incarnation == sim.nodes[x].incarnation
               for i in suspecting)


def test_a_leave_is_seen_by_all() -> None:
    sim = Simulation(300, seed=7, loss=0.05)
    sim.run(3)
    sim.leave(12)
    assert sim.run_until(lambda: len(sim.left_seen[12]) == len(sim.live), 5) is not None
    sim.run(sim.now + 10)
    assert sim.false_positives == [] and all(sim.view_of(i, 12) == "left" for i in sim.live)


def test_a_restarted_node_is_seen_as_restarted() -> None:
    sim = Simulation(300, seed=8, loss=0.05)
    sim.run(3)
    sim.restart(5)  # before anyone noticed it stopped
    sim.crash(9)  # and after everyone held it dead
    sim.run_until(lambda: 9 in sim.detected_at, 40)
    sim.restart(9)
    everyone = set(sim.live)
    assert sim.run_until(lambda: sim.restart_seen[5] >= everyone - {5, 9}  # 9 was down then
                         and sim.restart_seen[9] == everyone - {9}, 5) is not None
    assert sim.run_until_converged(5) is not None
    assert sim.false_positives == []


def test_a_node_restarted_below_its_incarnation_catches_up() -> None:
    """Refutations raise a node's incarnation past the counter its data directory keeps: the
    restarted process hears of its old record and refutes it."""
    sim = Simulation(300, seed=6, loss=0.02)
    sim.run(3)
    x = 42
    for _ in range(3):
        sim.partition([[x], [i for i in range(300) if i != x]])
        sim.run(sim.now + 4)
        sim.heal()
        assert sim.run_until_converged(10) is not None
    before = sim.nodes[x].incarnation
    sim.restart(x)
    assert sim.nodes[x].incarnation < before
    everyone = set(sim.live)
    assert sim.run_until(lambda: sim.restart_seen[x] == everyone - {x}, 5) is not None
    assert sim.nodes[x].incarnation > before and sim.false_positives == []


def test_a_cold_start_converges() -> None:
    sim = Simulation(200, seed=9, start="cold", loss=0.05)
    assert sim.run_until_converged(30) is not None


def test_a_run_is_reproducible() -> None:
    def run() -> tuple:
        sim = Simulation(100, seed=12, loss=0.1, duplicate=0.05)
        sim.run(5)
        sim.crash(3)
        sim.run(40)
        return sim.total_bytes(), sim.detected_at, sim.events, sim.nodes[0].incarnation

    assert run() == run()
