# Benchmark: the replicated KV store as a user sees it, real `node.py` processes on 127.0.0.1
# driven over their control API (a lean HTTP client under trio for load, httpx for status),
# with raw plyvel as the reference.
# Lives here: starting, stopping and restarting node processes in a temp dir, load generation
# and the measurements below. Prints one JSON line.
# Must not live here: anything the node needs; this script only uses node.py and its HTTP API.
#
# Every cluster stores each key on N = 3 replicas and acknowledges a write at W = 2 (quorum).
# Clusters, each fresh: 3 nodes (idle RSS, throughput, lag, catch-up), one of each other size
# in --nodes-list (throughput), and 3 nodes again (RSS with --keys keys, handoff): the last one
# is fresh so that what a restart leaves behind cannot blur the memory and handoff figures.
#   writes_per_s_w2_nX          PUT /kv/{key}, one key per request, --concurrency requests in
#                               flight, spread round-robin over every node (each coordinates);
#                               acknowledged writes / wall time.
#   writes_per_s_w2_n3_high_concurrency  the same on 3 nodes with --high-concurrency requests
#                               in flight (the nodes batch replication and fsyncs by what is
#                               in flight, so the rate depends on it: both are reported).
#   batched_writes_per_s_w2_nX  POST /kv-batch of --batch-size keys, --batch-concurrency
#                               batches in flight, round-robin over every node.
#   lag_p50_ms, lag_p99_ms      writes paced open-loop at --lag-rate per second (or 80% of the
#                               single-write rate just measured, if lower: lag_rate_per_s says
#                               what was achieved). For every LAG_SAMPLE_EVERY-th write, once it
#                               is acknowledged, each node is asked with GET /kv-local/{key}
#                               (its own store, no quorum, no read repair) whether it holds the
#                               key, again (those still without it) every LAG_POLL_S until all
#                               N do; lag = time the last replica answered "present" - time the
#                               PUT was acknowledged (an upper bound: a replica may have had it
#                               up to one round trip earlier). Probes are requests to the nodes
#                               too: lag_probe_requests_per_s says how many (about a sixth of
#                               the writes' count with 1 write in 25 sampled, each probe a cheap
#                               local read; 1 in 10 made it about 40%).
#   catchup_s                   SIGTERM one node, write --catchup keys in batches to the other
#                               two, restart it; time from restart until its key count equals
#                               the others' (N = nodes: it owns every key) and no node has hints
#                               pending (catchup_api_s: of that, until its API answered);
#                               catchup_peer_offences: what the nodes held against each other
#                               afterwards (p2p offence counts by reason, summed).
#   rss_mb_per_node             --keys keys written in batches, every copy in place, then the
#                               cluster left quiet for --rss-settle-s (two of the nodes'
#                               free-heap returns): the largest VmRSS of the node processes
#                               (rss_mb_per_node_after_load: the same read as soon as every
#                               copy was in place, the load's freed heap still held;
#                               idle_rss_mb: before the first write, empty stores).
#                               rss_anon_mb_per_node: the largest RssAnon, what a node holds
#                               itself; VmRSS also counts the pages of LevelDB's read-only
#                               table mappings that reads and compactions touched (clean page
#                               cache: rss_file_mb_nodes), see tasknet_node/procstats.py.
#   handoff_keys_per_s          a 4th node joins the cluster holding handoff_total_keys keys;
#                               handoff is done when no node reports handoff work, the nodes
#                               together hold exactly N copies of every key, and the newcomer's
#                               count stopped changing; rate = keys the newcomer received / time
#                               from its start until the first poll that saw that state (a node
#                               refreshes its handoff status once per rebalance round, 2 s).
# Reference, same run, before any node starts: raw_plyvel_sync_batch_per_s, plyvel
# write_batch(sync=True) of --batch-size puts of keys and states laid out and sized as the
# store keeps them (same LevelDB options), the median of REFERENCE_ROUNDS rounds;
# batched_vs_raw_ratio (= ratio) = batched_writes_per_s_w2_n3 / that.
# The load generator runs on the same cores as the nodes; its CPU share of each throughput
# phase is reported (*_driver_cpu_share), since a busy driver caps what it can measure, and so
# is the CPU the node processes spent per acknowledged write (*_node_cpu_ms_per_write, user +
# system, all nodes): it depends less than a rate on what else the machine is running (the
# 1-minute load average at start and end is reported too). --quick runs tiny sizes (smoke test).
from __future__ import annotations

import argparse
import os
import random
import signal
import string
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import plyvel  # noqa: E402
import trio  # noqa: E402
from _common import finish, median, percentile, phase, ratio  # noqa: E402
from _rawhttp import RawHttpClient, RawHttpError, RawResponse  # noqa: E402

import crdt  # noqa: E402
from kv import KVConfig  # noqa: E402
from kv.ops import Op, make_delta  # noqa: E402
from shard import Keyspace  # noqa: E402
from shard.store import LEVELDB_OPTIONS  # noqa: E402
from tasknet_node.datadir import DataDirError, read_api_info  # noqa: E402
from tasknet_node.procstats import parse_cpu_seconds, parse_status  # noqa: E402
from tasknet_node.runner import MEMORY_TRIM_INTERVAL_S  # noqa: E402

NODE_SCRIPT = ROOT / "node.py"
REPLICAS = 3
MAIN_NODES = 3  # lag, catch-up, RSS and handoff run on a cluster of this size
LAG_SAMPLE_EVERY = 25  # a sample costs about 4 probes (3, then the slowest replica's again)
LAG_POLL_S = 0.002
LAG_IN_FLIGHT_S = 0.2  # the pacer waits when more than this many seconds' worth is in flight
STATUS_POLL_S = 0.25
HANDOFF_STABLE_S = 1.0  # the finished state must hold this long (several polls)
READY_S = 60.0  # deadline for a node's API to answer, and for a cluster to see every member
# alive in every ring
STOP_S = 5.0  # a node gets this long to exit after SIGTERM before it is killed
HTTP_TIMEOUT_S = 60.0
REFERENCE_BATCHES = 50
REFERENCE_ROUNDS = 3  # the disk's sync latency varies from moment to moment: take the median


@dataclass
class Sizes:
    nodes_list: list[int]
    writes: int
    batches: int
    batch_size: int
    lag_writes: int
    lag_rate: float
    catchup: int
    keys: int
    value_bytes: int
    concurrency: int
    high_concurrency: int
    batch_concurrency: int
    phase_s: float
    load_s: float
    rss_settle_s: float


@dataclass
class Node:
    name: str
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None
    client: httpx.AsyncClient | None = None  # for status and probes; load has its own
    url: str = ""
    peer_id: str = ""
    addr: str = ""


@dataclass
class Load:
    """Outcome of one load phase."""

    acked: int = 0
    failed: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return round(self.acked / self.elapsed, 1) if self.elapsed > 0 else 0.0

    @property
    def cpu_share(self) -> float:
        return round(self.cpu / self.elapsed, 2) if self.elapsed > 0 else 0.0

    def fail(self, what: str) -> None:
        self.failed += 1
        self.first_error = self.first_error or what


class Cluster:
    """Node processes under one temp dir; every one of them is stopped by `close()`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[Node] = []

    async def start(self, size: int) -> None:
        """The bootstrap node, then the others all at once; until all see each other."""
        await self.launch(self._new_node())
        await gather([partial(self.launch, self._new_node()) for _ in range(size - 1)])
        await self.wait_ready()

    async def add_node(self) -> Node:
        node = self._new_node()
        await self.launch(node)
        return node

    def _new_node(self) -> Node:
        node = Node(f"node{len(self.nodes)}", self.root / f"node{len(self.nodes)}")
        self.nodes.append(node)
        return node

    async def launch(self, node: Node) -> None:
        """Start (or restart) `node`'s process and wait until its API answers."""
        role = ["--join", self.nodes[0].addr] if node is not self.nodes[0] else ["--bootstrap"]
        node.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(node.data_dir.parent / f"{node.name}.log", "ab")  # noqa: SIM115
        with log:
            process = node.process = subprocess.Popen(
                [sys.executable, str(NODE_SCRIPT), *role, "--no-tasks", "--data-dir",
                 str(node.data_dir),
                 "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0",
                 "--replicas", str(REPLICAS), "--write-consistency", "quorum"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with phase(f"{node.name} API up", READY_S):
            while (url := _api_url(node.data_dir, process.pid)) is None:
                if process.poll() is not None:
                    raise RuntimeError(f"{node.name} exited with code {process.returncode}; "
                                       f"see {log.name}")
                await trio.sleep(0.05)
        node.url = url
        if node.client is not None:
            await node.client.aclose()
        node.client = http_client(node.url, 8)
        status = await self.get(node, "/status")
        node.peer_id = status["peer_id"]
        node.addr = status["addrs"][0]

    async def stop(self, node: Node) -> None:
        """SIGTERM `node` and wait for it to exit (killed after STOP_S)."""
        process, node.process = node.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        while process.poll() is None and time.monotonic() < deadline:
            await trio.sleep(0.05)
        if process.poll() is None:
            process.kill()
            process.wait()

    async def close(self) -> None:
        """Stop every process still running (all at once) and close the HTTP clients; runs
        to its end even when the caller is being cancelled."""
        with trio.CancelScope(shield=True):
            await gather([partial(self.stop, node) for node in self.running])
            for node in self.nodes:
                if node.client is not None:
                    await node.client.aclose()
                    node.client = None

    @property
    def running(self) -> list[Node]:
        return [n for n in self.nodes if n.process is not None]

    async def get(self, node: Node, path: str) -> Any:
        """GET a node's JSON. One retry on a transport error: the node may have closed an
        idle keep-alive connection just as it was reused. A node that exited is an error."""
        for attempt in (1, 2):
            if node.process is None or node.process.poll() is not None or node.client is None:
                raise RuntimeError(f"{node.name} is not running")
            try:
                response = await node.client.get(path)
                break
            except httpx.TransportError:
                if attempt == 2:
                    raise
        response.raise_for_status()
        return response.json()

    def log_tails(self, lines: int = 15) -> str:
        """The end of every node's output, for diagnosing a failed run."""
        tails = []
        for node in self.nodes:
            log = node.data_dir.parent / f"{node.name}.log"
            text = log.read_text(errors="replace").splitlines() if log.exists() else []
            tails.append(f"--- {node.name} ({log.name}) ---\n" + "\n".join(text[-lines:]))
        return "\n".join(tails)

    async def kv_status(self) -> list[dict[str, Any]]:
        return await gather([partial(self.get, n, "/kv-status") for n in self.running])

    async def wait_ready(self) -> None:
        """Until every running node sees every other alive and in its ring."""
        nodes = self.running
        peers = {n.peer_id for n in nodes}
        with phase(f"{len(nodes)} nodes ready", READY_S):
            while True:
                views = await gather([partial(self.get, n, "/status") for n in nodes])
                rings = await self.kv_status()
                if all({m["peer_id"] for m in v["members"] if m["state"] == "alive"} >= peers
                       for v in views) and all(r["ring_members"] == len(nodes) for r in rings):
                    return
                await trio.sleep(STATUS_POLL_S)

    async def wait_converged(self, name: str, seconds: float) -> list[dict[str, Any]]:
        """Until every running node holds the same number of keys (right when the cluster
        has as many nodes as replicas: each holds every key) with no replication queued and
        no hints pending; the statuses of that moment."""
        with phase(name, seconds):
            while True:
                statuses = await self.kv_status()
                if len({s["keys"] for s in statuses}) == 1 and all(
                        s["replication_backlog"] == 0 and not s["hints_pending"]
                        for s in statuses):
                    return statuses
                await trio.sleep(STATUS_POLL_S)

    async def wait_gone(self, node: Node) -> None:
        """Until no running node lists `node` as alive."""
        while True:
            views = await gather([partial(self.get, n, "/status") for n in self.running])
            if not any(m["peer_id"] == node.peer_id and m["state"] == "alive"
                       for v in views for m in v["members"]):
                return
            await trio.sleep(STATUS_POLL_S)

    def _pids(self) -> list[int]:
        """The running node processes' ids (in the order of `running`)."""
        return [n.process.pid for n in self.nodes if n.process is not None]

    def cpu_s(self) -> float:
        """CPU time (user + system) the running node processes have used so far."""
        return sum(_cpu_s(pid) for pid in self._pids())

    def memory_mb(self) -> list[dict[str, float]]:
        """Per running node, its resident memory read once from /proc: rss (VmRSS) and its
        parts rss_anon and rss_file (tasknet_node/procstats.py), in MB."""
        return [{field: round(value / 2**20, 1) for field, value in
                 parse_status(Path(f"/proc/{pid}/status").read_text()).items()
                 if field in ("rss", "rss_anon", "rss_file")} for pid in self._pids()]

    def rss_mb(self) -> list[float]:
        return [memory["rss"] for memory in self.memory_mb()]


async def gather(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run the calls concurrently; their results in order."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        results[i] = await calls[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return results


def _api_url(data_dir: Path, pid: int) -> str | None:
    """Where node process `pid` serves its API, once it has said so in `data_dir`'s api.json
    (a file left there by an earlier process does not count)."""
    try:
        info = read_api_info(data_dir)
    except DataDirError:
        return None
    return info.url if info.pid == pid else None


def _cpu_s(pid: int) -> float:
    return parse_cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))


# -- load --------------------------------------------------------------------------------------
class RequestFailed(Exception):
    """A write the cluster did not acknowledge (an HTTP error status or a transport error)."""


Request = Callable[[list[RawHttpClient], int], Awaitable[int]]
"""request(clients, i): send request number i with a worker's clients (one per running node,
in order); returns how many writes were acknowledged, raises RequestFailed."""


def http_client(url: str, connections: int) -> httpx.AsyncClient:
    # verify=False: plain HTTP on loopback, and it spares loading the CA bundle per client
    return httpx.AsyncClient(base_url=url, trust_env=False, verify=False, timeout=HTTP_TIMEOUT_S,
                             limits=httpx.Limits(max_connections=connections,
                                                 max_keepalive_connections=connections))


@asynccontextmanager
async def worker_clients(cluster: Cluster, workers: int
                         ) -> AsyncIterator[list[list[RawHttpClient]]]:
    """For each worker, its own kept-alive connection to every running node (a lean client:
    see benchmarks/_rawhttp.py; status and probes of the harness use httpx)."""
    async with AsyncExitStack() as stack:
        yield [[await stack.enter_async_context(RawHttpClient(node.url, HTTP_TIMEOUT_S))
                for node in cluster.running] for _ in range(workers)]


async def drive(cluster: Cluster, count: int, workers: int, budget: float,
                request: Request) -> Load:
    """Send requests 0 .. count - 1 from `workers` concurrent workers (each with clients of
    its own), starting none after `budget` seconds."""
    load = Load()
    issued = 0
    async with worker_clients(cluster, workers) as clients:
        started, cpu_started = time.perf_counter(), time.process_time()
        deadline = started + budget

        async def worker(mine: list[RawHttpClient]) -> None:
            nonlocal issued
            while issued < count and time.perf_counter() < deadline:
                i, issued = issued, issued + 1
                try:
                    acked = await request(mine, i)
                except RequestFailed as exc:
                    load.fail(str(exc))
                    continue
                load.acked += acked  # not `+= await`: that would add to a stale count

        async with trio.open_nursery() as nursery:
            for mine in clients:
                nursery.start_soon(worker, mine)
        load.elapsed = time.perf_counter() - started
        load.cpu = time.process_time() - cpu_started
    return load


async def _send(call: Awaitable[RawResponse]) -> RawResponse:
    try:
        response = await call
    except RawHttpError as exc:
        raise RequestFailed(str(exc)) from None
    if response.status_code != 200:
        raise RequestFailed(f"{response.status_code} {response.text[:200]}")
    return response


def put_one(prefix: str, value: str) -> Request:
    """Request i: PUT key prefix{i} at the (i mod nodes)-th node."""
    async def request(clients: list[RawHttpClient], i: int) -> int:
        await _send(clients[i % len(clients)].put(f"/kv/{prefix}{i:09d}", json={"value": value}))
        return 1

    return request


def put_batch(prefix: str, value: str, batch_size: int, total: int) -> Request:
    """Request i: POST /kv-batch of keys prefix{i * batch_size} ... (`total` keys in all) at
    the (i mod nodes)-th node."""
    async def request(clients: list[RawHttpClient], i: int) -> int:
        first = i * batch_size
        keys = range(first, min(first + batch_size, total))
        body = {"put": {f"{prefix}{k:09d}": value for k in keys}}
        await _send(clients[i % len(clients)].post("/kv-batch", json=body))
        return len(keys)

    return request


async def holds(client: RawHttpClient, key: str) -> bool:
    """Whether the client's node holds `key` in its own store (no quorum, no read repair)."""
    return bool((await _send(client.get(f"/kv-local/{key}"))).json()["present"])


async def lag_run(cluster: Cluster, count: int, rate: float, value: str,
                  lags: list[float], probes: list[int]) -> Load:
    """Writes paced at `rate` per second (at most LAG_IN_FLIGHT_S seconds' worth in flight,
    each with a worker's clients of its own, which also carry its probes); every
    LAG_SAMPLE_EVERY-th one is followed until all replicas hold it (see the header). A failed
    probe drops its sample and counts as a failed request."""
    put = put_one("lag:", value)
    load = Load()

    async def replicated_after(clients: list[RawHttpClient], key: str,
                               acked_at: float) -> None:
        missing = list(clients)
        while len(clients) - len(missing) < REPLICAS:
            answers = await gather([partial(holds, client, key) for client in missing])
            probes[0] += len(missing)
            missing = [c for c, present in zip(missing, answers, strict=True) if not present]
            if len(clients) - len(missing) < REPLICAS:
                await trio.sleep(LAG_POLL_S)
        lags.append((time.perf_counter() - acked_at) * 1000)

    async def write(clients: list[RawHttpClient], i: int) -> None:
        try:
            await put(clients, i)
            load.acked += 1
            if i % LAG_SAMPLE_EVERY == 0:
                await replicated_after(clients, f"lag:{i:09d}", time.perf_counter())
        except RequestFailed as exc:
            load.fail(str(exc))
        finally:
            idle.append(clients)

    async with worker_clients(cluster, max(16, int(rate * LAG_IN_FLIGHT_S))) as idle:
        started, cpu_started = time.perf_counter(), time.process_time()
        async with trio.open_nursery() as nursery:
            clock = trio.current_time()
            for i in range(count):
                await trio.sleep_until(clock + i / rate)
                while not idle:  # as many in flight as there are clients: wait for one
                    await trio.sleep(LAG_POLL_S)
                nursery.start_soon(write, idle.pop(), i)
        load.elapsed = time.perf_counter() - started
        load.cpu = time.process_time() - cpu_started
    return load


# -- phases ------------------------------------------------------------------------------------
def bench_value(size: int) -> str:
    return "".join(random.Random(size).choices(string.ascii_letters, k=size))


async def throughput(cluster: Cluster, sizes: Sizes, value: str, out: dict[str, Any]) -> None:
    n = len(cluster.running)
    await load_phase(cluster, out, f"writes_per_s_w2_n{n}", f"single writes n{n}",
                     sizes.phase_s + 30, partial(drive, cluster, sizes.writes, sizes.concurrency,
                                                 sizes.phase_s, put_one("single:", value)))
    if n == MAIN_NODES:
        await load_phase(cluster, out, f"writes_per_s_w2_n{n}_high_concurrency",
                         f"single writes n{n}, {sizes.high_concurrency} in flight",
                         sizes.phase_s + 30,
                         partial(drive, cluster, sizes.writes, sizes.high_concurrency,
                                 sizes.phase_s, put_one("single-hc:", value)))
    total = sizes.batches * sizes.batch_size
    await load_phase(cluster, out, f"batched_writes_per_s_w2_n{n}", f"batched writes n{n}",
                     sizes.phase_s + 60,
                     partial(drive, cluster, sizes.batches, sizes.batch_concurrency,
                             sizes.phase_s, put_batch("batched:", value, sizes.batch_size,
                                                      total)))


async def load_phase(cluster: Cluster, out: dict[str, Any], name: str, label: str,
                     seconds: float, load: Callable[[], Awaitable[Load]]) -> None:
    """Run `load` as the phase `label` (deadline `seconds`) and record its figures as `name`:
    the rate, what the driver and the nodes spent on it, and how well the nodes batched."""
    with phase(label, seconds):
        cpu, before = cluster.cpu_s(), _counters(await cluster.kv_status())
        outcome = await load()
    node_cpu_s = cluster.cpu_s() - cpu
    after = _counters(await cluster.kv_status())

    def mean(items: str, groups: str) -> float:
        """Mean of `items` per one of `groups` in the phase (the nodes' counters summed)."""
        count = after.get(groups, 0) - before.get(groups, 0)
        return round((after.get(items, 0) - before.get(items, 0)) / count, 1) if count else 0.0

    out[name] = outcome.rate
    out[f"{name}_acked"] = outcome.acked
    out[f"{name}_driver_cpu_share"] = outcome.cpu_share
    if outcome.acked:
        out[f"{name}_node_cpu_ms_per_write"] = round(node_cpu_s * 1000 / outcome.acked, 3)
    failures(out, name, outcome)
    # how well the nodes amortized per-message costs
    out[f"{name}_deltas_per_replication_batch"] = mean("replication_deltas",
                                                       "replication_batches")
    out[f"{name}_writes_per_group_commit"] = mean("local_writes", "write_batches")


def failures(out: dict[str, Any], name: str, load: Load) -> None:
    """Requests of a phase that were not acknowledged: how many, and the first one's error."""
    if load.failed:
        out[f"{name}_failed_requests"] = load.failed
        out[f"{name}_first_failure"] = load.first_error


async def lag(cluster: Cluster, sizes: Sizes, value: str, out: dict[str, Any]) -> None:
    sustained = out.get(f"writes_per_s_w2_n{MAIN_NODES}", 0.0) * 0.8
    rate = min(sizes.lag_rate, sustained) if sustained > 0 else sizes.lag_rate
    count = min(sizes.lag_writes, int(rate * sizes.phase_s))
    lags: list[float] = []
    probes = [0]
    with phase("replication lag", count / rate + 60):
        load = await lag_run(cluster, count, rate, value, lags, probes)
    out["lag_rate_per_s"] = load.rate
    out["lag_probe_requests_per_s"] = round(probes[0] / load.elapsed, 1) if load.elapsed else 0.0
    out["lag_target_rate_per_s"] = round(rate, 1)
    out["lag_samples"] = len(lags)
    if lags:
        out["lag_p50_ms"] = round(percentile(lags, 50), 2)
        out["lag_p99_ms"] = round(percentile(lags, 99), 2)
    failures(out, "lag", load)


async def catchup(cluster: Cluster, sizes: Sizes, value: str, out: dict[str, Any]) -> None:
    victim = cluster.nodes[-1]
    await cluster.wait_converged("converged before catch-up", 120)
    with phase("catch-up: stop one node", 30):
        await cluster.stop(victim)
        await cluster.wait_gone(victim)
    batches = -(-sizes.catchup // sizes.batch_size)
    with phase(f"catch-up: {sizes.catchup} writes while it is down", sizes.load_s + 60):
        load = await drive(cluster, batches, sizes.batch_concurrency, sizes.load_s,
                           put_batch("catchup:", value, sizes.batch_size,
                                     sizes.catchup))
    out["catchup_writes"] = load.acked
    failures(out, "catchup", load)
    delivered_before = _counters(await cluster.kv_status())
    restarted = time.perf_counter()
    await cluster.launch(victim)
    out["catchup_api_s"] = round(time.perf_counter() - restarted, 2)
    statuses = await cluster.wait_converged("catch-up: restarted node filled", 300)
    out["catchup_s"] = round(time.perf_counter() - restarted, 2)
    others = [s for node, s in zip(cluster.running, statuses, strict=True) if node is not victim]
    delivered = _counters(others)
    for name in ("hints_delivered", "handoff_keys_sent"):
        out[f"catchup_{name}"] = delivered[name] - delivered_before.get(name, 0)
    offences: dict[str, int] = {}
    for view in await gather([partial(cluster.get, n, "/status") for n in cluster.running]):
        for reason, count in view["offences"].items():
            offences[reason] = offences.get(reason, 0) + count
    out["catchup_peer_offences"] = offences


def _counters(statuses: list[dict[str, Any]]) -> dict[str, int]:
    """The nodes' KV counters, summed over nodes."""
    names = ("hints_delivered", "handoff_keys_sent", "replication_batches",
             "replication_deltas", "write_batches", "local_writes")
    return {name: sum(int(s["metrics"].get(name, 0)) for s in statuses) for name in names}


async def rss_and_handoff(cluster: Cluster, sizes: Sizes, value: str,
                          out: dict[str, Any]) -> None:
    with phase(f"load {sizes.keys} keys", sizes.load_s + 60):
        load = await drive(cluster, -(-sizes.keys // sizes.batch_size), sizes.batch_concurrency,
                           sizes.load_s, put_batch("load:", value, sizes.batch_size, sizes.keys))
    out["load_writes_per_s"] = load.rate
    failures(out, "load", load)
    statuses = await cluster.wait_converged("loaded keys replicated", 600)
    total = statuses[0]["keys"]
    out["rss_mb_per_node_after_load"] = max(cluster.rss_mb())
    await trio.sleep(sizes.rss_settle_s)  # quiet on purpose: nodes return freed heap meanwhile
    memory = cluster.memory_mb()  # one reading per node, so its parts add up
    out["rss_keys"] = total
    out["rss_mb_nodes"] = rss = [m["rss"] for m in memory]
    out["rss_mb_per_node"] = max(rss)
    out["rss_anon_mb_nodes"] = anon = [m["rss_anon"] for m in memory]
    out["rss_anon_mb_per_node"] = max(anon)
    out["rss_file_mb_nodes"] = [m["rss_file"] for m in memory]

    started = time.perf_counter()
    newcomer = await cluster.add_node()
    out["handoff_total_keys"] = total
    out["handoff_join_s"] = round(time.perf_counter() - started, 2)
    previous = -1
    done_since: float | None = None
    with phase("handoff to a joining node", sizes.load_s + 60):
        while True:
            statuses = await cluster.kv_status()
            now = time.perf_counter()
            count = statuses[cluster.running.index(newcomer)]["keys"]
            out["handoff_newcomer_keys"] = count
            out["handoff_node_keys"] = [s["keys"] for s in statuses]
            out["handoff_pending"] = [s["handoff"] for s in statuses]
            done = (count > 0 and all(not s["handoff"] for s in statuses)
                    and sum(s["keys"] for s in statuses) == REPLICAS * total)
            if not done or count != previous:
                done_since = None
            if done and done_since is None:
                done_since = now
            previous = count
            if done_since is not None and now - done_since >= HANDOFF_STABLE_S:
                break
            await trio.sleep(STATUS_POLL_S)
    out["handoff_s"] = round(done_since - started, 2)
    out["handoff_keys_per_s"] = round(count / (done_since - started), 1)


# -- reference ---------------------------------------------------------------------------------
def raw_reference(path: Path, value: str, batch_size: int, batches: int) -> float:
    """plyvel write_batch(sync=True) of `batch_size` puts: keys and states laid out and sized
    as the store keeps the benchmark's writes, same LevelDB options; puts per second."""
    keyspace = Keyspace(KVConfig().partitions)
    actor = "12D3KooW" + "x" * 44  # as long as a peer id, the actor a stored state names
    keys = [f"batched:{i:09d}".encode() for i in range(batch_size * batches)]
    state = crdt.encode(make_delta(Op("put", keys[0], (value,)), None, actor, crdt.HLC(),
                                   time.time_ns() // 1_000_000))
    stored = [keyspace.prefix(key) + key for key in keys]
    db = plyvel.DB(str(path), create_if_missing=True, **LEVELDB_OPTIONS)
    rates = []
    try:
        for _ in range(REFERENCE_ROUNDS):
            started = time.perf_counter()
            for first in range(0, len(stored), batch_size):
                with db.write_batch(sync=True) as batch:
                    for key in stored[first:first + batch_size]:
                        batch.put(key, state)
            rates.append(len(stored) / (time.perf_counter() - started))
    finally:
        db.close()
    return round(median(rates), 1)


# -- main --------------------------------------------------------------------------------------
Phase = Callable[[Cluster, Sizes, str, dict[str, Any]], Awaitable[None]]


async def idle_rss(cluster: Cluster, sizes: Sizes, value: str, out: dict[str, Any]) -> None:
    out["idle_rss_mb"] = max(cluster.rss_mb())


async def run(sizes: Sizes, out: dict[str, Any]) -> str | None:
    """Fill `out` with the figures; the first error that stopped the run, if any."""
    value = bench_value(sizes.value_bytes)
    only_throughput: list[Phase] = [throughput]
    plans: list[tuple[str, int, list[Phase]]] = [
        ("main", MAIN_NODES, [idle_rss, throughput, lag, catchup]),
        *[(f"n{size}", size, only_throughput) for size in sizes.nodes_list
          if size != MAIN_NODES],
        ("store", MAIN_NODES, [rss_and_handoff]),
    ]
    with tempfile.TemporaryDirectory(prefix="tasknet-bench-cluster-",
                                     ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        raw = raw_reference(root / "raw", value, sizes.batch_size, REFERENCE_BATCHES)
        out["raw_plyvel_sync_batch_per_s"] = raw
        for name, size, phases in plans:
            cluster = Cluster(root / name)
            try:
                await cluster.start(size)
                for measure in phases:
                    await measure(cluster, sizes, value, out)
            except Exception as exc:  # any failure still reports what was measured
                traceback.print_exc()
                print(cluster.log_tails(), file=sys.stderr)
                return _first_leaf(exc)
            finally:
                await cluster.close()
    batched = out.get(f"batched_writes_per_s_w2_n{MAIN_NODES}", 0.0)
    out["batched_vs_raw_ratio"] = out["ratio"] = ratio(batched, raw)
    return None


def _first_leaf(exc: BaseException) -> str:
    """The first error inside the exception groups trio's nurseries wrap errors in."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


PROFILES = {  # --quick, full size
    "writes": (100, 20_000), "batches": (4, 200), "batch_size": (250, 1000),
    "lag_writes": (200, 20_000), "lag_rate": (200.0, 1000.0), "catchup": (500, 100_000),
    "keys": (2000, 1_000_000), "concurrency": (16, 64), "high_concurrency": (32, 192),
    "batch_concurrency": (2, 4),
    "phase_s": (10.0, 60.0), "load_s": (30.0, 600.0),
    "rss_settle_s": (0.5, 2 * MEMORY_TRIM_INTERVAL_S + 1),
}


def parse_args(argv: list[str]) -> Sizes:
    parser = argparse.ArgumentParser(
        description="Benchmark the replicated KV store on real node processes (127.0.0.1); "
        "prints one JSON line of figures. See the header of this file for the method.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--nodes-list", default=f"{MAIN_NODES},5",
                        help=f"cluster sizes for the throughput phases; must include "
                        f"{MAIN_NODES} (default {MAIN_NODES},5)")
    parser.add_argument("--keys", type=int, help="keys stored for RSS and handoff (1000000)")
    parser.add_argument("--catchup", type=int, help="writes a stopped node misses (100000)")
    parser.add_argument("--writes", type=int, help="single writes per cluster (20000)")
    parser.add_argument("--batches", type=int, help="batches per cluster (200)")
    parser.add_argument("--batch-size", type=int, help="keys per batch (1000)")
    parser.add_argument("--lag-writes", type=int, help="paced writes of the lag phase (20000)")
    parser.add_argument("--lag-rate", type=float, help="writes per second to pace at (1000)")
    parser.add_argument("--concurrency", type=int, help="single writes in flight (64)")
    parser.add_argument("--high-concurrency", type=int,
                        help=f"single writes in flight in the second single-write phase on "
                        f"{MAIN_NODES} nodes (192)")
    parser.add_argument("--batch-concurrency", type=int, help="batches in flight (4)")
    parser.add_argument("--phase-s", type=float,
                        help="seconds a throughput phase may issue requests (60)")
    parser.add_argument("--load-s", type=float,
                        help="seconds a bulk load (catch-up writes, --keys) may take (600)")
    parser.add_argument("--rss-settle-s", type=float,
                        help=f"seconds the loaded cluster stays quiet before rss_mb_per_node is "
                        f"read ({2 * MEMORY_TRIM_INTERVAL_S + 1:g})")
    parser.add_argument("--value-bytes", type=int, default=100, help="value size (100)")
    args = parser.parse_args(argv)
    try:
        nodes_list = [int(n) for n in args.nodes_list.split(",")]
    except ValueError:
        parser.error(f"--nodes-list: expected numbers separated by commas, got "
                     f"{args.nodes_list!r}")
    if MAIN_NODES not in nodes_list or min(nodes_list) < REPLICAS:
        parser.error(f"--nodes-list must include {MAIN_NODES} and sizes >= {REPLICAS}")
    for name, profile in PROFILES.items():
        if getattr(args, name) is None:
            setattr(args, name, profile[0 if args.quick else 1])
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.value_bytes <= 0:
        parser.error("--value-bytes must be positive")
    return Sizes(nodes_list, args.writes, args.batches, args.batch_size, args.lag_writes,
                 args.lag_rate, args.catchup, args.keys, args.value_bytes, args.concurrency,
                 args.high_concurrency, args.batch_concurrency, args.phase_s, args.load_s,
                 args.rss_settle_s)


def main(argv: list[str]) -> int:
    sizes = parse_args(argv)
    out: dict[str, Any] = {"nodes_list": sizes.nodes_list, "replicas": REPLICAS,
                           "write_quorum": REPLICAS // 2 + 1, "keys": sizes.keys,
                           "catchup_keys": sizes.catchup, "batch_size": sizes.batch_size,
                           "concurrency": sizes.concurrency,
                           "high_concurrency": sizes.high_concurrency,
                           "value_bytes": sizes.value_bytes}
    out["loadavg_1m_start"] = round(os.getloadavg()[0], 2)
    error = trio.run(run, sizes, out)
    out["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return finish("cluster", out, error)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
