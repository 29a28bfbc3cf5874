# `node.py localnet up|status|down`: a whole local testnet on 127.0.0.1 from one command.
# `up` creates N data dirs and their keys (so an allowlist can name every peer), writes
# DIR/testnet.toml ([bootstrap_node], [chain], [admission]), starts the chain process where
# one is needed (anvil, kept by a small detached keeper process: `python -m
# tasknet_node.localnet --keep-chain DIR`), deploys and funds through evm_localnet's code,
# starts every node as a detached process (own session, log and pid file in its data dir) and
# waits until each node sees every other alive. `status` reports on them; `down` stops them
# all (SIGTERM, then SIGKILL past a deadline) and is safe to repeat.
# Lives here: that orchestration, the pid files and the checks that a pid still is ours.
# Must not live here: node logic (runner.py), argument wiring of the other commands (cli.py),
# chain logic (chain/evm); nothing here imports libp2p or trio at module level.
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from .client import NodeUnreachable, get_json
from .datadir import API_FILE, NODE_FILE, DataDirError, read_api_info, read_json, write_json
from .errors import NodeError, UsageError

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "node.py"
PROG = "node.py localnet"
MANIFEST = "localnet.json"
TESTNET_FILE = "testnet.toml"
NODE_PID = "node.pid"
NODE_LOG = "node.log"
CHAIN_PID = "chain.pid"
CHAIN_FILE = "chain.json"  # written by the keeper: anvil's url and pid
CHAIN_LOG = "chain.log"
NETWORK_ID = "tasknet-localnet"
UP_TIMEOUT_S = 90.0  # for every node to see every other alive
CHAIN_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0  # nodes stop in under 2 s (runner.py); anvil dumps its state
POLL_S = 0.2
MAX_NODES = 32
EXIT_INTERRUPTED = 130  # as a shell reports a process that SIGINT ended

Say = Callable[[str], None]


class LocalnetError(NodeError):
    """The localnet could not be started, or its directory does not hold one."""


def say_line(line: str) -> None:
    print(line, flush=True)


# --- the command line ------------------------------------------------------------------------

def parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser
           ) -> argparse.ArgumentParser:
    top = parser_class(prog=PROG, description="a whole local testnet on 127.0.0.1: "
                       "'up' starts it, 'status' reports on it, 'down' stops it")
    commands = top.add_subparsers(dest="command", required=True, metavar="up|status|down",
                                  parser_class=parser_class)
    up = commands.add_parser("up", help="start N nodes (and the chain process they settle "
                             "on) in the background and wait until each sees every other")
    up.add_argument("--nodes", type=_node_count, required=True, metavar="N",
                    help=f"how many nodes (1-{MAX_NODES}); node0 is the bootstrap node")
    up.add_argument("--chain", choices=("ledger", "evm"), default="ledger",
                    help="where task rounds settle: the embedded ledger in DIR/ledger "
                    "(default), or a TaskSettlement contract on an anvil this command starts")
    up.add_argument("--dir", type=Path, metavar="DIR",
                    help="where the nodes' data dirs, logs, pid files and the testnet file "
                    "live (default ./data/localnet-N)")
    up.add_argument("--admission", choices=("open", "allowlist"), default="open",
                    help="who may join: anyone (default) or exactly these N nodes")
    up.add_argument("--base-port", type=_port, metavar="P",
                    help="node i listens on tcp/P+i (default: any free ports)")
    for name, text in (("status", "show each node (running, peer id, alive members seen, "
                        "API url) and the chain process"),
                       ("down", "stop every node and the chain process (SIGTERM, SIGKILL "
                        "after a deadline); safe to repeat")):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--dir", type=Path, metavar="DIR",
                         help="the localnet's directory (default: the one ./data/localnet-* "
                         "holding a localnet)")
    return top


def _node_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_NODES:
        raise argparse.ArgumentTypeError(f"must be a whole number 1-{MAX_NODES}: {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1024 <= int(text) <= 65535 - MAX_NODES:
        raise argparse.ArgumentTypeError(f"must be a port 1024-{65535 - MAX_NODES}: {text!r}")
    return int(text)


def main(argv: list[str], parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
         say: Say = say_line) -> int:
    args = parser(parser_class).parse_args(argv)
    if args.command == "up":
        base = args.dir or Path(f"data/localnet-{args.nodes}")
        return up(base.resolve(), args.nodes, chain=args.chain, admission=args.admission,
                  base_port=args.base_port, say=say)
    base = (args.dir or _default_dir()).resolve()
    if args.command == "status":
        return status(base, say)
    return down(base, say)


def _default_dir() -> Path:
    found = sorted(p.parent for p in Path("data").glob(f"localnet-*/{MANIFEST}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise LocalnetError("no localnet in ./data/localnet-*: give --dir DIR")
    raise LocalnetError(f"several localnets ({', '.join(map(str, found))}): give --dir DIR")


# --- processes and pid files -----------------------------------------------------------------

def _running(pid: int, marker: str) -> bool:
    """Whether `pid` is a live process whose command line holds `marker` (so that a pid
    the system gave to another program since is never taken for ours)."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # not ours
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            "utf-8", "replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc to tell: trust the pid
    return state != "Z" and marker in cmdline


def _reap(pid: int) -> None:
    """Collect `pid`'s exit status if it is a child of this process (started by `up` in this
    same run), so that a stopped node does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class Recorded:
    """A process `up` started, as its pid file tells: `marker` is in its command line."""

    label: str
    pid_file: Path
    pid: int | None
    marker: str

    @property
    def running(self) -> bool:
        return self.pid is not None and _running(self.pid, self.marker)


def _node_dirs(base: Path) -> list[Path]:
    """The node data dirs of the localnet in `base`: the manifest's, and any with a pid file
    (a run that stopped before it wrote the manifest)."""
    dirs = {p.parent for p in base.glob(f"node*/{NODE_PID}")}
    try:
        dirs.update(base / name for name in read_json(base / MANIFEST).get("nodes", []))
    except (FileNotFoundError, DataDirError):
        pass
    return sorted(dirs, key=lambda d: (len(d.name), d.name))


def _recorded(base: Path) -> Iterator[Recorded]:
    for data_dir in _node_dirs(base):
        pid_file = data_dir / NODE_PID
        if pid_file.exists():
            yield Recorded(data_dir.name, pid_file, _read_pid(pid_file), str(data_dir))
    chain_pid = base / CHAIN_PID
    if chain_pid.exists():
        yield Recorded("chain", chain_pid, _read_pid(chain_pid), str(base))


def _spawn(command: list[str], log: Path, pid_file: Path) -> subprocess.Popen[bytes]:
    """Start `command` detached (a session of its own: a Ctrl-C in this terminal does not
    reach it, and it outlives this process), its output in `log`, its pid in `pid_file`."""
    with log.open("wb") as out, _interrupts_deferred():  # never a process without pid file
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        pid_file.write_text(f"{proc.pid}\n")
    return proc


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM that arrives inside the block until its end (then raise
    KeyboardInterrupt). The started process does not inherit this: exec resets handlers."""
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _: held.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if held:
        raise KeyboardInterrupt


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"


# --- up --------------------------------------------------------------------------------------

def up(base: Path, nodes: int, *, chain: str = "ledger", admission: str = "open",
       base_port: int | None = None, say: Say = say_line) -> int:
    running = [r for r in _recorded(base) if r.running]
    if running:
        raise UsageError(f"the localnet in {base} is already running ("
                         + ", ".join(f"{r.label} pid {r.pid}" for r in running)
                         + f"); stop it first: {PROG} down --dir {base}")
    for stale in _recorded(base):
        stale.pid_file.unlink(missing_ok=True)
        say(f"removed a stale pid file: {stale.pid_file} (pid {stale.pid} is not running)")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _up(base, nodes, chain, admission, base_port, say)
    except BaseException as exc:
        # stop what was started; a second Ctrl-C must not cut that short (down has deadlines)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        interrupted = isinstance(exc, KeyboardInterrupt)
        tell = _never_failing(say)  # the output may be what failed (a closed pipe)
        tell(("interrupted" if interrupted else "failed") + ": stopping what was started")
        down(base, tell)
        if interrupted:
            return EXIT_INTERRUPTED
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous)


def _never_failing(say: Say) -> Say:
    def tell(line: str) -> None:
        try:
            say(line)
        except OSError:
            pass
    return tell


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _up(base: Path, nodes: int, chain: str, admission: str, base_port: int | None,
        say: Say) -> int:
    from p2p.identity import IdentityError, load_or_create_identity

    base.mkdir(parents=True, exist_ok=True)
    dirs = [base / f"node{i}" for i in range(nodes)]
    peers: list[str] = []
    for data_dir in dirs:
        data_dir.mkdir(mode=0o700, exist_ok=True)
        try:
            peers.append(str(load_or_create_identity(data_dir).peer_id))
        except IdentityError as exc:
            raise LocalnetError(str(exc)) from None
        for runtime_file in (NODE_FILE, API_FILE):  # a killed run's: rewritten at start
            (data_dir / runtime_file).unlink(missing_ok=True)
    write_json(base / MANIFEST, {"nodes": [d.name for d in dirs], "chain": chain,
                                 "admission": admission, "peers": peers})
    say(f"localnet in {base}: {nodes} node(s), chain {chain}, admission {admission}")

    url = contract = None
    if chain == "evm":
        url, contract = _start_evm(base, dirs, say)
    listen = [f"/ip4/127.0.0.1/tcp/{base_port + i if base_port else 0}" for i in range(nodes)]
    testnet = _write_testnet(base, dirs[0], listen[0], url, contract,
                             peers if admission == "allowlist" else None)
    say(f"testnet file: {testnet}")

    procs: dict[Path, subprocess.Popen[bytes]] = {}
    for i, data_dir in enumerate(dirs):
        command = [sys.executable, str(NODE), "--testnet", str(testnet),
                   "--data-dir", str(data_dir)]
        command += ["--bootstrap"] if i == 0 else ["--listen", listen[i]]
        procs[data_dir] = _spawn(command, data_dir / NODE_LOG, data_dir / NODE_PID)
        if i == 0:  # the others read its address from its node.json
            _wait(lambda: (dirs[0] / NODE_FILE).exists(), procs, CHAIN_TIMEOUT_S,
                  "the bootstrap node to listen", say)
    say(f"started {nodes} node(s); waiting until each sees every other alive")
    _wait_all_alive(dirs, peers, procs, say)

    for i, (data_dir, peer) in enumerate(zip(dirs, peers, strict=True)):
        api = read_api_info(data_dir).url
        role = " (bootstrap)" if i == 0 else ""
        say(f"{data_dir.name}{role}: {peer}  api {api}  query: python node.py status "
            f"--data-dir {data_dir}")
    where = (f"ledger {base / 'ledger'}" if chain == "ledger"
             else f"anvil {url}, TaskSettlement {contract}")
    say(f"localnet up: {nodes} node(s) on 127.0.0.1, network {NETWORK_ID}, {where}, "
        f"admission {admission}; stop: python {PROG} down --dir {base}")
    return 0


def _write_testnet(base: Path, bootstrap_dir: Path, bootstrap_listen: str, url: str | None,
                   contract: str | None, allow: list[str] | None) -> Path:
    lines = [f"# written by `{PROG} up`: a localnet whose nodes live in {base}",
             f'network_id = "{NETWORK_ID}"', "bootstrap = []", "",
             "[bootstrap_node]", f"data_dir = {json.dumps(str(bootstrap_dir))}",
             f'listen = "{bootstrap_listen}"', "", "[chain]"]
    if url is None:
        lines.append('kind = "ledger"')
    else:
        lines += ['kind = "evm"', f'url = "{url}"', f'contract = "{contract}"']
    lines += ["", "[admission]"]
    if allow is None:
        lines.append('rule = "open"')
    else:
        lines += ['rule = "allowlist"', f"peers = {json.dumps(allow)}"]
    path = base / TESTNET_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def _wait(condition: Callable[[], bool], procs: dict[Path, subprocess.Popen[bytes]],
          timeout: float, what: str, say: Say) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        _check_exited(procs, say)
        if time.monotonic() > deadline:
            raise LocalnetError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL_S)


def _check_exited(procs: dict[Path, subprocess.Popen[bytes]], say: Say) -> None:
    for data_dir, proc in procs.items():
        if proc.poll() is not None:
            say(f"{data_dir.name} exited with status {proc.returncode}; the end of "
                f"{data_dir / NODE_LOG}:")
            say(_tail(data_dir / NODE_LOG))
            raise LocalnetError(f"{data_dir.name} exited with status {proc.returncode} "
                                f"(log: {data_dir / NODE_LOG})")


def _alive_seen(data_dir: Path) -> set[str] | None:
    """The peer ids `data_dir`'s node reports alive, itself included; None while its API
    does not answer."""
    try:
        status = get_json(data_dir, "/status")
    except (NodeUnreachable, ValueError):
        return None
    if not isinstance(status, dict):
        return None
    alive = {str(m.get("peer_id")) for m in status.get("members", [])
             if isinstance(m, dict) and m.get("state") == "alive"}
    return alive | {str(status.get("peer_id"))}


def _wait_all_alive(dirs: list[Path], peers: list[str],
                    procs: dict[Path, subprocess.Popen[bytes]], say: Say) -> None:
    everyone = set(peers)
    deadline = time.monotonic() + UP_TIMEOUT_S
    shown = ""
    while True:
        seen = {d: _alive_seen(d) for d in dirs}
        answering = sum(1 for s in seen.values() if s is not None)
        complete = [d for d, s in seen.items() if s is not None and everyone <= s]
        line = (f"{answering}/{len(dirs)} nodes alive, {len(complete)}/{len(dirs)} see "
                "every node")
        if line != shown:
            say(line)
            shown = line
        if len(complete) == len(dirs):
            return
        _check_exited(procs, say)
        if time.monotonic() > deadline:
            late = next(d for d in dirs if d not in complete)
            seen_late = seen[late]
            what = ("its API never answered" if seen_late is None
                    else f"it sees {len(seen_late & everyone)}/{len(dirs)} alive")
            say(f"{late.name}: {what}; the end of {late / NODE_LOG}:")
            say(_tail(late / NODE_LOG))
            raise LocalnetError(f"timed out after {UP_TIMEOUT_S:g}s: {late.name} does not see "
                                f"every node alive ({what})")
        time.sleep(POLL_S)


@dataclass(frozen=True)
class _KeptChain:
    """The anvil the keeper process runs, as evm_localnet's deploy and funding want it."""

    url: str

    @property
    def dev_keys(self) -> tuple[bytes, ...]:
        from chain.evm.anvil import dev_keys

        return dev_keys()


def _start_evm(base: Path, dirs: list[Path], say: Say) -> tuple[str, str]:
    """Start the keeper (which starts anvil), deploy TaskSettlement once and fund each
    node's wallet: (anvil's url, the contract's address)."""
    from .evm_localnet import deploy_once, fund_wallets

    (base / CHAIN_FILE).unlink(missing_ok=True)
    keeper = _spawn([sys.executable, "-m", "tasknet_node.localnet", "--keep-chain", str(base)],
                    base / CHAIN_LOG, base / CHAIN_PID)
    deadline = time.monotonic() + CHAIN_TIMEOUT_S
    while not (base / CHAIN_FILE).exists():
        if keeper.poll() is not None or time.monotonic() > deadline:
            say(f"the chain process did not start; the end of {base / CHAIN_LOG}:")
            say(_tail(base / CHAIN_LOG))
            raise LocalnetError(f"anvil did not start (log: {base / CHAIN_LOG})")
        time.sleep(POLL_S)
    chain = _KeptChain(str(read_json(base / CHAIN_FILE)["url"]))
    say(f"anvil: {chain.url} (kept by pid {keeper.pid})")
    contract = deploy_once(chain, base)
    fund_wallets(chain, dirs)
    return chain.url, contract


def keep_chain(base: Path) -> int:
    """The keeper process: run anvil (its state in `base`) until SIGTERM or SIGINT, then stop
    it. anvil dies with the keeper even when the keeper is killed (Anvil's pdeathsig)."""
    from chain.evm.anvil import Anvil

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    anvil = Anvil(state_path=base / "anvil-state.json", state_interval=1)
    anvil.start()
    try:
        write_json(base / CHAIN_FILE, {"url": anvil.url, "anvil_pid": anvil.pid,
                                       "keeper_pid": os.getpid()})
        print(f"anvil {anvil.url} pid {anvil.pid}", flush=True)
        while not stop.wait(POLL_S) and anvil.running:
            pass
        print("stopping anvil" if stop.is_set() else "anvil exited", flush=True)
    finally:
        anvil.stop()
        (base / CHAIN_FILE).unlink(missing_ok=True)
    return 0 if stop.is_set() else 1


# --- status ----------------------------------------------------------------------------------

def _manifest(base: Path) -> dict[str, Any]:
    try:
        return read_json(base / MANIFEST)
    except FileNotFoundError:
        raise LocalnetError(f"no localnet in {base} (no {MANIFEST}; "
                            f"start one with: {PROG} up --nodes N --dir {base})") from None


def status(base: Path, say: Say = say_line) -> int:
    manifest = _manifest(base)
    names = [str(n) for n in manifest.get("nodes", [])]
    peers = [str(p) for p in manifest.get("peers", [])]
    say(f"localnet in {base}: {len(names)} node(s), chain {manifest.get('chain')}, "
        f"admission {manifest.get('admission')}")
    all_running = True
    for i, name in enumerate(names):
        data_dir = base / name
        pid = _read_pid(data_dir / NODE_PID)
        running = pid is not None and _running(pid, str(data_dir))
        all_running &= running
        peer = peers[i] if i < len(peers) else "?"
        if not running:
            say(f"{name}: stopped  {peer}")
            continue
        seen = _alive_seen(data_dir)
        try:
            api = read_api_info(data_dir).url
        except DataDirError:
            api = "(no api.json yet)"
        alive = "API not answering" if seen is None else f"sees {len(seen)} alive"
        say(f"{name}: running (pid {pid})  {peer}  {alive}  api {api}")
    say(_chain_line(base, str(manifest.get("chain"))))
    return 0 if all_running else 1


def _chain_line(base: Path, chain: str) -> str:
    if chain == "ledger":
        return f"chain: ledger {base / 'ledger'} (no process)"
    pid = _read_pid(base / CHAIN_PID)
    if pid is None or not _running(pid, str(base)):
        return "chain: anvil stopped"
    try:
        url = read_json(base / CHAIN_FILE).get("url")
    except (FileNotFoundError, DataDirError):
        url = "(starting)"
    return f"chain: anvil {url} running (keeper pid {pid})"


# --- down ------------------------------------------------------------------------------------

def down(base: Path, say: Say = say_line) -> int:
    recorded = list(_recorded(base))
    anvil_pid = _anvil_pid(base)
    nodes = [r for r in recorded if r.label != "chain"]
    chain = [r for r in recorded if r.label == "chain"]
    stopped = _stop(nodes, say) + _stop(chain, say)
    if anvil_pid is not None and _running(anvil_pid, "anvil"):  # its keeper was killed
        os.kill(anvil_pid, signal.SIGKILL)
        say(f"killed anvil (pid {anvil_pid}), left behind by its keeper")
    (base / CHAIN_FILE).unlink(missing_ok=True)
    for r in recorded:
        r.pid_file.unlink(missing_ok=True)
    say(f"localnet in {base}: " + (f"stopped {', '.join(stopped)}" if stopped
                                   else "nothing was running"))
    return 0


def _anvil_pid(base: Path) -> int | None:
    try:
        pid = read_json(base / CHAIN_FILE).get("anvil_pid")
    except (FileNotFoundError, DataDirError):
        return None
    return pid if isinstance(pid, int) else None


def _stop(recorded: list[Recorded], say: Say) -> list[str]:
    """SIGTERM each running process, wait for all to exit, SIGKILL those still there past
    STOP_TIMEOUT_S. The labels of those that were running."""
    running = [r for r in recorded if r.running]
    for r in running:
        assert r.pid is not None
        try:
            os.kill(r.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    left = running
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [r for r in left if r.running]
    for r in left:
        assert r.pid is not None
        say(f"{r.label} (pid {r.pid}) did not stop within {STOP_TIMEOUT_S:g}s: killing it")
        try:
            os.kill(r.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    kill_deadline = time.monotonic() + STOP_TIMEOUT_S
    while left and time.monotonic() < kill_deadline:
        time.sleep(0.05)
        left = [r for r in left if r.running]
    return [r.label for r in running]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--keep-chain":
        sys.exit(keep_chain(Path(sys.argv[2])))
    sys.exit(main(sys.argv[1:]))
