# Tests of the task author API (tasks/api.py, tasks/blobs.py, tasks/runner.py) and of the
# built-in tasks, with a fake in-memory TaskContext and StorageProver (pure units, no node).
from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tasks.api import (
    CodeHashMismatch,
    StorageProver,
    Task,
    check_code_hash,
    code_hash,
    equal_shares,
)
from tasks.blobs import CidMismatch, cid_matches, cid_of, verify_cid
from tasks.builtin import BUILTIN, HelloWorld, StorageProof, builtin_task
from tasks.builtin.storage import (
    K,
    challenge_of,
    format_submission,
    parse_submission,
    pick_partitions,
)
from tasks.runner import run_task_call

# --- fakes ---------------------------------------------------------------------------------


class FakeNetwork:
    """What the nodes share: the replicated store (by task namespace) and blobs."""

    def __init__(self) -> None:
        self.kv: dict[str, Any] = {}
        self.blobs: dict[str, bytes] = {}


class FakeContext:
    def __init__(self, net: FakeNetwork, node_id: str, task_id: str = "t1",
                 storage: StorageProver | None = None) -> None:
        self.net = net
        self._node_id = node_id
        self._task_id = task_id
        self._storage = storage
        self.round = 0
        self.window = "idle"
        self.log = logging.getLogger(f"test.task.{node_id}")

    @property
    def task_id(self) -> str:
        return self._task_id

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def storage(self) -> StorageProver | None:
        return self._storage

    async def get(self, key: str) -> Any:
        return self.net.kv.get(f"{self._task_id}/{self._node_id}/{key}")

    async def put(self, key: str, value: Any) -> None:
        self.net.kv[f"{self._task_id}/{self._node_id}/{key}"] = value

    def sign(self, data: bytes) -> bytes:
        return hmac.new(self._node_id.encode(), data, "sha256").digest()

    def verify(self, node_id: str, data: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(hmac.new(node_id.encode(), data, "sha256").digest(), signature)

    async def put_blob(self, data: bytes) -> str:
        cid = cid_of(data)
        self.net.blobs[cid] = data
        return cid

    async def get_blob(self, cid: str) -> bytes:
        data = self.net.blobs[cid]
        verify_cid(cid, data)
        return data


# --- content ids ---------------------------------------------------------------------------


def test_cid_known_vector_and_independent_computation() -> None:
    # CIDv1 = version 0x01, codec raw 0x55, multihash sha2-256 0x12 length 0x20, digest;
    # multibase base32: prefix "b", RFC 4648 lower case without padding.
    raw = bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(b"hello").digest()
    by_hand = "b" + base64.b32encode(raw).decode().lower().rstrip("=")
    assert cid_of(b"hello") == by_hand
    assert by_hand == "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"


@pytest.mark.parametrize("data", [b"", b"hello", bytes(range(256)) * 40])
def test_cid_round_trip(data: bytes) -> None:
    cid = cid_of(data)
    verify_cid(cid, data)
    assert cid_matches(cid, data)
    assert not cid_matches(cid, data + b"x")
    with pytest.raises(CidMismatch):
        verify_cid(cid, data + b"x")


@pytest.mark.parametrize("bad", ["", "not a cid", "bafkrei", "zzzz"])
def test_malformed_cid_is_a_mismatch(bad: str) -> None:
    with pytest.raises(CidMismatch):
        verify_cid(bad, b"hello")


# --- code hash -----------------------------------------------------------------------------


def _load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_code_hash_follows_the_module_source(tmp_path: Path) -> None:
    source = "from tasks.api import Task\n\nclass T(Task):\n    name = 'x'\n"
    (tmp_path / "task_a.py").write_text(source)
    (tmp_path / "task_b.py").write_text(source + "# changed\n")
    try:
        a = _load_module(tmp_path / "task_a.py", "tasknet_test_task_a")
        b = _load_module(tmp_path / "task_b.py", "tasknet_test_task_b")
        assert code_hash(a.T) == hashlib.sha256(source.encode()).hexdigest()
        assert code_hash(b.T) != code_hash(a.T)
        check_code_hash(a.T, code_hash(a.T))
        check_code_hash(a.T, bytes.fromhex(code_hash(a.T)))  # as the chain config holds it
        with pytest.raises(CodeHashMismatch, match="refusing to run"):
            check_code_hash(b.T, code_hash(a.T), task_id="t1")
    finally:
        sys.modules.pop("tasknet_test_task_a", None)
        sys.modules.pop("tasknet_test_task_b", None)


def test_code_hash_of_builtin_is_stable() -> None:
    assert code_hash(HelloWorld) == code_hash(HelloWorld)
    assert code_hash(HelloWorld) != code_hash(StorageProof)


# --- running task code ---------------------------------------------------------------------


async def test_raising_task_is_a_logged_failure(caplog: pytest.LogCaptureFixture) -> None:
    def boom(round: int) -> None:
        raise ValueError(f"bad round {round}")

    async def aboom(round: int) -> None:
        raise KeyError("missing")

    with caplog.at_level(logging.ERROR):
        result = await run_task_call(boom, 7, timeout=5)
        aresult = await run_task_call(aboom, 7, timeout=5)
    assert not result.ok and result.error == "ValueError: bad round 7"
    assert "Traceback" in result.traceback and "boom" in result.traceback
    assert not aresult.ok and aresult.error.startswith("KeyError")
    assert "bad round 7" in caplog.text and "Traceback" in caplog.text


async def test_hanging_sync_task_times_out_and_the_loop_stays_responsive() -> None:
    release = threading.Event()
    started = threading.Event()

    def hang(round: int) -> str:
        started.set()
        release.wait(30)  # a task stuck on I/O: returns only when the test lets it
        return "late"

    pings = 0
    result = None

    async def ping_pong() -> None:
        nonlocal pings
        send, receive = trio.open_memory_channel[int](0)
        async with trio.open_nursery() as inner:
            async def echo() -> None:
                async for _ in receive:
                    pass
            inner.start_soon(echo)
            for i in range(200):
                await send.send(i)
                pings += 1
            await send.aclose()

    async def call() -> None:
        nonlocal result
        result = await run_task_call(hang, 1, timeout=0.3)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            nursery.start_soon(ping_pong)
        assert started.is_set()
        assert result is not None and not result.ok and result.error == "timeout"
        assert pings == 200  # the loop kept running other tasks while the thread hung
    finally:
        release.set()


async def test_async_task_times_out() -> None:
    async def forever(round: int) -> None:
        await trio.sleep_forever()

    result = await run_task_call(forever, 1, timeout=0.05)
    assert not result.ok and result.error == "timeout"


async def test_submission_size_limit() -> None:
    ok = await run_task_call(lambda r: "é" * 256, 1, timeout=5, is_submission=True)
    assert ok.ok and ok.value == "é" * 256  # 512 bytes exactly
    big = await run_task_call(lambda r: "é" * 256 + "x", 1, timeout=5, is_submission=True)
    assert not big.ok and big.error.startswith("oversized")
    wrong = await run_task_call(lambda r: b"bytes", 1, timeout=5, is_submission=True)
    assert not wrong.ok and "str" in wrong.error


async def test_sync_function_returning_awaitable_is_awaited() -> None:
    class Mixed(Task):
        def submission(self, round: int) -> Any:
            async def inner() -> str:
                return f"r{round}"
            return inner()

    task = Mixed(FakeContext(FakeNetwork(), "n1"))
    result = await run_task_call(task.submission, 3, timeout=5, is_submission=True)
    assert result.ok and result.value == "r3"


# --- default distribution ------------------------------------------------------------------


def test_equal_shares() -> None:
    assert equal_shares(["c", "a", "b"], 100) == {"a": 33, "b": 33, "c": 33}
    assert list(equal_shares(["c", "a", "b"], 100)) == ["a", "b", "c"]
    assert equal_shares([], 100) == {}
    assert equal_shares(["a", "b"], 1) == {}
    assert equal_shares(["a", "a"], 10) == {"a": 10}
    task = Task(FakeContext(FakeNetwork(), "n1"))
    assert task.distribution(["x", "y"], 7, 0) == {"x": 3, "y": 3}


# --- built-in tasks ------------------------------------------------------------------------


def test_registry() -> None:
    assert builtin_task("hello") is HelloWorld and builtin_task("storage") is StorageProof
    assert set(BUILTIN) == {"hello", "storage"}
    with pytest.raises(KeyError, match="known"):
        builtin_task("nope")


async def test_hello_world_round() -> None:
    net = FakeNetwork()
    alice, bob = HelloWorld(FakeContext(net, "alice")), HelloWorld(FakeContext(net, "bob"))
    await alice.task(4)
    sub = await alice.submission(4)
    assert sub == cid_of(b"Hello, World! from alice in round 4")
    # asked again (the chain was unavailable when the driver sent the first): the same cid
    assert await alice.submission(4) == sub
    assert await bob.audit(sub, 4, "alice")
    assert not await bob.audit(sub, 5, "alice")  # replayed from another round
    assert not await bob.audit(sub, 4, "carol")  # someone else's proof
    assert not await bob.audit(cid_of(b"garbage"), 4, "alice")  # nothing behind the cid
    with pytest.raises(RuntimeError):
        await bob.submission(4)  # bob did not work in round 4


class FakeProver:
    """A ring of partitions -> replicas and per-node partition contents."""

    def __init__(self, node: str, ring: dict[int, list[str]],
                 data: dict[str, dict[int, bytes]]) -> None:
        self.node, self.ring, self.data = node, ring, data

    def owned_partitions(self) -> list[int]:
        return sorted(p for p, nodes in self.ring.items() if self.node in nodes)

    def replicas_of(self, partition: int) -> list[str]:
        return list(self.ring.get(partition, []))

    def members(self) -> list[str]:
        return sorted({n for nodes in self.ring.values() for n in nodes})

    def partitions_of(self, node_id: str) -> list[int]:
        return sorted(p for p, nodes in self.ring.items() if node_id in nodes)

    async def digest(self, partition: int, challenge: bytes) -> bytes:
        return hashlib.sha256(challenge + self.data[self.node][partition]).digest()


def _storage_cluster(nodes: list[str], partitions: int = 16,
                     replicas: int = 3) -> tuple[dict[int, list[str]], dict[str, dict[int, bytes]]]:
    ring = {p: [nodes[(p + i) % len(nodes)] for i in range(replicas)] for p in range(partitions)}
    data = {n: {p: f"partition {p}".encode() for p, ns in ring.items() if n in ns}
            for n in nodes}
    return ring, data


def _storage_task(net: FakeNetwork, node: str, ring: dict[int, list[str]],
                  data: dict[str, dict[int, bytes]]) -> StorageProof:
    prover = FakeProver(node, ring, data)
    assert isinstance(prover, StorageProver)
    return StorageProof(FakeContext(net, node, storage=prover))


def test_storage_challenge_and_pick_are_deterministic() -> None:
    c = challenge_of("t1", 3)
    assert c == hashlib.sha256(b"tasknet-storage" + b"t1" + (3).to_bytes(8, "big")).digest()
    assert c != challenge_of("t1", 4) and c != challenge_of("t2", 3)
    owned = list(range(0, 64, 3))
    picked = pick_partitions(c, owned)
    assert picked == pick_partitions(c, list(reversed(owned)))
    assert len(picked) == K and set(picked) <= set(owned) and picked == sorted(picked)
    assert pick_partitions(c, [5, 2]) == [2, 5]
    # the picks follow the challenge, spread over every partition, not the same few
    many = list(range(4096))
    picks = [pick_partitions(challenge_of("t1", r), many) for r in range(200)]
    assert all(len(set(p)) == K for p in picks)
    assert len({tuple(p) for p in picks}) == 200
    assert len(set().union(*picks)) > 600
    assert min(p[0] for p in picks) < 100 and max(p[-1] for p in picks) > 4000
    assert format_submission({2: b"\x01", 1: b"\xff"}) == "1:ff,2:01"
    assert parse_submission("1:ff,2:01") == {1: b"\xff", 2: b"\x01"}
    for bad in ["1", "x:00", "1:zz", "1:00,1:00", "1:"]:
        with pytest.raises(ValueError):
            parse_submission(bad)


STORAGE_NODES = ["a", "b", "c", "d", "e"]


async def _storage_round(r: int) -> tuple[
        dict[int, list[str]], dict[str, dict[int, bytes]], FakeNetwork, dict[str, StorageProof]]:
    """Five nodes running the storage task, each past round r's start (its digests taken)."""
    ring, data = _storage_cluster(STORAGE_NODES)
    net = FakeNetwork()
    tasks = {n: _storage_task(net, n, ring, data) for n in STORAGE_NODES}
    for n in STORAGE_NODES:
        await tasks[n].task(r)  # every replica digests at the round's start
    return ring, data, net, tasks


async def test_storage_honest_round_passes_every_audit() -> None:
    nodes = STORAGE_NODES
    _, _, _, tasks = await _storage_round(2)
    for n in nodes:
        sub = await tasks[n].submission(2)
        assert len(sub.encode()) <= 512 and len(parse_submission(sub)) == K
        for auditor in nodes:
            if auditor != n:
                assert await tasks[auditor].audit(sub, 2, n), (auditor, n)


async def test_storage_audit_catches_lost_data_and_foreign_partitions() -> None:
    ring, data, net, honest = await _storage_round(1)
    sub = await honest["a"].submission(1)
    claimed = parse_submission(sub)
    # "a" lost the data of its partitions: its digests differ from the other replicas'
    lossy = {**data, "a": {p: b"lost" for p in data["a"]}}
    lost = _storage_task(net, "a", ring, lossy)
    await lost.task(1)
    bad = await lost.submission(1)
    sharers = {m for p in claimed for m in ring[p] if m != "a"}
    assert sharers
    for auditor in sharers:
        assert not await honest[auditor].audit(bad, 1, "a")
    # listing a partition "a" does not replicate
    foreign = next(p for p in ring if "a" not in ring[p])
    swapped = dict(claimed)
    del swapped[min(swapped)]
    swapped[foreign] = b"\x00" * 32
    assert not await honest["b"].audit(format_submission(swapped), 1, "a")
    only_foreign = format_submission({foreign: b"\x00" * 32})
    assert not await honest["b"].audit(only_foreign, 1, "a")
    # malformed, too many, empty while owning partitions the auditor shares
    assert not await honest["b"].audit("garbage", 1, "a")
    assert not await honest["b"].audit(format_submission(
        {p: b"\x00" for p in data["a"]}), 1, "a")
    assert not await honest["b"].audit("", 1, "a")


async def test_storage_writes_after_the_round_start_do_not_split_honest_replicas() -> None:
    ring, data, net, tasks = await _storage_round(3)
    # a user write lands on a's replica of each of its partitions during the round, before
    # the other replicas have it: a digest taken when each side looks would differ now
    sub = await tasks["a"].submission(3)
    for p in parse_submission(sub):
        data["a"][p] = b"written during the round"
    late = await _storage_task(net, "a", ring, data).submission(3)  # a fresh node: live digests
    sharers = {m for p in parse_submission(sub) for m in ring[p] if m != "a"}
    for auditor in sharers:
        assert await tasks[auditor].audit(sub, 3, "a")  # round-start digests agree
        assert not await tasks[auditor].audit(late, 3, "a")  # live ones would not
    # an auditor without round-start digests (restarted) has no evidence: it accepts
    restarted = _storage_task(net, "b", ring, data)
    assert await restarted.audit(late, 3, "a")


async def test_storage_auditor_sharing_nothing_accepts() -> None:
    ring = {0: ["a"], 1: ["a"], 2: ["b"], 3: ["b"]}
    data = {"a": {0: b"x", 1: b"y"}, "b": {2: b"z", 3: b"w"}}
    net = FakeNetwork()
    a, b = _storage_task(net, "a", ring, data), _storage_task(net, "b", ring, data)
    sub = await a.submission(0)
    assert set(parse_submission(sub)) == {0, 1}
    assert await b.audit(sub, 0, "a")  # b holds neither partition: nothing to compare
    assert await b.audit("", 0, "a")  # nor can it tell that a owns any
    assert not await b.audit("2:00", 0, "a")  # but the ring says a does not own 2


# --- task modules and task files ---------------------------------------------------------------


def test_task_modules_load_their_tasks_and_refuse_bad_ones(tmp_path: Path) -> None:
    from tasks.builtin import BUILTIN
    from tasks.loader import TaskModuleError, load_task_module, load_task_modules

    good = tmp_path / "good.py"
    good.write_text("from tasks.api import Task\n\nclass Mine(Task):\n    name = 'mine'\n")
    loaded = load_task_module(good)
    assert list(loaded) == ["mine"] and code_hash(loaded["mine"])  # its source is hashable
    cases = {
        "broken.py": "def (:\n",
        "empty.py": "x = 1\n",
        "clash.py": "from tasks.api import Task\n\nclass H(Task):\n    name = 'hello'\n",
    }
    for file_name, source in cases.items():
        path = tmp_path / file_name
        path.write_text(source)
        with pytest.raises(TaskModuleError, match=file_name):
            load_task_modules([str(path)], BUILTIN)
    with pytest.raises(TaskModuleError, match="no such file"):
        load_task_module(tmp_path / "missing.py")


def test_task_files_are_checked_and_turned_into_slots(tmp_path: Path) -> None:
    from tasks.taskfile import TaskFileError, create_fields, read_task_file

    path = tmp_path / "t.toml"
    path.write_text('name = "hello"\nround_time_s = 10\nmin_stake = 5\nbounty_per_round = 7\n'
                    'audit_window_s = 2.5\nmax_auditors = 3\n')
    spec = read_task_file(path)
    fields = create_fields(spec, slot_ms=250, now_slot=1000, code_hash=bytes(32))
    assert fields["task_id"] == "hello" and fields["round_time"] == 40
    assert fields["submission_window"] == 16 and fields["audit_window"] == 10
    assert fields["start_slot"] == 1008 and fields["max_auditors"] == 3
    for bad, fragment in [('name = "x"\n', "missing"),
                          (path.read_text() + "colour = 1\n", "unknown fields"),
                          (path.read_text().replace("= 5", "= -5"), "min_stake"),
                          (path.read_text().replace("= 10", '= "ten"'), "round_time_s"),
                          ("name = [", "t.toml")]:
        path.write_text(bad)
        with pytest.raises(TaskFileError, match=fragment):
            read_task_file(path)
