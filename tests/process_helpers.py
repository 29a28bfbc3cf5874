# Helpers for tests that run `node.py` as real processes (on 127.0.0.1, or inside a network
# namespace through a command prefix: tests/netns_helpers.py): starting them with their
# output in files, reading their start line and /status, polling with a deadline, and
# killing every one of them at teardown.
from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from tasknet_node import datadir

ROOT = Path(__file__).resolve().parent.parent
NODE = str(ROOT / "node.py")
ANNOUNCE = re.compile(r"^tasknet node (\S+) listening on (\S+)$", re.M)


class NodeProcess:
    """One `node.py` process, its data dir and its output files."""

    def __init__(self, proc: subprocess.Popen, data_dir: Path, out: Path, err: Path) -> None:
        self.proc, self.data_dir, self.out, self.err = proc, data_dir, out, err

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def announced(self) -> tuple[str, str] | None:
        """(peer id, first dialable address) from the node's start line, once printed."""
        match = ANNOUNCE.search(self.stdout())
        return (match.group(1), match.group(2)) if match else None

    def peer_id(self) -> str | None:
        announced = self.announced()
        return announced[0] if announced else None

    def status(self) -> dict[str, Any] | None:
        """/status through the API address in api.json; None while it is not up."""
        try:
            info = datadir.read_api_info(self.data_dir)
            with urllib.request.urlopen(info.url + "/status", timeout=3) as response:
                value: dict[str, Any] = json.loads(response.read())
                return value
        except (datadir.DataDirError, OSError, ValueError):
            return None

    def states(self) -> dict[str, str]:
        status = self.status()
        return {m["peer_id"]: m["state"] for m in status["members"]} if status else {}

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        """`node.py <args> --data-dir <this node's dir>`, its output captured as text."""
        return subprocess.run([sys.executable, NODE, *args, "--data-dir", str(self.data_dir)],
                              capture_output=True, text=True, timeout=60, check=check)


N = TypeVar("N", bound=NodeProcess)


class Processes(Generic[N]):
    """Every process a test started, so that teardown kills them all."""

    def __init__(self, base: Path, node_class: type[N]) -> None:
        self.base = base
        self.node_class = node_class
        self.started: list[subprocess.Popen] = []

    def spawn(self, name: str, *args: str,
              prefix: Sequence[str] = ()) -> tuple[subprocess.Popen, Path, Path]:
        """Python running `args`; `prefix` goes before it (such as `ip netns exec NS`, which
        execs, so the process is Python itself and signals reach it)."""
        out, err = self.base / f"{name}.out", self.base / f"{name}.err"
        with out.open("a") as stdout, err.open("a") as stderr:
            proc = subprocess.Popen([*prefix, sys.executable, *args], stdin=subprocess.DEVNULL,
                                    stdout=stdout, stderr=stderr, cwd=self.base)
        self.started.append(proc)
        return proc, out, err

    def node(self, name: str, *args: str, data_dir: Path | None = None,
             prefix: Sequence[str] = ()) -> N:
        data_dir = data_dir or self.base / name
        proc, out, err = self.spawn(name, NODE, "--data-dir", str(data_dir), *args,
                                    prefix=prefix)
        return self.node_class(proc, data_dir, out, err)

    def kill_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()  # SIGKILL also ends a process stopped with SIGSTOP
            proc.wait()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something true (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def processes_fixture(node_class: type[N]) -> Callable[[Path], Iterator[Processes[N]]]:
    """A `processes` fixture whose nodes are `node_class`; every process it started is
    killed at teardown, whatever happened in the test."""
    @pytest.fixture
    def processes(tmp_path: Path) -> Iterator[Processes[N]]:
        procs = Processes(tmp_path, node_class)
        try:
            yield procs
        finally:
            procs.kill_all()
    return processes


def wait_for_everyone(nodes: Sequence[NodeProcess], timeout: float) -> None:
    """Until every node lists every other alive and has them all in its KV ring."""
    everyone = {n.peer_id(): "alive" for n in nodes}

    def ready() -> bool:
        for node in nodes:
            status = node.status()
            if status is None or status["kv"]["ring_members"] != len(nodes) or \
                    {m["peer_id"]: m["state"] for m in status["members"]} != everyone:
                return False
        return True

    wait_for(ready, timeout, "every node alive and in every node's ring")


class JsonApi:
    """HTTP + JSON to one node's control API over a kept-alive connection (make one per
    thread). `address` is (host, port), or the node's data dir (its api.json, read on the
    first call)."""

    def __init__(self, address: tuple[str, int] | Path, timeout: float = 20) -> None:
        self.address, self.timeout = address, timeout
        self._conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, body: Any = None,
             content_type: str = "application/json") -> tuple[int, Any]:
        """(HTTP status, JSON answer); OSError (ConnectionRefusedError, TimeoutError, ...)
        when the node cannot be reached or does not answer in time."""
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"content-type": content_type} if data is not None else {}
        if self._conn is None:
            if isinstance(self.address, Path):
                info = datadir.read_api_info(self.address)
                host, port = info.host, info.port
            else:
                host, port = self.address
            self._conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            self._conn.request(method, path, body=data, headers=headers)
            response = self._conn.getresponse()
            return response.status, json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.close()
            if isinstance(exc, OSError):
                raise
            raise OSError(f"{method} {path}: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def ledger_state(ledger_dir: Path) -> Any:
    """The chain state of the embedded ledger in `ledger_dir`, read afresh (a ChainState)."""
    from chain.ledger import LEDGER_FILE_NAME, Ledger

    with Ledger.open(ledger_dir / LEDGER_FILE_NAME) as ledger:
        return ledger.state


def boot_on_ledger(processes: Processes[NodeProcess], ledger_dir: Path,
                   *flags: str) -> tuple[NodeProcess, str, tuple[str, ...]]:
    """A bootstrap node `n0` on the embedded ledger in `ledger_dir` (with `flags`, and 0.5 s
    heartbeats), started: (the node, the address to join, the flags the others start with)."""
    common = ("--ledger", str(ledger_dir), *flags, "--heartbeat-interval", "0.5")
    boot = processes.node("n0", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", *common)
    _, addr = wait_for(boot.announced, 30, "the bootstrap node to start")
    return boot, addr, common
