# Admission and write authority: a network that declares who may hold data keeps everyone
# else out of its membership view, its ring, its store's protocols and its pubsub mesh, even
# when twenty strangers with their own keys connect at once; ring members write only keys
# they (or the receiver) replicate, and hints only for ring members. The rule's pure parts
# (validation, the gate, the testnet table) are tested first.
from __future__ import annotations

import time
from contextlib import AsyncExitStack
from pathlib import Path

import msgpack
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from kv import KV, NotAdmitted
from kv.replication import APPLY_PROTOCOL, seal_batch
from p2p import Network, RemoteError
from p2p.admission import Admission, AdmissionError, AdmissionRule
from p2p.identity import Identity, load_or_create_identity
from p2p.network import parse_multiaddr
from tasknet_node import testnets
from tasknet_node.admission_check import keep_stake_admission

from kv_helpers import FAST_NET, start_kv_node, wait_for_ring
from p2p_helpers import node_config, wait_for

PEER_A = str(Identity.generate().peer_id)
PEER_B = str(Identity.generate().peer_id)


# -- the rule and the gate (pure) ------------------------------------------------------------
@pytest.mark.parametrize("fields, complaint", [
    ({"kind": "closed"}, "must be one of"),
    ({"kind": "allowlist"}, "at least one peer id"),
    ({"kind": "allowlist", "peers": frozenset({"not-a-peer-id"})}, "not a peer id"),
    ({"kind": "stake", "task": "t"}, "min_stake"),
    ({"kind": "stake", "min_stake": 10}, "needs the task"),
    ({"kind": "open", "gossip": "some"}, "gossip policy"),
])
def test_an_invalid_rule_is_refused_with_its_reason(fields, complaint):
    with pytest.raises(AdmissionError, match=complaint):
        AdmissionRule(**fields)


def test_the_gate_admits_by_rule():
    assert Admission(AdmissionRule(), PEER_A).admits(PEER_B)
    allow = Admission(AdmissionRule("allowlist", frozenset({PEER_A})), PEER_A)
    assert allow.admits(PEER_A) and allow.admits_self() and not allow.admits(PEER_B)
    assert AdmissionRule("allowlist", frozenset({PEER_A})).gossip == "members"
    assert AdmissionRule().gossip == "all"


def test_the_stake_gate_follows_readings_and_forgives_one_period_of_lag():
    gate = Admission(AdmissionRule("stake", min_stake=5, task="t1"), PEER_A)
    assert not gate.settled and not gate.admits(PEER_A)  # nothing read yet: nobody
    assert gate.set_staked({PEER_A})
    assert gate.settled and gate.admits(PEER_A) and not gate.admits(PEER_B)
    assert gate.set_staked({PEER_B})  # A's stake went: still admitted for one reading
    assert gate.admits(PEER_A) and gate.admits(PEER_B)
    assert gate.set_staked({PEER_B})  # the same reading again: A's grace is over, a change
    assert not gate.admits(PEER_A) and gate.admits(PEER_B)
    assert not gate.set_staked({PEER_B})  # nothing changed


def test_a_testnet_file_declares_its_admission_rule(tmp_path):
    source = tmp_path / "t.toml"
    testnet = testnets.parse_testnet("t", {"network_id": "n", "admission": {
        "rule": "allowlist", "peers": [PEER_A, PEER_B]}}, source)
    assert testnet.admission.kind == "allowlist"
    assert testnet.admission.peers == {PEER_A, PEER_B}
    assert testnets.parse_testnet("t", {"network_id": "n"}, source).admission.kind == "open"
    with pytest.raises(testnets.TestnetError, match="unknown admission keys"):
        testnets.parse_testnet("t", {"network_id": "n", "admission": {"rule": "open", "x": 1}},
                               source)
    with pytest.raises(testnets.TestnetError, match="min_stake"):
        testnets.parse_testnet(
            "t", {"network_id": "n", "admission": {"rule": "stake", "task": "t"}}, source)


# -- twenty strangers against an allowlisted network ------------------------------------------
STRANGERS = 20
TOPIC = "news"


def _identities(base: Path, count: int) -> list[str]:
    """Create node keys in data dirs before the nodes start, to know their peer ids."""
    return [str(load_or_create_identity(base / f"member{i}").peer_id) for i in range(count)]


async def _start_strangers(stack: AsyncExitStack, base: Path,
                           count: int) -> tuple[list[Network], list[trio.Event]]:
    """`count` nodes of their own keys (open rule, knowing no peer), each run in a task of
    its own until its event is set (on leaving `stack` at the latest): one may stop while
    the others run (its network is then gone from `_STOPPED`)."""
    running: dict[int, Network] = {}
    stop = [trio.Event() for _ in range(count)]

    async def run_stranger(i: int) -> None:
        async with Network.start(node_config(base / f"stranger{i}")) as stranger:
            running[i] = stranger
            await stop[i].wait()
        _STOPPED.add(stranger.peer_id)

    nursery = await stack.enter_async_context(trio.open_nursery())
    for event in stop:  # (unwound first) every stranger stops, even on failure
        stack.callback(event.set)
    for i in range(count):
        nursery.start_soon(run_stranger, i)
    await wait_for(lambda: len(running) == count, 10, f"{count} strangers to start")
    return [running[i] for i in range(count)], stop


async def _knock(stranger: Network, victim: Network) -> None:
    """`stranger` connects to `victim` (which may close the connection at once)."""
    info = info_from_p2p_addr(parse_multiaddr(victim.addrs[0]))
    with trio.move_on_after(2):  # py-libp2p's connect has no deadline of its own
        try:
            await stranger.host.connect(info)
        except Exception:  # the victim may close it while the stranger sets it up
            pass


_STOPPED: set[str] = set()  # strangers of _start_strangers that stopped


def _metric(net: Network, name: str) -> int:
    value: int = net.status()["metrics"].get(name, 0)
    return value


async def _attempts(stranger: Network, victim: KV, key: bytes) -> dict[str, str]:
    """Every store protocol a stranger could use to write, read or compare; the error code
    each answered (or "served")."""
    delta = msgpack.packb([1, 1, 2**40, 0, "x", False, msgpack.packb("stolen")])
    tries = {
        "kv-apply": seal_batch(stranger, [[key, delta, None]], time.time_ns() // 1000),
        "kv-ops": {"groups": [{"ops": [["put", key, ["stolen"]]], "c": "one"}]},
        "kv-read": {"keys": [key]},
        "kv-ae": {"sid": 1, "m": [0]},
        "kv-roots": {"p": [0]},
    }
    codes = {}
    for protocol, message in tries.items():
        try:
            await stranger.request(victim.me, protocol, message, timeout=5)
            codes[protocol] = "served"
        except RemoteError as exc:
            codes[protocol] = exc.code
    return codes


def _mesh(net: Network) -> set[str]:
    assert net._pubsub is not None
    mesh = net._pubsub.router.mesh.get(f"/tasknet/{net.config.network_id}/{TOPIC}", set())
    return {str(peer) for peer in mesh}


async def test_twenty_unadmitted_peers_change_no_ring_get_no_data_and_crowd_no_mesh(tmp_path):
    members = _identities(tmp_path, 3)
    rule = AdmissionRule("allowlist", frozenset(members))
    async with AsyncExitStack() as stack:
        nodes = [await start_kv_node(stack, tmp_path / "member0", [],
                                     net_overrides={"admission": rule})]
        for i in (1, 2):
            nodes.append(await start_kv_node(stack, tmp_path / f"member{i}",
                                             [nodes[0].net.addrs[0]],
                                             net_overrides={"admission": rule}))
        await wait_for_ring(nodes)
        victim = nodes[0]
        for i in range(30):
            await victim.put(f"k{i}", i, consistency="all")
        keys_before = {kv.me: len(kv.store) for kv in nodes}
        subscriptions = [await stack.enter_async_context(kv.net.subscribe(TOPIC))
                         for kv in nodes]

        # twenty strangers, each with its own key, completing Noise, running SWIM and
        # gossip, all joining through the victim at once
        strangers: list[Network] = []
        done = trio.Event()

        async def run_stranger(i: int) -> None:
            async with Network.start(node_config(tmp_path / f"stranger{i}",
                                                 bootstrap=[victim.net.addrs[0]], **FAST_NET)
                                     ) as stranger:
                strangers.append(stranger)
                await done.wait()

        crowd = await stack.enter_async_context(trio.open_nursery())
        stack.callback(done.set)  # (unwound first) every stranger stops, even on failure
        for i in range(STRANGERS):
            crowd.start_soon(run_stranger, i)
        await wait_for(lambda: len(strangers) == STRANGERS, 60, "twenty strangers to start")
        stranger_ids = {s.peer_id for s in strangers}
        for stranger in strangers:
            await stranger.subscribe_raw(TOPIC)
        await wait_for(lambda: len(stranger_ids & set(victim.net.connected_peers())) >= 10,
                       30, "the strangers to connect to the victim")
        # they knock on every store protocol and publish gossip
        codes = [await _attempts(s, victim, b"k1") for s in strangers[:5]]
        for stranger in strangers:
            await stranger.publish(TOPIC, {"from": "a stranger"})
        # give membership several of its periods to spread whatever the strangers said
        rounds_seen = victim.net.view.core.stats.get("probes", 0)
        await wait_for(lambda: victim.net.view.core.stats.get("probes", 0) >= rounds_seen + 5,
                       30, "five more probe periods on the victim")

        for kv in nodes:
            assert set(kv.ring.members) == set(members), "a stranger entered a ring"
            assert {m.peer_id for m in kv.net.view.members()} <= set(members)
        for answer in codes:
            assert answer == dict.fromkeys(answer, "not_admitted"), answer
        assert {kv.me: len(kv.store) for kv in nodes} == keys_before
        assert await victim.get("k1", consistency="all") == 1
        assert victim.net.scores.offences.get("unadmitted", 0) >= len(codes) * len(codes[0])
        assert victim.net.metrics["unadmitted_refused"] >= len(codes) * len(codes[0])
        assert not any(s.view.members() for s in strangers), "a member answered a stranger"

        # the honest mesh holds members only, and honest gossip still flows
        await wait_for(lambda: _mesh(victim.net) >= set(members) - {victim.me}, 20,
                       "the victim's mesh to hold both other members")
        assert not _mesh(victim.net) & stranger_ids
        await nodes[1].net.publish(TOPIC, {"from": "member"})
        with trio.fail_after(10):
            while True:
                message = await subscriptions[0].next()
                assert message.author in members, "gossip of a stranger was delivered"
                if message.payload == {"from": "member"}:
                    break


# -- connection slots: strangers hold at most max_stranger_connections -----------------------
async def test_strangers_beyond_the_cap_are_closed_and_members_are_not_counted(tmp_path):
    victim_id, friend_id = _identities(tmp_path, 2)
    rule = AdmissionRule("allowlist", frozenset({victim_id, friend_id}))
    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(Network.start(node_config(
            tmp_path / "member0", admission=rule, max_stranger_connections=3)))
        assert victim.peer_id == victim_id
        # eight strangers, each with its own key; none knows a peer, so none dials by itself
        crowd, _ = await _start_strangers(stack, tmp_path, 8)
        stranger_ids = {stranger.peer_id for stranger in crowd}

        def held() -> set[str]:
            return stranger_ids & set(victim.connected_peers())

        def metric(name: str) -> int:
            return _metric(victim, name)

        async def knock(stranger: Network) -> None:
            await _knock(stranger, victim)

        async with trio.open_nursery() as knocking:  # eight strangers connect at once
            for stranger in crowd:
                knocking.start_soon(knock, stranger)
        await wait_for(lambda: len(held()) == 3 and metric("stranger_connections_closed") >= 5,
                       3, "the victim to keep three strangers and close the other five")
        assert metric("stranger_connections") == 3

        # an allowlisted peer is never counted nor closed
        friend = await stack.enter_async_context(Network.start(node_config(
            tmp_path / "member1", admission=rule, max_stranger_connections=3,
            bootstrap=[victim.addrs[0]])))
        assert friend.peer_id == friend_id
        await wait_for(lambda: friend_id in victim.connected_peers(), 3,
                       "the allowlisted peer to connect")
        assert metric("stranger_connections") == 3

        assert friend_id in victim.connected_peers()
        # turned away for want of a slot is no offence: no stranger is scored or banned
        assert not stranger_ids & set(victim.scores.snapshot(time.monotonic()))
        assert not any(victim.is_banned(peer) for peer in stranger_ids)


async def test_a_strangers_slot_is_a_lease_and_a_freed_slot_takes_the_next(tmp_path):
    # one slot, held for a second: the first stranger holds it, the second is turned away;
    # once the lease is up the first is closed and the second gets the slot
    (victim_id,) = _identities(tmp_path, 1)
    rule = AdmissionRule("allowlist", frozenset({victim_id}))
    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(Network.start(node_config(
            tmp_path / "member0", admission=rule, max_stranger_connections=1,
            stranger_connection_max_s=1.0)))
        (first, second), stop = await _start_strangers(stack, tmp_path, 2)

        def metric(name: str) -> int:
            return _metric(victim, name)

        def holds(peer: Network) -> bool:
            return peer.peer_id in victim.connected_peers()

        async def knock(stranger: Network) -> None:
            await _knock(stranger, victim)

        await knock(first)
        await wait_for(lambda: holds(first) and metric("stranger_connections") == 1, 5,
                       "the first stranger to hold the slot")
        await knock(second)
        await wait_for(lambda: metric("stranger_connections_closed") >= 1 and not holds(second),
                       5, "the second stranger to be turned away")
        assert holds(first) and metric("stranger_connections_expired") == 0
        await wait_for(lambda: not holds(first) and metric("stranger_connections_expired") >= 1,
                       5, "the first stranger's lease to run out")
        # (a stranger may connect again by itself and take the slot; the first one stops, so
        # the slot goes to the second, whoever took it meanwhile)
        stop[0].set()
        await wait_for(lambda: first.peer_id in _STOPPED, 10, "the first stranger to stop")
        await knock(second)
        await wait_for(lambda: holds(second) and metric("stranger_connections") == 1, 5,
                       "the second stranger to take the freed slot")
        assert not victim.is_banned(first.peer_id) and not victim.is_banned(second.peer_id)


async def test_no_lease_runs_out_before_the_first_stake_reading(tmp_path):
    # before the first reading nobody is admitted, members to be included: their connections
    # are counted, and none is closed, by the cap or by the lease
    rule = AdmissionRule("stake", min_stake=5, task="t")
    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(Network.start(node_config(
            tmp_path / "victim", admission=rule, max_stranger_connections=1,
            stranger_connection_max_s=0.3)))
        (peer,), _ = await _start_strangers(stack, tmp_path, 1)
        await _knock(peer, victim)
        await wait_for(lambda: peer.peer_id in victim.connected_peers(), 5, "the peer to connect")
        await trio.sleep(1.5)  # five leases' worth, and more than one discovery round
        assert peer.peer_id in victim.connected_peers()
        assert _metric(victim, "stranger_connections_expired") == 0
        victim.set_staked({victim.peer_id})  # a first reading, without it: now its lease runs
        await wait_for(lambda: _metric(victim, "stranger_connections_expired") == 1, 5,
                       "the lease to run out once the stakes were read")


async def test_peers_whose_stake_lapsed_count_against_the_cap_on_strangers(tmp_path):
    # three staked peers connect; a reading without them (twice: the reading before still
    # admits them once) makes them strangers: with a cap of one, two connections are closed
    rule = AdmissionRule("stake", min_stake=5, task="t")
    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(Network.start(node_config(
            tmp_path / "victim", admission=rule, max_stranger_connections=1)))
        peers = [await stack.enter_async_context(Network.start(node_config(tmp_path / f"p{i}")))
                 for i in range(3)]
        ids = {p.peer_id for p in peers}
        victim.set_staked(ids | {victim.peer_id})
        for peer in peers:
            await _knock(peer, victim)

        def held() -> set[str]:
            return ids & set(victim.connected_peers())

        def metric(name: str) -> int:
            return _metric(victim, name)

        await wait_for(lambda: held() == ids, 5, "the three staked peers to connect")
        assert metric("stranger_connections") == 0  # admitted: not counted
        victim.set_staked({victim.peer_id})
        assert held() == ids and metric("stranger_connections_closed") == 0  # grace
        victim.set_staked({victim.peer_id})
        await wait_for(lambda: len(held()) == 1 and metric("stranger_connections") == 1, 5,
                       "the victim to keep one of the lapsed peers' connections")
        assert metric("stranger_connections_closed") >= 2
        assert not any(victim.is_banned(peer) for peer in ids)  # no offence


async def test_a_node_the_rule_does_not_admit_neither_reads_nor_writes(tmp_path):
    # a one-node network under the stake rule: before the first stake reading and whenever
    # a reading leaves it out, its store refuses reads and writes (it would otherwise keep a
    # ring of its own and hand what it stored to the network once admitted)
    rule = AdmissionRule("stake", min_stake=5, task="t")
    async with AsyncExitStack() as stack:
        kv = await start_kv_node(stack, tmp_path / "n", [], net_overrides={"admission": rule})
        with pytest.raises(NotAdmitted, match="no reading of the stakes"):
            await kv.put("k", 1)
        kv.net.set_staked({kv.me})
        await kv.put("k", 1)
        assert await kv.get("k") == 1
        kv.net.set_staked(set())
        kv.net.set_staked(set())  # past the period of grace of the reading before
        with pytest.raises(NotAdmitted, match="stake of at least 5 on task t"):
            await kv.put_many({"a": 1, "b": 2})
        with pytest.raises(NotAdmitted):
            await kv.get_many(["k"])
        assert len(kv.store) == 1


class _StakesChain:
    """The two reads the stake loop makes of a chain (accounts are their nodes' peer ids)."""

    def __init__(self) -> None:
        self.stakes: dict[str, int] | None = None  # None: the task is not on the chain

    async def task(self, task_id: str) -> dict | None:
        return None if self.stakes is None else {"stakes": dict(self.stakes)}

    async def node_of(self, account: str) -> str:
        return account


class _GateOnly:
    """What the stake loop uses of a Network: its gate."""

    def __init__(self, rule: AdmissionRule) -> None:
        self.peer_id = PEER_A
        self.admission = Admission(rule, PEER_A)

    def set_staked(self, peers: set[str]) -> None:
        self.admission.set_staked(peers)

    def admits(self, peer: str) -> bool:
        return self.admission.admits(peer)


async def test_the_stake_reading_says_once_per_change_whether_the_node_is_admitted(
        autojump_clock):
    rule = AdmissionRule("stake", min_stake=5, task="t", recheck_s=10.0)
    net, chain, said = _GateOnly(rule), _StakesChain(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_stake_admission, net, chain, said.append)
        await trio.sleep(55)  # the task is not there yet: five readings
        chain.stakes = {PEER_A: 4, PEER_B: 5}
        await trio.sleep(50)
        chain.stakes = {PEER_A: 5, PEER_B: 5}
        await trio.sleep(50)
        assert net.admits(PEER_A) and net.admits(PEER_B)
        chain.stakes = {PEER_B: 9}  # unstaked: out after the period of grace
        await trio.sleep(50)
        nursery.cancel_scope.cancel()
    assert not net.admits(PEER_A)
    assert [line.split(":")[1].strip() for line in said] == [
        "this node holds less than 5 on task t", "this node is admitted (2 nodes hold the "
        "stake)", "this node holds less than 5 on task t"], said


# -- write authority among ring members -------------------------------------------------------
def _key_owned_by_neither(ring, a: str, b: str) -> bytes:
    for i in range(10_000):
        key = f"k{i}".encode()
        owners = ring.preference_list(key)
        if a not in owners and b not in owners:
            return key
    raise AssertionError("no key replicated by neither node")


def _key_owned_by_both(ring, a: str, b: str) -> bytes:
    for i in range(10_000):
        key = f"k{i}".encode()
        owners = ring.preference_list(key)
        if a in owners and b in owners:
            return key
    raise AssertionError("no key replicated by both nodes")


async def test_a_ring_member_writes_only_what_it_or_the_receiver_replicates(tmp_path):
    async with AsyncExitStack() as stack:
        first = await start_kv_node(stack, tmp_path / "n0", [], replicas=2)
        nodes = [first] + [await start_kv_node(stack, tmp_path / f"n{i}", [first.net.addrs[0]],
                                               replicas=2) for i in (1, 2, 3)]
        await wait_for_ring(nodes)
        victim, member = nodes[0], nodes[1]
        ring = victim.ring
        delta = msgpack.packb([1, 1, int(time.time() * 1000), 0, member.me, False,
                               msgpack.packb("member wrote")])

        async def send(items: list) -> str:
            try:
                batch = seal_batch(member.net, items, member.next_batch_seq())
                await member.net.request(victim.me, APPLY_PROTOCOL, batch, timeout=5)
                return "served"
            except RemoteError as exc:
                return exc.code

        foreign = _key_owned_by_neither(ring, victim.me, member.me)
        assert await send([[foreign, delta, None]]) == "authority"
        assert victim.store.get(foreign) is None
        made_up = str(Identity.generate().peer_id)
        shared = _key_owned_by_both(ring, victim.me, member.me)
        assert await send([[shared, delta, made_up]]) == "authority"
        assert made_up not in victim.hints.pending()
        assert victim.metrics["authority_refused"] == 2
        # what it does replicate is taken, as before
        assert await send([[shared, delta, None]]) == "served"
        assert victim.store.get(shared) is not None
