# A lab of Linux network namespaces for multi-host runs on one machine (the namespace system
# tests in tests/ and benchmarks/testnet.py): one bridge in the root namespace (with an
# address, so this process reaches every node directly) and one namespace per node, joined
# to the bridge by a veth pair, each with its own address in a private /24 chosen per run;
# and the faults a test injects between them: links down, and packets from one namespace to
# another dropped by an htb class whose queue holds zero packets (u32-filtered by source
# address on the receiver's bridge port: this kernel has no netem and the machine no
# iptables).
# Lives here: creating, faulting, healing and always deleting what a run created (names carry
# the creating process's pid, so leftovers of a crashed earlier run are found and removed);
# reading a node interface's byte and packet counters (`ip -s -j link`).
# Must not live here: starting nodes (each caller runs them with `Lab.exec_prefix`), pytest
# fixtures and probes (tests/netns_helpers.py), anything importing from tests/.
from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from tasknet_node.client import process_exists

SUBNET_OCTETS = "10.77"
BRIDGE_HOST = 254  # the bridge's own address: 10.77.X.254
_OURS = re.compile(r"^tn(?:et|b|v)(\d+)")


class LabError(AssertionError):
    """A namespace, link or filter could not be made: the test fails (it never skips)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("ip", *args, check=check)


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("tc", *args, check=check)


def _run(*cmd: str, check: bool) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise LabError(f"network namespace tests need `{cmd[0]}` (iproute2) and root") from None
    if check and done.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()} "
                       f"-- network namespace tests need root (CAP_NET_ADMIN) and iproute2")
    return done


@dataclass(frozen=True)
class LinkCounters:
    """An interface's kernel counters: bytes and packets sent (tx) and received (rx), every
    frame counted with its Ethernet, IP and TCP/UDP headers."""

    tx_bytes: int
    tx_packets: int
    rx_bytes: int
    rx_packets: int


def link_counters(namespace: str, interface: str = "eth0") -> LinkCounters:
    """The counters of `interface` in network namespace `namespace`, from the JSON of
    `ip -n NS -s -j link show IF`."""
    done = _ip("-n", namespace, "-s", "-j", "link", "show", interface)
    try:
        stats = json.loads(done.stdout)[0]["stats64"]
        return LinkCounters(int(stats["tx"]["bytes"]), int(stats["tx"]["packets"]),
                            int(stats["rx"]["bytes"]), int(stats["rx"]["packets"]))
    except (ValueError, LookupError, TypeError) as exc:
        raise LabError(f"no counters of {interface} in {namespace} in `ip -s -j link` "
                       f"output: {done.stdout[:200]!r}") from exc


def remove_leftovers() -> None:
    """Delete the namespaces and links of earlier runs whose test process is gone."""
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _OURS.match(name)
        if match and int(match.group(1)) != os.getpid() and not process_exists(int(match.group(1))):
            _ip("netns", "delete", name, check=False)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        parts = line.split(":")
        name = parts[1].strip().split("@")[0] if len(parts) > 1 else ""
        match = _OURS.match(name)
        if match and int(match.group(1)) != os.getpid() and not process_exists(int(match.group(1))):
            _ip("link", "delete", name, check=False)


def _free_subnet() -> int:
    """A third octet X such that no address of 10.77.X.0/24 is on this machine's links."""
    used = _ip("-o", "-4", "addr", "show").stdout
    start = os.getpid() % 250
    for step in range(250):
        octet = (start + step) % 250 + 1
        if f" {SUBNET_OCTETS}.{octet}." not in used:
            return octet
    raise LabError(f"no free /24 left in {SUBNET_OCTETS}.0.0/16")


class Lab:
    """`size` namespaces on one bridge. Node i lives in `names[i]` at `addrs[i]`."""

    def __init__(self, size: int) -> None:
        pid = os.getpid()
        self.size = size
        self.bridge = f"tnb{pid}"
        self.names = [f"tnet{pid}n{i}" for i in range(size)]
        self.ports = [f"tnv{pid}h{i}" for i in range(size)]  # the bridge side of each veth
        self.octet = 0
        self.addrs: list[str] = []
        self.bridge_addr = ""
        self.blocked: set[tuple[int, int]] = set()  # (from, to): packets dropped
        self.down: set[int] = set()

    # -- life cycle ---------------------------------------------------------------------
    def create(self) -> None:
        remove_leftovers()
        self.octet = _free_subnet()
        net = f"{SUBNET_OCTETS}.{self.octet}"
        self.addrs = [f"{net}.{i + 1}" for i in range(self.size)]
        self.bridge_addr = f"{net}.{BRIDGE_HOST}"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for name, port, addr in zip(self.names, self.ports, self.addrs, strict=True):
            _ip("netns", "add", name)
            _ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("link", "set", port, "master", self.bridge, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            # the drop machinery on the bridge port towards this namespace: class 1:1 passes
            # (the default), class 1:2 has a queue of zero packets; filters pick 1:2 by source
            _tc("qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "default", "1")
            for cls in ("1:1", "1:2"):
                _tc("class", "add", "dev", port, "parent", "1:", "classid", cls, "htb",
                    "rate", "10gbit", "quantum", "200000")
            _tc("qdisc", "add", "dev", port, "parent", "1:2", "handle", "20:", "pfifo",
                "limit", "0")

    def teardown(self) -> None:
        """Delete every namespace and link this lab created (those that exist)."""
        for name in self.names:
            _ip("netns", "delete", name, check=False)
        for link in [*self.ports, self.bridge]:
            _ip("link", "delete", link, check=False)
        left = [n for n in self.names if n in _ip("netns", "list", check=False).stdout]
        if left:
            raise LabError(f"namespaces left behind: {left}")

    def counters(self, i: int) -> LinkCounters:
        """The byte and packet counters of node i's interface (eth0 in its namespace)."""
        return link_counters(self.names[i])

    def exec_prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program inside node i's namespace."""
        return ["ip", "netns", "exec", self.names[i]]

    # -- faults -------------------------------------------------------------------------
    def block(self, src: int, dst: int) -> None:
        """Drop every IP packet from node `src` to node `dst` (one way)."""
        self.blocked.add((src, dst))
        self._filters(dst)

    def partition(self, *groups: Iterable[int]) -> None:
        """Nodes of different groups cannot reach each other (both ways)."""
        sets = [set(g) for g in groups]
        for a, group in enumerate(sets):
            for other in sets[a + 1:]:
                for i in group:
                    for j in other:
                        self.blocked.update({(i, j), (j, i)})
        for dst in range(self.size):
            self._filters(dst)

    def link_down(self, i: int) -> None:
        """Cut node i off the bridge (its veth's bridge side down)."""
        self.down.add(i)
        _ip("link", "set", self.ports[i], "down")

    def heal(self) -> None:
        """Every link up and no packet dropped."""
        for i in sorted(self.down):
            _ip("link", "set", self.ports[i], "up")
        self.down.clear()
        dsts = {dst for _, dst in self.blocked}
        self.blocked.clear()
        for dst in dsts:
            self._filters(dst)

    def _filters(self, dst: int) -> None:
        """Make node `dst`'s port filters match `blocked` exactly."""
        port = self.ports[dst]
        _tc("filter", "del", "dev", port, "parent", "1:", "prio", "1", check=False)
        for src in sorted(s for s, d in self.blocked if d == dst):
            _tc("filter", "add", "dev", port, "parent", "1:", "protocol", "ip", "prio", "1",
                "u32", "match", "ip", "src", f"{self.addrs[src]}/32", "flowid", "1:2")

    def dropped(self, i: int) -> int:
        """Packets dropped so far on the way into node i (from the zero-packet queue)."""
        stats = _tc("-s", "qdisc", "show", "dev", self.ports[i]).stdout
        match = re.search(r"qdisc pfifo 20:.*?dropped (\d+)", stats, re.S)
        return int(match.group(1)) if match else 0
