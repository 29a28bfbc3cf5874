# A local anvil (Foundry's EVM node) as a subprocess, for tests, benchmarks and the localnet
# script: the pinned binary from chain/evm/node_modules (`npm ci --prefix chain/evm`), started
# on 127.0.0.1 on a free port, waited for until it answers, stopped for sure; and anvil's
# deterministic dev accounts (derived from its default mnemonic).
# Lives here: finding the binary, choosing ports, the process's lifetime, the dev keys.
# Must not live here: JSON-RPC beyond the readiness probe (client.py), anything about the
# contract, and any use of a system-wide or `npx` anvil (only the pinned binary is used).
from __future__ import annotations

import http.client
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import IO, Self

EVM_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"
DEFAULT_MNEMONIC = "test test test test test test test test test test test junk"
DEFAULT_CHAIN_ID = 31337
DEFAULT_ACCOUNTS = 10
DEFAULT_BALANCE_ETH = 10_000
START_ATTEMPTS = 5  # ports tried when another process takes the chosen port first
_PLATFORMS = {"x86_64": "linux-amd64", "amd64": "linux-amd64", "aarch64": "linux-arm64",
              "arm64": "linux-arm64"}  # fmt: skip


class AnvilError(Exception):
    """anvil is missing, did not start, or died."""


def find_anvil() -> Path:
    """The pinned anvil binary installed by `npm ci --prefix chain/evm`."""
    machine = platform.machine().lower()
    plat = _PLATFORMS.get(machine)
    if plat is None or platform.system() != "Linux":
        raise AnvilError(f"no pinned anvil for {platform.system()} {machine}")
    path = EVM_DIR / "node_modules" / "@foundry-rs" / f"anvil-{plat}" / "bin" / "anvil"
    if not path.is_file():
        raise AnvilError(
            f"anvil is not installed ({path} is missing): "
            "run bash scripts/setup (npm ci --prefix chain/evm)"
        )
    if not os.access(path, os.X_OK):
        raise AnvilError(f"{path} is not executable: run bash scripts/setup")
    return path


@lru_cache(maxsize=8)
def dev_keys(count: int = DEFAULT_ACCOUNTS, mnemonic: str = DEFAULT_MNEMONIC) -> tuple[bytes, ...]:
    """The private keys of anvil's first `count` dev accounts (BIP-44 m/44'/60'/0'/0/i of the
    mnemonic anvil starts with by default). LOCAL ONLY: these keys are public knowledge."""
    from eth_account.hdaccount import key_from_seed, seed_from_mnemonic

    seed = seed_from_mnemonic(mnemonic, "")
    return tuple(key_from_seed(seed, f"m/44'/60'/0'/0/{i}") for i in range(count))


def _ephemeral_low() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _candidate_port(rng: random.Random) -> int:
    """A port free right now, below the kernel's ephemeral range when that leaves room (so an
    outgoing connection's local port cannot take it between the check and anvil's bind)."""
    low = _ephemeral_low()
    for _ in range(50):
        port = rng.randrange(20000, low) if low > 21000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise AnvilError("found no free port to start anvil on")


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: anvil dumps its state (--state) and exits
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Anvil:
    """One anvil process on 127.0.0.1. `start()` (or `with Anvil(...) as a:`) returns once it
    answers eth_chainId; `stop()` is idempotent and also runs when the object is collected
    or the interpreter exits. Started from the main thread, anvil also gets SIGKILL when this
    process dies (setpriv --pdeathsig), so a killed test run leaves no anvil behind.

    block_time: seconds between blocks, None to mine each transaction at once (automine).
    state_path: a state file to load at start (if it exists) and dump at stop (and every
    `state_interval` whole seconds)."""

    def __init__(
        self,
        *,
        block_time: float | None = None,
        chain_id: int = DEFAULT_CHAIN_ID,
        accounts: int = DEFAULT_ACCOUNTS,
        balance_eth: int = DEFAULT_BALANCE_ETH,
        state_path: Path | None = None,
        state_interval: int | None = None,
        port: int | None = None,
        start_timeout: float = 20.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        if block_time is not None and block_time <= 0:
            raise ValueError("block_time must be positive (None for automine)")
        if state_interval is not None and (state_path is None or state_interval < 1):
            raise ValueError("state_interval is whole seconds (>= 1) and needs a state_path")
        self.block_time = block_time
        self.chain_id = chain_id
        self.accounts = accounts
        self.balance_eth = balance_eth
        self.state_path = state_path
        self.state_interval = state_interval
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)
        self._fixed_port = port
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None  # anvil's output: an unnamed file, nothing to clean
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], float], Anvil] | None = None

    # --- lifetime ---------------------------------------------------------------------------

    def start(self) -> Self:
        if self._proc is not None:
            raise AnvilError("anvil is already started")
        binary = find_anvil()
        rng = random.Random()
        last = ""
        for _ in range(1 if self._fixed_port else START_ATTEMPTS):
            port = self._fixed_port or _candidate_port(rng)
            try:
                if self._launch(binary, port):
                    return self
            except BaseException:
                self.stop()
                raise
            last = self._log_tail()  # the port was taken meanwhile: try another
        self.stop()
        raise AnvilError(f"anvil could not bind a port in {START_ATTEMPTS} attempts: {last}")

    def _launch(self, binary: Path, port: int) -> bool:
        """Start anvil on `port` and wait until it answers; False when the port was taken."""
        args = [str(binary), "--host", HOST, "--port", str(port), "--quiet",
                "--chain-id", str(self.chain_id), "--accounts", str(self.accounts),
                "--balance", str(self.balance_eth)]  # fmt: skip
        if self.block_time is not None:
            args += ["--block-time", _seconds(self.block_time)]
        if self.state_path is not None:
            args += ["--state", str(self.state_path)]
            if self.state_interval is not None:
                args += ["--state-interval", str(int(self.state_interval))]
        args += self.extra_args
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            args = [setpriv, "--pdeathsig", "KILL", "--", *args]
        if self._log is not None:
            self._log.close()
        self._log = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._proc = proc
        self._port = port
        self._finalizer = weakref.finalize(self, _stop_process, proc, 5.0)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                tail = self._log_tail()
                self._forget()
                if "address already in use" in tail.lower() and not self._fixed_port:
                    return False
                raise AnvilError(f"anvil exited with status {proc.returncode}: {tail}")
            if self._answers(port):
                return True
            if time.monotonic() > deadline:
                raise AnvilError(
                    f"anvil did not answer on port {port} within {self.start_timeout} s: "
                    f"{self._log_tail()}"
                )
            time.sleep(0.01)

    def _answers(self, port: int) -> bool:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
        conn = http.client.HTTPConnection(HOST, port, timeout=1.0)
        try:
            conn.request("POST", "/", body, {"Content-Type": "application/json"})
            reply = json.loads(conn.getresponse().read())
        except (OSError, http.client.HTTPException, ValueError):
            return False
        finally:
            conn.close()
        return isinstance(reply, dict) and "result" in reply

    def stop(self, timeout: float = 5.0) -> None:
        """Stop anvil (SIGTERM, so a state file is dumped; SIGKILL after `timeout`)."""
        proc = self._proc
        if proc is not None:
            _stop_process(proc, timeout)
            self._forget()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = None
        self._proc = None
        self._port = None

    def kill(self) -> None:
        """SIGKILL anvil (a crash: no state dump). For tests of an unreachable chain."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
        self.stop()

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- views ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        return self._require().pid

    @property
    def port(self) -> int:
        self._require()
        assert self._port is not None
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def dev_keys(self) -> tuple[bytes, ...]:
        """The private keys of this anvil's funded dev accounts (LOCAL ONLY)."""
        return dev_keys(self.accounts)

    def _require(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise AnvilError("anvil is not running")
        return self._proc

    def _log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return "(no output)"
        try:  # pread: the file offset is shared with anvil, which may still be writing
            fd = self._log.fileno()
            size = os.fstat(fd).st_size
            data = os.pread(fd, limit, max(0, size - limit))
        except OSError:
            return "(no output)"
        text = data.decode("utf-8", "replace").strip()
        return text or "(no output)"


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
