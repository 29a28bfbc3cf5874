# Benchmark: task rounds and their settlement (docs/task-rounds.md). Prints one JSON line.
# Lives here: three measurements, each with its reference measured in the same run, and the
# worker modes (`--worker ledger|raw|sim`) that run as child processes of this script.
# Must not live here: anything a node, the ledger or the rules need (chain/, tasks/ and node.py
# provide them; this script only drives them).
#
#   ledger_tx_per_s       --writers processes append transfers concurrently to one embedded
#                         ledger (chain/ledger.py), each signing with its own identity funded
#                         by the localnet faucet first. The writers start at one moment and
#                         stop after --ledger-s seconds or --ledger-tx appends, whichever comes
#                         first; rate = appends completed within the window / the window (its
#                         end: the deadline, or the last append if every writer reached its
#                         count first). An append still under way at the deadline is left out
#                         (ledger_tx_late). ledger_writer_tx_min/max and *_slowest_*_ms show
#                         how evenly SQLite's write lock went round.
#   raw_sqlite_tx_per_s   the reference: as many processes inserting rows of entry_bytes bytes
#                         (the average size of the ledger's entries in the same run: every
#                         column of a transfer's entry) into one SQLite file with the ledger's
#                         durability: WAL, synchronous=FULL, one BEGIN IMMEDIATE ... COMMIT per
#                         row. ledger_ratio = ledger / raw (target >= 0.5: reported, not
#                         asserted). The two alternate --repeats times (disk sync latency
#                         varies); each rate is over all of its phases. The ledger is verified
#                         from genesis afterwards (ledger_entries_verified must be 1 + funding +
#                         appends). *_cpu_ms_per_tx: the writers' CPU per transaction.
#   round_cpu_s_N         tasks.simulate.simulate, the whole network of N nodes sans-IO (every
#                         node's engine, its submission, audits, distribution, payout and claim,
#                         and the rules applying each transaction), in a child process:
#                         (process_time(rounds=3) - process_time(rounds=1)) / 2. The difference
#                         leaves out what a run pays once whatever its length (creating and
#                         funding the task, N stakes, the slots that settle the last round),
#                         so it is the CPU that one more round of work costs the network.
#   chain_bytes_per_round_N   the same difference of the simulation's tx_bytes (msgpack
#                         transactions, without signatures), / 2.
#   audit_coverage_N      the simulation's audit coverage (the lower of both runs; target 1.0).
#   round_overhead_ms     real node processes (node.py --ledger DIR --round-time R; the
#                         bootstrap creates hello alone: --builtin-tasks hello) on one ledger:
#                         each node's CPU (/proc/<pid>/stat user + system) over K rounds, counted
#                         by its "round N hello: ..." lines, minus a node's CPU in a network
#                         started with --no-tasks over the same wall time, / K; the mean over
#                         the nodes (round_overhead_ms_per_node lists each).
#                         round_overhead_ms_hello_storage: the same with both built-in tasks
#                         (the default of a bootstrap node), on a new ledger.
# --quick runs tiny sizes (smoke test); --no-nodes leaves out the node processes.
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import finish, ratio, run_steps  # noqa: E402

NODE_SCRIPT = ROOT / "node.py"
SCRIPT = Path(__file__).resolve()
FUNDS_PER_WRITER = 10**9
WORKER_START_S = 60.0  # a child gets this long to open its file and say it is ready
WORKER_EXTRA_S = 60.0  # ... and this long past its phase's length to report
GO_DELAY_S = 0.1  # the writers start together this long after the parent says "go"
SIM_ROUNDS = (1, 3)  # round_cpu_s = (cpu(3) - cpu(1)) / 2
SIM_TIMEOUT_S = 300.0  # one simulation child (both runs of one size)
NODE_READY_S = 60.0
NODE_STOP_S = 5.0
NODE_POLL_S = 0.1
ROUND_LINE = re.compile(r"^round (\d+) hello: ")
WAL_BUSY_PAUSE_S = 0.02
RAW_SCHEMA = "CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, data BLOB NOT NULL) STRICT"


# -- child processes -------------------------------------------------------------------------

def _connect_raw(path: Path) -> sqlite3.Connection:
    """The reference's connection: what chain/ledger.py's _connect sets, nothing more."""
    db = sqlite3.connect(str(path), isolation_level=None, timeout=1.0)
    db.execute("PRAGMA journal_mode=WAL").fetchone()
    db.execute("PRAGMA synchronous=FULL")
    return db


def _begin_immediate(db: sqlite3.Connection, deadline: float) -> None:
    while True:
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
        time.sleep(WAL_BUSY_PAUSE_S)


def worker(mode: str, path: Path, seconds: float, max_tx: int, size: int) -> None:
    """A writer: read its setup line, open, say "ready", wait for "go", write until the time
    or count is up, print one JSON line (count, start, end on the monotonic clock, cpu)."""
    setup = sys.stdin.readline().split()
    if mode == "ledger":
        from nacl.signing import SigningKey

        from chain.ledger import Ledger
        from p2p.identity import Identity

        identity = Identity(SigningKey(bytes.fromhex(setup[0])))
        to = setup[1]
        ledger = Ledger.open(path)

        def write() -> None:
            ledger.append(identity, {"op": "transfer", "to": to, "amount": 1})

        close = ledger.close
    else:
        db = _connect_raw(path)

        def write() -> None:
            _begin_immediate(db, time.monotonic() + 30)
            try:
                db.execute("INSERT INTO rows (data) VALUES (?)", (os.urandom(size),))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        close = db.close
    print("ready", flush=True)
    go = sys.stdin.readline().split()
    if go[:1] != ["go"]:
        return  # the parent gave up: write nothing
    start = float(go[1])  # the same moment for every writer (CLOCK_MONOTONIC is system-wide)
    deadline = start + seconds
    time.sleep(max(0.0, start - time.monotonic()))
    cpu = time.process_time()
    count = late = 0
    end = now = time.monotonic()
    slowest = 0.0
    while count < max_tx and now < deadline:
        write()
        done = time.monotonic()
        slowest = max(slowest, done - now)
        if done > deadline:
            late += 1  # finished after the window: not counted
        else:
            count, end = count + 1, done
        now = done
    if count < max_tx:
        end = deadline  # stopped by the time: it was writing the whole window
    cpu = time.process_time() - cpu
    close()
    print(json.dumps({"count": count, "late": late, "start": start, "end": end, "cpu": cpu,
                      "slowest_s": slowest}), flush=True)


def sim_worker(n_nodes: int) -> None:
    """Both simulations of one network size; one JSON line of their figures."""
    from tasks.simulate import simulate

    out: dict[str, Any] = {}
    for rounds in SIM_ROUNDS:
        started = time.process_time()
        result = simulate(n_nodes, rounds)
        cpu = time.process_time() - started
        problems = []
        if not result["supply_conserved"]:
            problems.append("supply not conserved")
        if result["refused"]:
            problems.append(f"refused {result['refused']}")
        if result["paid_rounds"] != list(range(rounds)):
            problems.append(f"paid rounds {result['paid_rounds']}")
        out[str(rounds)] = {"cpu_s": cpu, "tx_bytes": result["tx_bytes"], "txs": result["txs"],
                            "audit_coverage": result["audit_coverage"], "problems": problems}
    print(json.dumps(out), flush=True)


# -- the ledger and its reference ------------------------------------------------------------

@dataclass
class Phase:
    """Writes completed within the phases' windows (a write still under way at a window's end
    is left out, CPU included), over the windows' length: a window ends at its deadline, or
    earlier when every writer reached its count."""

    count: int = 0
    late: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    slowest_s: float = 0.0
    writer_counts: list[int] = field(default_factory=list)

    def add(self, reports: list[dict[str, Any]]) -> None:
        self.count += sum(r["count"] for r in reports)
        self.late += sum(r["late"] for r in reports)
        self.seconds += max(r["end"] for r in reports) - reports[0]["start"]
        self.cpu += sum(r["cpu"] for r in reports)
        self.slowest_s = max([self.slowest_s, *(r["slowest_s"] for r in reports)])
        self.writer_counts.extend(r["count"] for r in reports)

    @property
    def rate(self) -> float:
        return round(self.count / self.seconds, 1) if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_tx(self) -> float:
        done = self.count + self.late
        return round(1000 * self.cpu / done, 3) if done else 0.0


def _stop(process: subprocess.Popen[Any]) -> None:
    """Kill `process` unless it has exited; reap it."""
    if process.poll() is None:
        process.kill()
    process.wait()


def run_writers(mode: str, path: Path, setups: list[str], seconds: float, max_tx: int,
                size: int = 0) -> list[dict[str, Any]]:
    """Start one writer per setup line, let them all go at once, collect their reports.
    Every child is stopped (killed if need be) before this returns or raises."""
    command = [sys.executable, str(SCRIPT), "--worker", mode, "--path", str(path),
               "--ledger-s", repr(seconds), "--ledger-tx", str(max_tx), "--row-bytes", str(size)]
    children: list[subprocess.Popen[str]] = []
    try:
        for setup in setups:
            child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)
            children.append(child)
            _send(child, setup)
        for child in children:
            _expect(child, "ready", WORKER_START_S)
        start = time.monotonic() + GO_DELAY_S
        for child in children:
            _send(child, f"go {start!r}")
        reports = []
        for child in children:
            stdout, _ = child.communicate(timeout=seconds + WORKER_EXTRA_S)
            if child.returncode != 0:
                raise RuntimeError(f"{mode} writer exited with code {child.returncode}")
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
        return reports
    finally:
        for child in children:
            _stop(child)


def _send(child: subprocess.Popen[str], line: str) -> None:
    assert child.stdin is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()


def _expect(child: subprocess.Popen[str], word: str, seconds: float) -> None:
    """Read `child`'s next stdout line within `seconds`; it must be `word`."""
    import selectors

    assert child.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        if not selector.select(seconds):
            raise RuntimeError(f"a writer did not say {word!r} within {seconds:g}s")
    line = child.stdout.readline().strip()
    if line != word:
        raise RuntimeError(f"a writer said {line!r} instead of {word!r} "
                           f"(exit code {child.poll()})")


def entry_bytes(ledger_file: Path, after: int) -> int:
    """The average stored size of the entries after index `after`: every column (integers
    counted as 8 bytes)."""
    db = sqlite3.connect(f"file:{ledger_file}?mode=ro", uri=True)
    try:
        value = db.execute(
            "SELECT avg(length(prev) + length(tx) + length(pubkey) + length(sig) "
            "+ length(sender) + 24) FROM entries WHERE idx > ?", (after,)).fetchone()[0]
    finally:
        db.close()
    return round(value)


def measure_ledger(root: Path, writers: int, seconds: float, max_tx: int, repeats: int,
                   out: dict[str, Any]) -> None:
    """ledger_tx_per_s, raw_sqlite_tx_per_s and the figures around them into `out`."""
    from chain.ledger import LEDGER_FILE_NAME, Ledger
    from p2p.identity import Identity

    ledger_dir = root / "ledger"
    identities = [Identity.generate() for _ in range(writers)]
    accounts = [i.peer_id.to_base58() for i in identities]
    with Ledger.open_localnet(ledger_dir) as ledger:
        for account in accounts:
            ledger.fund(account, FUNDS_PER_WRITER)
        funded = ledger.height
    # each writer pays the next one: every writer's balance only ever moves by a few units
    setups = [f"{bytes(identity.signing_key).hex()} {accounts[(i + 1) % writers]}"
              for i, identity in enumerate(identities)]
    ledger_file = ledger_dir / LEDGER_FILE_NAME
    raw_file = root / "raw.sqlite"
    db = _connect_raw(raw_file)
    db.execute(RAW_SCHEMA)
    db.close()
    ours, raw = Phase(), Phase()
    size = 0
    for _ in range(repeats):
        ours.add(run_writers("ledger", ledger_file, setups, seconds, max_tx))
        size = size or entry_bytes(ledger_file, funded)
        raw.add(run_writers("raw", raw_file, [""] * writers, seconds, max_tx, size))
    started = time.perf_counter()
    verified = Ledger.verify_file(ledger_file)
    out.update({
        "writers": writers, "ledger_repeats": repeats, "entry_bytes": size,
        "ledger_tx": ours.count, "ledger_s": round(ours.seconds, 3),
        "ledger_tx_per_s": ours.rate, "ledger_cpu_ms_per_tx": ours.cpu_ms_per_tx,
        "ledger_tx_late": ours.late, "ledger_writer_tx_min": min(ours.writer_counts),
        "ledger_writer_tx_max": max(ours.writer_counts),
        "ledger_slowest_append_ms": round(1000 * ours.slowest_s, 1),
        "raw_sqlite_tx": raw.count, "raw_sqlite_s": round(raw.seconds, 3),
        "raw_sqlite_tx_per_s": raw.rate, "raw_sqlite_cpu_ms_per_tx": raw.cpu_ms_per_tx,
        "raw_sqlite_writer_tx_min": min(raw.writer_counts),
        "raw_sqlite_writer_tx_max": max(raw.writer_counts),
        "raw_sqlite_slowest_insert_ms": round(1000 * raw.slowest_s, 1),
        "ledger_ratio": ratio(ours.rate, raw.rate),
        "ledger_entries_verified": verified, "ledger_funding_entries": funded,
        "ledger_verify_s": round(time.perf_counter() - started, 3),
    })
    if verified != 1 + funded + ours.count + ours.late:
        raise RuntimeError(f"the ledger holds {verified} entries, expected "
                           f"{1 + funded + ours.count + ours.late}")


# -- the simulated network -------------------------------------------------------------------

def measure_simulation(n_nodes: int, out: dict[str, Any]) -> None:
    """round_cpu_s_N, chain_bytes_per_round_N and audit_coverage_N into `out`."""
    child = subprocess.Popen([sys.executable, str(SCRIPT), "--worker", "sim", "--sim-nodes",
                              str(n_nodes)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             text=True, cwd=ROOT)
    try:
        stdout, _ = child.communicate(timeout=SIM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"simulating {n_nodes} nodes took over {SIM_TIMEOUT_S:g}s") from None
    finally:
        _stop(child)
    if child.returncode != 0:
        raise RuntimeError(f"simulating {n_nodes} nodes failed (exit code {child.returncode})")
    runs = json.loads(stdout.strip().splitlines()[-1])
    one, three = runs["1"], runs["3"]
    problems = one["problems"] + three["problems"]
    if problems:
        raise RuntimeError(f"simulating {n_nodes} nodes: {'; '.join(problems)}")
    extra = SIM_ROUNDS[1] - SIM_ROUNDS[0]
    out[f"round_cpu_s_{n_nodes}"] = round((three["cpu_s"] - one["cpu_s"]) / extra, 6)
    out[f"chain_bytes_per_round_{n_nodes}"] = round((three["tx_bytes"] - one["tx_bytes"]) / extra)
    out[f"chain_txs_per_round_{n_nodes}"] = round((three["txs"] - one["txs"]) / extra)
    out[f"audit_coverage_{n_nodes}"] = min(one["audit_coverage"], three["audit_coverage"])
    out[f"sim_cpu_s_{n_nodes}_rounds_1"] = round(one["cpu_s"], 3)
    out[f"sim_cpu_s_{n_nodes}_rounds_3"] = round(three["cpu_s"], 3)


# -- real nodes ------------------------------------------------------------------------------

def nodes_pending() -> str | None:
    """Why node processes cannot run the rounds yet, or None when they can."""
    if not (ROOT / "tasknet_node" / "tasks_extension.py").is_file():
        return "pending: tasknet_node/tasks_extension.py does not exist yet"
    done = subprocess.run([sys.executable, str(NODE_SCRIPT), "--help"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    missing = [flag for flag in ("--ledger", "--no-tasks", "--round-time", "--builtin-tasks")
               if flag not in done.stdout]
    return f"pending: node.py has no {', '.join(missing)}" if missing else None


@dataclass
class NodeProc:
    name: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    hello_rounds: list[int] = field(default_factory=list)
    hello_lines: list[str] = field(default_factory=list)

    def read_rounds(self) -> None:
        """Note the rounds of the hello lines the node printed since the last call."""
        assert self.log is not None
        while line := self.log.readline():
            if not line.endswith(b"\n"):  # half written: read it whole next time
                self.log.seek(-len(line), os.SEEK_CUR)
                return
            text = line.decode(errors="replace").strip()
            match = ROUND_LINE.match(text)
            if match:
                self.hello_rounds.append(int(match.group(1)))
                self.hello_lines.append(text)

    def cpu_s(self) -> float:
        from tasknet_node.procstats import parse_cpu_seconds

        assert self.process is not None
        return parse_cpu_seconds(Path(f"/proc/{self.process.pid}/stat").read_text(),
                                 os.sysconf("SC_CLK_TCK"))

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines() if (
            self.log_path.exists()) else []
        return f"--- {self.name} ---\n" + "\n".join(text[-lines:])


class Nodes:
    """node.py processes under one dir; `stop_all` stops every one of them."""

    def __init__(self, root: Path, ledger_dir: Path, round_time: int) -> None:
        self.nodes = [NodeProc(f"node{i}", root / f"node{i}", root / f"node{i}.log")
                      for i in range(3)]
        self.ledger_dir, self.round_time = ledger_dir, round_time

    def start_all(self, tasks: tuple[str, ...]) -> None:
        """The bootstrap (creating the built-in `tasks`; none: --no-tasks), then the others
        joining it, each until its API answers."""
        extra = (["--ledger", str(self.ledger_dir), "--round-time", str(self.round_time)]
                 if tasks else ["--ledger", str(self.ledger_dir), "--no-tasks"])
        bootstrap = self.nodes[0]
        chosen = ["--builtin-tasks", ",".join(tasks)] if tasks else []
        self._start(bootstrap, ["--bootstrap", *extra, *chosen])
        addr = self._status(bootstrap)["addrs"][0]
        for node in self.nodes[1:]:
            self._start(node, ["--join", addr, *extra])

    def _start(self, node: NodeProc, args: list[str]) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        with open(node.log_path, "ab") as log:
            start = log.tell()
            node.process = subprocess.Popen(
                [sys.executable, str(NODE_SCRIPT), *args, "--data-dir", str(node.data_dir),
                 "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        node.log = open(node.log_path, "rb")  # noqa: SIM115 (closed by stop_all)
        node.log.seek(start)
        node.hello_rounds, node.hello_lines = [], []
        self._status(node)

    def _status(self, node: NodeProc) -> dict[str, Any]:
        """The node's /status, waiting until its API answers."""
        import httpx

        from tasknet_node.datadir import DataDirError, read_api_info

        assert node.process is not None
        deadline = time.monotonic() + NODE_READY_S
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"{node.name} exited with code {node.process.returncode}")
            try:
                info = read_api_info(node.data_dir)
                if info.pid == node.process.pid:
                    return httpx.get(f"{info.url}/status", timeout=10).json()
            except (DataDirError, httpx.HTTPError):
                pass
            time.sleep(NODE_POLL_S)
        raise RuntimeError(f"{node.name}'s API did not answer within {NODE_READY_S:g}s")

    def wait_rounds(self, count: int, seconds: float) -> None:
        """Until every node has printed `count` more hello round lines."""
        for node in self.nodes:
            node.read_rounds()
        targets = [len(node.hello_rounds) + count for node in self.nodes]
        deadline = time.monotonic() + seconds
        while True:
            for node in self.nodes:
                node.read_rounds()
                if node.process is None or node.process.poll() is not None:
                    raise RuntimeError(f"{node.name} exited")
            if all(len(n.hello_rounds) >= t for n, t in zip(self.nodes, targets, strict=True)):
                return
            if time.monotonic() >= deadline:
                seen = [len(n.hello_rounds) for n in self.nodes]
                raise RuntimeError(f"hello round lines {seen}, wanted {targets}, "
                                   f"within {seconds:g}s")
            time.sleep(NODE_POLL_S)

    def stop_all(self) -> None:
        """SIGTERM every running node, then kill those still up after NODE_STOP_S."""
        running = [n for n in self.nodes if n.process is not None]
        for node in running:
            assert node.process is not None
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + NODE_STOP_S
        for node in running:
            assert node.process is not None
            try:
                node.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _stop(node.process)
            node.process = None
            if node.log is not None:
                node.log.close()
                node.log = None


@contextlib.contextmanager
def _network(root: Path, label: str, tasks: tuple[str, ...],
             round_time: int) -> Iterator[Nodes]:
    """A 3-node network on a new ledger running the built-in `tasks` (none: --no-tasks);
    stopped on the way out, the nodes' last lines printed first if the block failed."""
    nodes = Nodes(root / f"nodes-{label}", root / f"nodes-{label}" / "ledger", round_time)
    try:
        nodes.start_all(tasks)
        yield nodes
    except BaseException:
        print("\n".join(n.tail() for n in nodes.nodes), file=sys.stderr)
        raise
    finally:
        nodes.stop_all()


def _busy_phase(root: Path, tasks: tuple[str, ...], round_time: int,
                rounds: int) -> dict[str, Any]:
    """Each node's CPU over `rounds` rounds of the built-in `tasks`, on a new ledger."""
    with _network(root, "+".join(tasks), tasks, round_time) as nodes:
        # warm-up: staking and the first rounds' settlement, until each node's second line
        nodes.wait_rounds(2, round_time * 12 + NODE_READY_S)
        before = [n.cpu_s() for n in nodes.nodes]
        counted = [len(n.hello_rounds) for n in nodes.nodes]
        started = time.monotonic()
        nodes.wait_rounds(rounds, round_time * (rounds + 4))
        busy = [n.cpu_s() - b for n, b in zip(nodes.nodes, before, strict=True)]
        wall = time.monotonic() - started
        return {
            "busy": busy, "wall": wall,
            "done": [len(n.hello_rounds) - c for n, c in zip(nodes.nodes, counted, strict=True)],
            "submitted": [sum("submitted" in line for line in n.hello_lines[c:])
                          for n, c in zip(nodes.nodes, counted, strict=True)],
            "last_line": nodes.nodes[0].hello_lines[-1],
        }


def _idle_cpu(root: Path, round_time: int, wall: float) -> list[float]:
    """Each node's CPU over `wall` seconds of a network without task rounds."""
    with _network(root, "idle", (), round_time) as nodes:
        time.sleep(min(2.0, wall))  # past the start-up work
        before = [n.cpu_s() for n in nodes.nodes]
        time.sleep(wall)
        return [n.cpu_s() - b for n, b in zip(nodes.nodes, before, strict=True)]


def measure_nodes(root: Path, round_time: int, rounds: int, out: dict[str, Any]) -> None:
    """round_overhead_ms (hello alone, as the target is set), the same with both built-in
    tasks (round_overhead_ms_hello_storage), and their parts into `out`."""
    hello = _busy_phase(root, ("hello",), round_time, rounds)
    both = _busy_phase(root, ("hello", "storage"), round_time, rounds)
    idle_wall = max(hello["wall"], both["wall"])
    idle = _idle_cpu(root, round_time, idle_wall)

    def per_node(phase: dict[str, Any]) -> list[float]:
        # idle CPU scaled to the phase's own wall time
        return [1000 * (b - i * phase["wall"] / idle_wall) / k
                for b, i, k in zip(phase["busy"], idle, phase["done"], strict=True)]

    for key, phase in (("round_overhead_ms", hello),
                       ("round_overhead_ms_hello_storage", both)):
        values = per_node(phase)
        out[key] = round(sum(values) / len(values), 1)
        out[f"{key}_per_node"] = [round(v, 1) for v in values]
    out.update({
        "round_time_s": round_time, "overhead_rounds": hello["done"],
        "overhead_wall_s": round(hello["wall"], 2),
        "node_cpu_s_tasks": [round(v, 3) for v in hello["busy"]],
        "node_cpu_s_hello_storage": [round(v, 3) for v in both["busy"]],
        "node_cpu_s_idle": [round(v, 3) for v in idle], "idle_wall_s": round(idle_wall, 2),
        "overhead_rounds_submitted": hello["submitted"],
        "overhead_last_hello_line": hello["last_line"],
    })


# -- main ------------------------------------------------------------------------------------

PROFILES = {  # --quick, full size
    "ledger_s": (0.5, 3.0), "ledger_tx": (100, 20_000), "repeats": (1, 2),
    "sim_nodes": ("20,50", "1000,10000"), "round_time": (2, 3), "rounds": (2, 8),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark task rounds: the embedded ledger against raw SQLite, the "
        "simulated network's CPU and chain bytes per round, a node's CPU per round. Prints "
        "one JSON line; see the header of this file for the method.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--no-nodes", action="store_true", help="leave out the node processes")
    parser.add_argument("--writers", type=int, default=5, help="writer processes (5)")
    parser.add_argument("--ledger-s", type=float, help="seconds each writer phase runs (3)")
    parser.add_argument("--ledger-tx", type=int, help="at most this many tx per writer (20000)")
    parser.add_argument("--repeats", type=int, help="ledger and raw phases, alternating (2)")
    parser.add_argument("--sim-nodes", help="simulated network sizes (1000,10000)")
    parser.add_argument("--round-time", type=int, help="node round time in seconds (3)")
    parser.add_argument("--rounds", type=int, help="node rounds measured (8)")
    parser.add_argument("--worker", choices=("ledger", "raw", "sim"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--row-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, profile in PROFILES.items():
        if getattr(args, name) is None:
            setattr(args, name, profile[0 if args.quick else 1])
    try:
        args.sim_sizes = [int(n) for n in str(args.sim_nodes).split(",") if n]
    except ValueError:
        parser.error(f"--sim-nodes: numbers separated by commas, got {args.sim_nodes!r}")
    if min([args.writers, args.ledger_tx, args.repeats, args.round_time, args.rounds,
            *args.sim_sizes]) < 1 or args.ledger_s <= 0:
        parser.error("sizes and times must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker == "sim":
        sim_worker(args.sim_sizes[0])
        return 0
    if args.worker is not None:
        worker(args.worker, args.path, args.ledger_s, args.ledger_tx, args.row_bytes)
        return 0
    out: dict[str, Any] = {"bench": "rounds", "sim_sizes": args.sim_sizes,
                           "loadavg_1m_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="tasknet-bench-rounds-",
                                     ignore_cleanup_errors=True) as tmp:
        root = Path(tmp)
        steps: list[tuple[str, Any]] = [
            ("ledger", lambda: measure_ledger(root, args.writers, args.ledger_s,
                                              args.ledger_tx, args.repeats, out)),
            *[(f"simulate {n}", lambda n=n: measure_simulation(n, out))
              for n in args.sim_sizes],
        ]
        if args.no_nodes:
            out["round_overhead_ms"] = None
            out["round_overhead_note"] = "not measured (--no-nodes)"
        elif (pending := nodes_pending()) is not None:
            out["round_overhead_ms"] = None
            out["round_overhead_note"] = pending
        else:
            steps.append(("nodes", lambda: measure_nodes(root, args.round_time, args.rounds,
                                                         out)))
        error = run_steps(steps)
        if error is not None and error.startswith("nodes:"):
            out["round_overhead_ms"] = None
    out["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return finish("rounds", out, error)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
