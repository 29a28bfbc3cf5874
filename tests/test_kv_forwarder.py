# The forwarder's queue (kv/forwarding.py) against a scripted replica: what it sends again
# after a `busy` answer, and what it does not send once its caller has gone. A unit test of
# the queue's rules: the replica is a stub that answers when the test says so. And what the
# write path hedges (kv/writes.py _hedge) of a call the stub answered in part.
from collections import Counter
from typing import Any

import trio
import trio.testing

from kv.config import Consistency, KVConfig
from kv.forwarding import UNREACHABLE, Forwarder
from kv.ops import BUSY, Op
from kv.replication import Delta, PeerLink
from kv.writes import Writes


class ScriptedReplica:
    """A replica whose kv-ops answers the test releases one at a time: each request's first
    op applied, the others busy (as a replica over its request budget answers)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.release = trio.Event()

    async def request(self, peer: str, protocol: str, message: Any, timeout: float) -> Any:
        self.requests.append(message)
        await self.release.wait()
        self.release = trio.Event()
        replies, first = [], True
        for group in message["groups"]:
            replies.append([None if first and i == 0 else [BUSY, "not applied"]
                            for i in range(len(group["ops"]))])
            first = False
        return replies


def _ops(n: int) -> tuple[list[Op], list[int]]:
    return [Op("put", f"k{i}".encode(), (i,)) for i in range(n)], [1] * n


async def test_busy_ops_are_sent_again_while_their_caller_waits() -> None:
    replica = ScriptedReplica()
    forwarder = Forwarder(replica, "replica", 1 << 20, 10.0)  # type: ignore[arg-type]
    ops, sizes = _ops(3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        outcomes: list[Any] = []

        async def call() -> None:
            outcomes.extend(await forwarder.submit(ops, sizes, Consistency.ONE))

        nursery.start_soon(call)
        for _ in range(3):  # one op applied per request: three requests
            await trio.testing.wait_all_tasks_blocked()
            replica.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == [None, None, None]
        assert [len(r["groups"][0]["ops"]) for r in replica.requests] == [3, 1, 1]
        nursery.cancel_scope.cancel()


async def test_busy_ops_of_a_caller_that_has_gone_are_not_sent_again() -> None:
    # a hedged call settled by the other replica (or a cancelled one) leaves while its request
    # is out; ops that request brings back busy must not be applied later, with a deadline
    # of their own: an acknowledged write would be stamped after writes made since
    replica = ScriptedReplica()
    forwarder = Forwarder(replica, "replica", 1 << 20, 10.0)  # type: ignore[arg-type]
    ops, sizes = _ops(3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(forwarder.run)
        scope = trio.CancelScope()

        async def call() -> None:
            with scope:
                await forwarder.submit(ops, sizes, Consistency.ONE)

        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        assert len(replica.requests) == 1 and forwarder.out_for() is not None
        scope.cancel()  # the caller leaves while its request is out
        await trio.testing.wait_all_tasks_blocked()
        replica.release.set()  # the answer: one applied, two busy
        await trio.testing.wait_all_tasks_blocked()
        assert len(replica.requests) == 1, replica.requests[1:]  # nothing sent again
        assert forwarder.out_for() is None
        nursery.cancel_scope.cancel()


class BusyThenSilent:
    """A replica that answers the first request at once, its first op applied and the others
    busy (its request budget), and never answers the next one (stalled)."""

    peer_id = "coordinator"
    view: dict[str, Any] = {}

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def request(self, peer: str, protocol: str, message: Any, timeout: float) -> Any:
        self.requests.append(message)
        if len(self.requests) > 1:
            await trio.sleep_forever()
        return [[None if i == 0 else [BUSY, "not applied"] for i in range(len(group["ops"]))]
                for group in message["groups"]]


async def test_a_hedge_copies_only_the_ops_not_answered_yet(autojump_clock: Any) -> None:
    # a forwarded call is answered in parts before it is done (here: its first op applied,
    # the others sent again after `busy`); when the mutator then goes silent, the op it
    # already answered is neither copied to the next replica nor counted as hedged
    replica = BusyThenSilent()
    writes = Writes(replica, None, None, None, None,  # type: ignore[arg-type]
                    KVConfig(hedge_after_s=0.5, slow_mark_s=0), Counter(), None, None)
    elsewhere: list[list[bytes]] = []

    async def next_replicas(ops: list[Op], level: Any, avoid: Any, hedge: bool) -> list[None]:
        elsewhere.append([op.key for op in ops])
        return [None] * len(ops)
    writes._execute = next_replicas  # type: ignore[method-assign]
    ops, sizes = _ops(3)
    async with trio.open_nursery() as nursery:
        writes.bind(nursery)
        results = await writes._forward("mutator", ops, sizes, Consistency.ONE, frozenset(),
                                        False)
        nursery.cancel_scope.cancel()
    assert results == [None, None, None]
    assert [len(r["groups"][0]["ops"]) for r in replica.requests] == [3, 1]
    # k2 was still queued (withdrawn: not a copy), k1 was out (hedged), k0 answered
    assert sorted(elsewhere) == [[b"k1"], [b"k2"]]
    assert writes.metrics["hedged_ops"] == 1


async def test_a_closed_forwarder_sends_what_it_holds_then_ends_and_refuses_more() -> None:
    # closed when its replica left the ring: the queued call is still sent and answered, the
    # drainer ends, and a call a writer queues afterwards is answered UNREACHABLE at once
    # (nothing would ever send it)
    replica = ScriptedReplica()
    forwarder = Forwarder(replica, "replica", 1 << 20, 10.0)  # type: ignore[arg-type]
    ops, sizes = _ops(1)
    async with trio.open_nursery() as nursery:
        queued = forwarder.enqueue(ops, sizes, Consistency.ONE)
        forwarder.close()
        ended = trio.Event()

        async def drain() -> None:
            await forwarder.run()
            ended.set()

        nursery.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        replica.release.set()
        with trio.fail_after(5):
            await ended.wait()
        assert queued.done.is_set() and queued.outcomes == [None]
        late = forwarder.enqueue(ops, sizes, Consistency.ONE)
        assert late.done.is_set() and late.outcomes[0][0] == UNREACHABLE
        assert len(replica.requests) == 1


async def test_a_closed_link_sends_what_it_holds_then_ends_and_hands_on_more() -> None:
    failed: list[tuple[str, list[Delta]]] = []
    link = PeerLink(None, "gone", 10, 1 << 20, 8,  # type: ignore[arg-type]
                    lambda peer, items: failed.append((peer, items)), lambda: 1)
    sent: list[Delta] = []

    async def send_batch(batch: list[Delta]) -> None:
        sent.extend(batch)

    link._send_batch = send_batch  # type: ignore[method-assign]
    first, late = Delta(b"k", b"d1", None, None), Delta(b"k", b"d2", None, None)
    assert link.push_nowait(first)
    link.close()
    with trio.fail_after(5):
        await link.run()  # ends once what it held is sent
    assert sent == [first] and failed == []
    assert link.push_nowait(late)  # nothing drains it now: handed to on_failed (hints)
    assert failed == [("gone", [late])] and link.backlog == 0
