# Named testnets: `testnets/NAME.toml` files that tell a node which network to join and how.
# Lives here: reading and validating a testnet file, and resolving its bootstrap addresses.
# Must not live here: networking (a node's addresses are read from files, never asked for).
#
# A testnet file has a `network_id`, optional `bootstrap` multiaddrs (each with
# /p2p/<peer-id>) of long-lived nodes, and an optional `[bootstrap_node]` table for a network
# whose bootstrap node runs on this machine. A libp2p address is only dialable with the peer
# id, and the peer id comes from a key generated on the bootstrap node's first start, so a
# file cannot carry it. Instead the table names the bootstrap node's data dir and listen
# address: `--testnet NAME --bootstrap` runs the bootstrap node there, it writes its full
# addresses to DATA_DIR/node.json (kept across restarts; its key and port stay the same), and
# every other `--testnet NAME` node reads them from that file. An `[admission]` table sets
# who may hold data and take part in membership (p2p/admission.py: rule = "open",
# "allowlist" with `peers`, or "stake" with `min_stake` and `task`).
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import multiaddr

from p2p.admission import AdmissionError, AdmissionRule

from .datadir import DataDirError, read_node_addrs
from .errors import NodeError

TESTNETS_DIR = Path(__file__).resolve().parent.parent / "testnets"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class TestnetError(NodeError):
    """A testnet is unknown, its file is invalid, or its bootstrap node cannot be found."""


@dataclass(frozen=True)
class BootstrapNode:
    data_dir: Path  # relative paths are relative to the current directory
    listen: tuple[str, ...]


@dataclass(frozen=True)
class ChainSettings:
    """Where the testnet settles: "ledger" (the embedded ledger beside the bootstrap node's
    data dir) or "evm" (a TaskSettlement `contract` reached at `url`)."""

    kind: str = "ledger"
    url: str | None = None
    contract: str | None = None


@dataclass(frozen=True)
class Testnet:
    name: str
    network_id: str
    bootstrap: tuple[str, ...] = ()
    bootstrap_node: BootstrapNode | None = None
    chain: ChainSettings = ChainSettings()
    admission: AdmissionRule = AdmissionRule()

    def bootstrap_addrs(self, *, running_bootstrap_node: bool = False) -> list[str]:
        """Addresses a node of this testnet joins. The bootstrap node itself needs only the
        long-lived `bootstrap` peers; every other node also needs the bootstrap node's."""
        addrs = list(self.bootstrap)
        if self.bootstrap_node is None or running_bootstrap_node:
            return addrs
        data_dir = self.bootstrap_node.data_dir
        try:
            addrs.extend(read_node_addrs(data_dir))
        except FileNotFoundError:
            raise TestnetError(
                f"testnet {self.name}: its bootstrap node has not run yet (no "
                f"{data_dir}/node.json); start it first: "
                f"python node.py --testnet {self.name} --bootstrap"
            ) from None
        except DataDirError as exc:
            raise TestnetError(f"testnet {self.name}: {exc}") from None
        return addrs


def testnet_path(name: str, testnets_dir: Path = TESTNETS_DIR) -> Path:
    """`name` is either a testnet name (a file in `testnets_dir`) or a path to a .toml file."""
    if name.endswith(".toml") or "/" in name:
        return Path(name)
    if not _NAME.match(name):
        raise TestnetError(f"not a testnet name: {name!r}")
    return testnets_dir / f"{name}.toml"


def load_testnet(name: str, testnets_dir: Path = TESTNETS_DIR) -> Testnet:
    path = testnet_path(name, testnets_dir)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        known = sorted(p.stem for p in testnets_dir.glob("*.toml"))
        raise TestnetError(
            f"unknown testnet {name!r} (no {path}; known: {', '.join(known) or 'none'})"
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TestnetError(f"cannot read testnet file {path}: {exc}") from None
    return parse_testnet(path.stem, data, path)


def parse_testnet(name: str, data: dict[str, Any], source: Path) -> Testnet:
    def fail(message: str) -> TestnetError:
        return _invalid(source, message)

    unknown = set(data) - {"network_id", "bootstrap", "bootstrap_node", "chain", "admission"}
    if unknown:
        raise fail(f"unknown keys {sorted(unknown)}")
    network_id = data.get("network_id")
    if not isinstance(network_id, str) or not network_id or "/" in network_id:
        raise fail("network_id must be a non-empty name without '/'")
    bootstrap = data.get("bootstrap", [])
    if not isinstance(bootstrap, list) or not all(isinstance(a, str) for a in bootstrap):
        raise fail("bootstrap must be a list of multiaddr strings")
    for addr in bootstrap:
        _check_multiaddr(addr, source, needs_peer_id=True)
    node = data.get("bootstrap_node")
    bootstrap_node = None
    if node is not None:
        if not isinstance(node, dict) or set(node) - {"data_dir", "listen"}:
            raise fail("bootstrap_node must be a table with data_dir and listen")
        data_dir, listen = node.get("data_dir"), node.get("listen")
        if not isinstance(data_dir, str) or not data_dir:
            raise fail("bootstrap_node.data_dir must be a path")
        listen_list = [listen] if isinstance(listen, str) else listen
        if not isinstance(listen_list, list) or not listen_list or not all(
            isinstance(a, str) for a in listen_list
        ):
            raise fail("bootstrap_node.listen must be a multiaddr or a list of them")
        for addr in listen_list:
            _check_multiaddr(addr, source, needs_peer_id=False)
        bootstrap_node = BootstrapNode(Path(data_dir), tuple(listen_list))
    admission = data.get("admission", {})
    if not isinstance(admission, dict):
        raise fail("admission must be a table")
    try:
        rule = AdmissionRule.from_table(admission)
    except AdmissionError as exc:
        raise fail(str(exc)) from None
    return Testnet(name, network_id, tuple(bootstrap), bootstrap_node,
                   _chain_settings(data.get("chain"), fail), rule)


_EVM_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")


def _chain_settings(table: Any, fail: Any) -> ChainSettings:
    """The [chain] table: kind = "ledger" | "evm"; an EVM chain needs url and contract."""
    if table is None:
        return ChainSettings()
    if not isinstance(table, dict) or set(table) - {"kind", "url", "contract"}:
        raise fail("chain must be a table with kind, url and contract")
    kind = table.get("kind", "ledger")
    if kind not in ("ledger", "evm"):
        raise fail(f"chain.kind must be \"ledger\" or \"evm\", not {kind!r}")
    url, contract = table.get("url"), table.get("contract")
    if kind == "evm":
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise fail("chain.url must be the chain's http(s) JSON-RPC address")
        if not isinstance(contract, str) or not _EVM_ADDRESS.match(contract):
            raise fail("chain.contract must be the TaskSettlement's 0x address (40 hex digits)")
        return ChainSettings(kind, url, contract.lower())
    if url is not None or contract is not None:
        raise fail("chain.url and chain.contract are for kind = \"evm\"")
    return ChainSettings()


def _invalid(source: Path, message: str) -> TestnetError:
    return TestnetError(f"testnet file {source}: {message}")


def _check_multiaddr(addr: str, source: Path, *, needs_peer_id: bool) -> None:
    try:
        multiaddr.Multiaddr(addr)
    except Exception as exc:
        raise _invalid(source, f"not a multiaddr: {addr!r} ({exc})") from None
    if needs_peer_id and "/p2p/" not in addr:
        raise _invalid(source, f"bootstrap address needs /p2p/<peer-id>: {addr}")
