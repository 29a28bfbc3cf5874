# The network namespace lab (benchmarks/netlab.py, shared with benchmarks/testnet.py) as the
# system tests use it: a pytest fixture that always deletes its lab, and a UDP probe of
# whether packets get from one namespace to another.
# Must not live here: the lab itself (benchmarks/netlab.py), starting nodes
# (tests/process_helpers.py, with `Lab.exec_prefix`).
from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest


def _load_netlab() -> ModuleType:
    """benchmarks/netlab.py by its path (benchmarks/ is not put on sys.path: it holds
    scripts named like the project's packages, crdt.py, which would shadow them)."""
    if "netlab" not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "benchmarks" / "netlab.py"
        spec = importlib.util.spec_from_file_location("netlab", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["netlab"] = module
        spec.loader.exec_module(module)
    return sys.modules["netlab"]


_netlab = _load_netlab()
BRIDGE_HOST, SUBNET_OCTETS = _netlab.BRIDGE_HOST, _netlab.SUBNET_OCTETS
Lab, LabError, remove_leftovers = _netlab.Lab, _netlab.LabError, _netlab.remove_leftovers

__all__ = ["BRIDGE_HOST", "SUBNET_OCTETS", "Lab", "LabError", "lab_fixture", "remove_leftovers",
           "udp_reaches"]


def lab_fixture(size: int):  # type: ignore[no-untyped-def]
    """A `lab` fixture of `size` namespaces, deleted at teardown whatever happened (also
    when creating it failed half-way)."""
    @pytest.fixture
    def lab() -> Iterator[Lab]:
        made = Lab(size)
        try:
            made.create()
            yield made
        finally:
            made.teardown()
    return lab


_RECEIVE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 9999))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    print(s.recv(100).decode(), flush=True)
except TimeoutError:
    print("nothing", flush=True)
"""
_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(b"hello", (sys.argv[1], 9999))
    time.sleep(0.05)
"""


def udp_reaches(lab: Lab, src: int, dst: int, wait_s: float = 0.7) -> bool:
    """Whether a UDP datagram sent from node `src`'s namespace arrives in node `dst`'s (one
    direction only, unlike a TCP connection)."""
    receiver = subprocess.Popen([*lab.exec_prefix(dst), sys.executable, "-c", _RECEIVE,
                                 lab.addrs[dst], str(wait_s)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        subprocess.run([*lab.exec_prefix(src), sys.executable, "-c", _SEND, lab.addrs[dst]],
                       check=True, timeout=30)
        answer = receiver.stdout.readline().strip()
        return answer == "hello"
    finally:
        receiver.kill()
        receiver.wait()
