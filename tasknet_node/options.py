# From parsed command-line arguments to the options a node runs with (network, control API,
# KV store).
# Lives here: defaults that depend on the role (bootstrap node or not) and on the testnet,
# and the checks that turn bad values into one-line errors before anything starts.
# Must not live here: the argument syntax (cli.py) or running anything (runner.py).
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

import multiaddr

from kv import Consistency, KVConfig
from p2p import NetworkConfig
from p2p.admission import AdmissionError, AdmissionRule

from .errors import UsageError
from .runner import NodeOptions
from .testnets import Testnet, load_testnet

if TYPE_CHECKING:
    from .tasks_extension import TasksConfig

DEFAULT_DATA_DIR = Path("data/node")
BOOTSTRAP_LISTEN = "/ip4/127.0.0.1/tcp/4001"  # a fixed port, so others can be told where
MEMBER_LISTEN = "/ip4/127.0.0.1/tcp/0"  # any free port; heartbeats tell others which
DEFAULT_API = "127.0.0.1:0"  # any free port; written to DATA_DIR/api.json


def build_options(args: argparse.Namespace) -> NodeOptions:
    testnet = load_testnet(args.testnet) if args.testnet else None
    join = [_multiaddr(a, "--join", needs_peer_id=True) for a in args.join or ()]
    if not (args.bootstrap or join or testnet or args.mdns):
        raise UsageError("nothing to join: give --bootstrap, --join MULTIADDR, --testnet NAME "
                         "or --mdns")
    if testnet is not None:
        join += testnet.bootstrap_addrs(running_bootstrap_node=args.bootstrap)
    bootstrap_node = testnet.bootstrap_node if testnet is not None and args.bootstrap else None

    data_dir = Path(args.data_dir) if args.data_dir else (
        bootstrap_node.data_dir if bootstrap_node else DEFAULT_DATA_DIR)
    if args.listen:
        listen = [_multiaddr(a, "--listen", needs_peer_id=False) for a in args.listen]
    elif bootstrap_node:
        listen = list(bootstrap_node.listen)
    else:
        listen = [BOOTSTRAP_LISTEN if args.bootstrap else MEMBER_LISTEN]
    api_host, api_port = parse_host_port(args.api or DEFAULT_API)

    heartbeat_interval, suspect_after, dead_after = _timing(args)
    try:
        config = NetworkConfig(
            data_dir=data_dir,
            network_id=_network_id(args.network, testnet),
            listen=listen,
            bootstrap=join,
            enable_mdns=args.mdns,
            heartbeat_interval=heartbeat_interval,
            suspect_after=suspect_after,
            dead_after=dead_after,
            admission=_admission(args, testnet),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return NodeOptions(config, api_host, api_port)


def build_kv_config(args: argparse.Namespace) -> KVConfig:
    """The KV store's settings: each from its flag, else KVConfig's default."""
    config = KVConfig()
    if args.replicas is not None:
        config.replicas = args.replicas
    if args.write_consistency is not None:
        config.write_consistency = Consistency(args.write_consistency)
    if args.read_consistency is not None:
        config.read_consistency = Consistency(args.read_consistency)
    if args.anti_entropy_interval is not None:
        config.anti_entropy_interval = args.anti_entropy_interval
    if args.max_clock_skew is not None:
        config.max_clock_skew_s = args.max_clock_skew
    return config


def _admission(args: argparse.Namespace, testnet: Testnet | None) -> AdmissionRule:
    """The admission rule: the flags, else the testnet file's, else open."""
    kind = getattr(args, "admission", None)
    if kind is None:
        given = [flag for flag, name in (("--allow-peer", "allow_peer"),
                                         ("--min-stake", "min_stake"),
                                         ("--stake-task", "stake_task"),
                                         ("--admission-recheck", "admission_recheck"))
                 if getattr(args, name, None)]
        if given:
            raise UsageError(f"{' and '.join(given)} need{'s' if len(given) == 1 else ''} "
                             f"--admission")
        return testnet.admission if testnet is not None else AdmissionRule()
    recheck = getattr(args, "admission_recheck", None)
    try:
        return AdmissionRule(kind=kind, peers=frozenset(args.allow_peer or ()),
                             min_stake=args.min_stake or 0, task=args.stake_task,
                             **({"recheck_s": recheck} if recheck is not None else {}))
    except AdmissionError as exc:
        raise UsageError(str(exc)) from None


def _network_id(flag: str | None, testnet: Testnet | None) -> str:
    if testnet is None:
        return flag or NetworkConfig.network_id
    if flag and flag != testnet.network_id:
        raise UsageError(f"--network {flag} differs from testnet {testnet.name}'s network "
                         f"{testnet.network_id}")
    return testnet.network_id


def _timing(args: argparse.Namespace) -> tuple[float, float, float]:
    """(heartbeat_interval, suspect_after, dead_after), each from its flag or the default."""
    names = ("heartbeat_interval", "suspect_after", "dead_after")
    heartbeat, suspect, dead = (
        float(getattr(NetworkConfig, name) if getattr(args, name) is None else getattr(args, name))
        for name in names
    )
    if not heartbeat < suspect < dead:
        raise UsageError(f"need --heartbeat-interval < --suspect-after < --dead-after, got "
                         f"{heartbeat:g}, {suspect:g}, {dead:g}")
    return heartbeat, suspect, dead


def _multiaddr(text: str, flag: str, *, needs_peer_id: bool) -> str:
    try:
        multiaddr.Multiaddr(text)
    except Exception as exc:
        raise UsageError(f"{flag}: not a multiaddr: {text!r} ({exc})") from None
    if needs_peer_id and "/p2p/" not in text:
        raise UsageError(f"{flag}: {text} needs /p2p/<peer-id> at its end")
    return text


def parse_host_port(text: str) -> tuple[str, int]:
    """"127.0.0.1:8080", "localhost:0" or "[::1]:8080" -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"--api: expected HOST:PORT (port 0-65535), got {text!r}")
    return host, int(port_text)


DEFAULT_LEDGER_DIR = Path("data/ledger")


def build_tasks_config(args: argparse.Namespace) -> TasksConfig:
    """Task rounds' settings: the ledger (the flag, else beside the testnet's bootstrap data
    dir, else ./data/ledger), whether this node creates the built-in tasks (a bootstrap node
    does, on a ledger without them), round length and bad-node mode."""
    from tasks.engine import Misbehaviour

    from .tasks_extension import TasksConfig

    testnet = load_testnet(args.testnet) if args.testnet else None
    if args.ledger:
        ledger_dir = Path(args.ledger)
    elif testnet is not None and testnet.bootstrap_node is not None:
        ledger_dir = testnet.bootstrap_node.data_dir.parent / "ledger"
    else:
        ledger_dir = DEFAULT_LEDGER_DIR
    config = TasksConfig(ledger_dir=ledger_dir, create_builtin=bool(args.bootstrap))
    settings = testnet.chain if testnet is not None else None
    config.chain = args.chain or (settings.kind if settings is not None else "ledger")
    if config.chain == "evm":
        config.chain_url = args.chain_url or (settings.url if settings is not None else None)
        config.contract = args.contract or (settings.contract if settings is not None
                                            else None)
        if not config.chain_url or not config.contract:
            raise UsageError("--chain evm needs --chain-url URL and --contract ADDRESS (or a "
                             "testnet file whose [chain] table gives them)")
        if not re.fullmatch(r"0x[0-9a-fA-F]{40}", config.contract):
            raise UsageError(f"--contract must be a 0x address of 40 hex digits, not "
                             f"{config.contract!r}")
        if not config.chain_url.startswith(("http://", "https://")):
            raise UsageError(f"--chain-url must be an http(s) JSON-RPC address, not "
                             f"{config.chain_url!r}")
    elif args.chain_url or args.contract:
        raise UsageError("--chain-url and --contract are for --chain evm")
    if args.builtin_tasks is not None:
        from tasks.builtin import BUILTIN

        names = tuple(dict.fromkeys(n.strip() for n in args.builtin_tasks.split(",")
                                    if n.strip()))
        unknown = [n for n in names if n not in BUILTIN]
        if not names or unknown:
            raise UsageError(f"--builtin-tasks takes names of built-in tasks "
                             f"({', '.join(sorted(BUILTIN))}), not {args.builtin_tasks!r}")
        if not args.bootstrap:
            raise UsageError("--builtin-tasks is for the bootstrap node: it creates them")
        config.builtin = names
    if args.round_time is not None:
        if args.round_time < 1.0:
            raise UsageError("--round-time must be at least 1 second")
        config.round_time_s = args.round_time
    if args.max_tasks is not None:
        config.max_tasks = args.max_tasks
    if args.misbehave:
        config.misbehaviour = Misbehaviour(args.misbehave)
    if args.task_module:
        from tasks.builtin import BUILTIN
        from tasks.loader import TaskModuleError, load_task_modules

        try:
            config.extra_tasks = load_task_modules(args.task_module, BUILTIN)
        except TaskModuleError as exc:
            raise UsageError(str(exc)) from None
    return config
