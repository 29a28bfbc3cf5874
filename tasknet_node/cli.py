# The `node.py` command line: run a node, or ask a running one (status, peers, metrics, and
# the key-value commands put, get, del, incr, sadd, srem, hset, hdel).
# Lives here: argument syntax and help, logging setup, and turning every error a user can
# fix into one line on stderr with exit code 2 (1 when a queried node does not answer, 3 when
# the KV store had too few replicas).
# Must not live here: option defaults and checks (options.py) or the node itself (runner.py).
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

from kv.config import Consistency  # loads neither trio nor p2p

from .client import ApiRefused, NodeUnreachable, call_json, get, get_json
from .errors import NodeError, UsageError
from .tables import render_peers, render_status, render_tasks

PROG = "node.py"
CLIENT_COMMANDS = {
    "status": "print the node's status: peer id, addresses, network, store, chain, members "
              "(--json: all of it, metrics included, as JSON)",
    "peers": "print connected peers and known members with their state (--json: as JSON)",
    "metrics": "print the node's metrics in Prometheus text format",
    "tasks": "print the tasks on the chain with this node's part in each: round, window, "
             "stake, last submission, audit results, rewards (--json: as JSON)",
    "wallet": "print this node's account, free balance and stakes as JSON",
}
TABLES = {"status": render_status, "peers": render_peers, "tasks": render_tasks}
TASK_OPERATIONS = {
    "fund": "add AMOUNT from this node's balance to the task's bounty pool",
    "stake": "stake AMOUNT more on the task",
    "unstake": "take AMOUNT of stake back (only some rounds after the last submission)",
}
TASK_COMMANDS = "create --file TASK.toml | fund|stake|unstake TASK AMOUNT | claim TASK ROUND"
KV_COMMANDS = {
    "put": "store VALUE under KEY",
    "get": "print KEY's value (null when missing or deleted)",
    "del": "delete KEY",
    "incr": "add N (default 1, may be negative) to the counter KEY",
    "sadd": "add members to the set KEY",
    "srem": "remove members from the set KEY",
    "hset": "set FIELD of the map KEY to VALUE",
    "hdel": "remove FIELD from the map KEY",
}
CONSISTENCY_LEVELS = [level.value for level in Consistency]
LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]
THIRD_PARTY_LOGGERS = ("libp2p", "multiaddr")
EXIT_USAGE = 2
EXIT_UNREACHABLE = 1
EXIT_QUORUM = 3
EXIT_OUTCOME_UNKNOWN = 4
KV_EXIT_CODES = ("exit status: 0 done; 1 no node answers for --data-dir; 2 bad arguments, or an "
                 "operation the store refuses (such as sadd on a counter); 3 too few replicas "
                 "answered for the consistency level (quorum failure: a write may or may not "
                 "have been applied, retry it); 4 the replica applying the write did not "
                 "answer (outcome unknown: it may or may not have been applied; retrying an "
                 "incr may count it twice)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}: {text!r}")
    return value


def _round_number(text: str) -> int:
    return _whole_number(text, 0)


def _count(text: str) -> int:
    return _whole_number(text, 1)


def run_parser() -> argparse.ArgumentParser:
    from tasks.engine import Misbehaviour  # pure and light (no trio, no libp2p)

    parser = _Parser(
        prog=PROG,
        description="Run a tasknet node. Other forms: "
        + "; ".join(f"'{PROG} {c} --data-dir DIR' to {h}" for c, h in CLIENT_COMMANDS.items())
        + "; and the key-value commands "
        + ", ".join(f"'{PROG} {c} KEY ...'" for c in KV_COMMANDS)
        + f" ('{PROG} put --help' and so on for theirs); '{PROG} localnet up|status|down' "
        "runs a whole local testnet.",
    )
    role = parser.add_mutually_exclusive_group()
    role.add_argument("--bootstrap", action="store_true",
                      help="run a bootstrap node that others join (listens on a fixed port: "
                      "/ip4/127.0.0.1/tcp/4001 unless --listen or the testnet says otherwise)")
    role.add_argument("--join", nargs="+", metavar="MULTIADDR",
                      help="join through these nodes (each address ends in /p2p/<peer-id>)")
    parser.add_argument("--testnet", metavar="NAME",
                        help="join the testnet described by testnets/NAME.toml (or a .toml path)")
    parser.add_argument("--network", metavar="ID",
                        help="network id; nodes only talk to nodes of the same network "
                        "(default: the testnet's, else tasknet-local)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="where the node keeps its key and files (default: ./data/node; "
                        "the testnet's bootstrap dir with --testnet NAME --bootstrap)")
    parser.add_argument("--listen", nargs="+", metavar="MULTIADDR",
                        help="listen addresses (default: /ip4/127.0.0.1/tcp/4001 for "
                        "--bootstrap, /ip4/127.0.0.1/tcp/0 otherwise)")
    parser.add_argument("--api", metavar="HOST:PORT",
                        help="control API address (default 127.0.0.1:0, any free port; "
                        "written to DATA_DIR/api.json)")
    parser.add_argument("--mdns", action="store_true",
                        help="also find peers on the local network with mDNS")
    parser.add_argument("--heartbeat-interval", type=_positive, metavar="S",
                        help="seconds between membership heartbeats (default 1)")
    parser.add_argument("--suspect-after", type=_positive, metavar="S",
                        help="silence after which a member is suspect (default 3)")
    parser.add_argument("--dead-after", type=_positive, metavar="S",
                        help="silence after which a member is dead (default 8)")
    admission = parser.add_argument_group(
        "admission (who may hold data and join membership; default: the testnet file's "
        "[admission] table, else open)")
    admission.add_argument("--admission", choices=("open", "allowlist", "stake"),
                           help="the network's admission rule")
    admission.add_argument("--allow-peer", action="append", metavar="PEER_ID",
                           help="a peer id the allowlist admits (repeat for each)")
    admission.add_argument("--min-stake", type=_count, metavar="AMOUNT",
                           help="the stake rule's minimum stake")
    admission.add_argument("--stake-task", metavar="TASK",
                           help="the task whose stake the stake rule counts")
    admission.add_argument("--admission-recheck", type=_positive, metavar="S",
                           help="seconds between two readings of the stakes off the chain "
                           "(stake rule; default 30)")
    store = parser.add_argument_group("key-value store")
    store.add_argument("--replicas", type=_count, metavar="N",
                       help="copies of every key, on N different nodes (default 3)")
    store.add_argument("--write-consistency", choices=CONSISTENCY_LEVELS,
                       help="replicas that must confirm a write before it succeeds, unless a "
                       "request says otherwise (default quorum: N/2+1)")
    store.add_argument("--read-consistency", choices=CONSISTENCY_LEVELS,
                       help="replicas a read merges, unless a request says otherwise "
                       "(default quorum)")
    store.add_argument("--anti-entropy-interval", type=_positive, metavar="S",
                       help="seconds between anti-entropy rounds with another replica "
                       "(default 10)")
    store.add_argument("--max-clock-skew", type=_positive, metavar="S",
                       help="refuse state from peers carrying a time more than S seconds "
                       "ahead of this node's clock (default 300)")
    rounds = parser.add_argument_group("task rounds")
    rounds.add_argument("--ledger", metavar="DIR",
                        help="the embedded ledger (the chain of a network on one machine) that "
                        "every node on this machine shares (default: ./data/ledger; the "
                        "testnet's with --testnet); created on first use with a local faucet")
    rounds.add_argument("--chain", choices=("ledger", "evm"),
                        help="where rounds settle: the embedded ledger (default) or a "
                        "TaskSettlement contract on an EVM chain (--chain-url, --contract; "
                        "the node's EVM key is wallet.key in its data dir)")
    rounds.add_argument("--chain-url", metavar="URL",
                        help="the EVM chain's JSON-RPC address, e.g. http://127.0.0.1:8545")
    rounds.add_argument("--contract", metavar="ADDRESS",
                        help="the TaskSettlement contract's 0x address on that chain")
    rounds.add_argument("--task-module", metavar="FILE", action="append", default=[],
                        help="install the tasks (Task subclasses) a Python file defines, so "
                        "that this node runs them where the chain has them (repeatable)")
    rounds.add_argument("--no-tasks", action="store_true",
                        help="run the store only, no task rounds")
    rounds.add_argument("--round-time", type=_positive, metavar="S",
                        help="round length of the built-in tasks a bootstrap node creates on a "
                        "new ledger (default 6 s)")
    rounds.add_argument("--builtin-tasks", metavar="NAMES",
                        help="the built-in tasks a bootstrap node creates on a new ledger, "
                        "comma-separated (default hello,storage)")
    rounds.add_argument("--max-tasks", type=_count, metavar="N",
                        help="run at most N tasks (default 32): anyone can create tasks on the "
                        "chain under the name of one this node has installed; later ones are "
                        "not run")
    modes = [mode.value for mode in Misbehaviour]
    rounds.add_argument("--misbehave", choices=modes, metavar="MODE",
                        help="bad-node mode, to watch audits work: " + ", ".join(modes))
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="level of tasknet's diagnostics on stderr (default warning)")
    parser.add_argument("--libp2p-log-level", default="critical", choices=LOG_LEVELS,
                        help="level of py-libp2p's own diagnostics (default critical: it logs "
                        "expected events, such as a failed dial to a stopped peer, as errors)")
    return parser


def client_parser(command: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} {command}", description=CLIENT_COMMANDS[command])
    parser.add_argument("--data-dir", metavar="DIR", default="data/node",
                        help="data dir of the running node (default: ./data/node)")
    if command in TABLES:
        parser.add_argument("--json", action="store_true",
                            help="print the node's JSON answer instead of a table")
    return parser


def task_parser(operation: str | None) -> argparse.ArgumentParser:
    """The parser of `node.py task OPERATION ...` (create, claim, or an amount operation)."""
    if operation == "create":
        parser = _Parser(prog=f"{PROG} task create", description="create a task on the chain "
                         "from a TOML file (see docs/task-rounds.md: fields and units) and fund "
                         "its pool, through the node running with --data-dir; the task's code "
                         "must be installed on that node (built-in, or --task-module)")
        parser.add_argument("operation", choices=["create"])
        parser.add_argument("--file", metavar="TASK.toml", required=True)
    elif operation == "claim":
        parser = _Parser(prog=f"{PROG} task claim", description="claim this node's reward of "
                         "ROUND of TASK now (nodes claim by themselves; this is for a round "
                         "they missed)")
        parser.add_argument("operation", choices=["claim"])
        parser.add_argument("task_id", metavar="TASK")
        parser.add_argument("round", metavar="ROUND", type=_round_number)
    else:
        parser = _Parser(prog=f"{PROG} task", description="change this node's part in a task "
                         f"(through the node running with --data-dir): {TASK_COMMANDS}")
        parser.add_argument("operation", choices=list(TASK_OPERATIONS),
                            help="; ".join(f"{k}: {v}" for k, v in TASK_OPERATIONS.items()))
        parser.add_argument("task_id", metavar="TASK")
        parser.add_argument("amount", metavar="AMOUNT", type=_count)
    parser.add_argument("--data-dir", metavar="DIR", default="data/node",
                        help="data dir of the running node (default: ./data/node)")
    return parser


def kv_parser(command: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} {command}", epilog=KV_EXIT_CODES,
                     description=f"{KV_COMMANDS[command]}, through the node running with "
                     "--data-dir, and print its JSON answer. Values and members are taken as "
                     "JSON when they parse as JSON (42, true, null, \"text\", [1, 2], "
                     "{\"a\": 1}), else as strings.")
    parser.add_argument("key", metavar="KEY")
    if command == "put":
        parser.add_argument("value", metavar="VALUE", type=_json_or_string)
    elif command == "incr":
        parser.add_argument("amount", metavar="N", type=int, nargs="?", default=1)
    elif command in ("sadd", "srem"):
        parser.add_argument("members", metavar="M", type=_json_or_string, nargs="+")
    elif command in ("hset", "hdel"):
        parser.add_argument("field", metavar="FIELD")
        if command == "hset":
            parser.add_argument("value", metavar="VALUE", type=_json_or_string)
    parser.add_argument("--consistency", choices=CONSISTENCY_LEVELS,
                        help="replicas that must answer (default: the node's "
                        "--read-consistency or --write-consistency)")
    if command in ("put", "del"):
        parser.add_argument("--override-skew", action="store_true",
                            help="operator's override: replicas replace a state of KEY whose "
                            "time is beyond the clock skew bound (stored before the bound "
                            "existed) instead of refusing the write with clock_skew")
    parser.add_argument("--data-dir", metavar="DIR", default="data/node",
                        help="data dir of the running node (default: ./data/node)")
    return parser


def _json_or_string(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite_float,
                          parse_int=_storable_int)
    except ValueError:
        return text


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _storable_int(text: str) -> int:
    number = int(text)
    if not -(2**63) <= number < 2**64:  # what the store's encoding (msgpack) holds
        raise ValueError(f"{text} is out of the range of a 64-bit integer")
    return number


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e400: JSON has no infinity
        raise ValueError(f"{text} is out of the range of a JSON number")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in CLIENT_COMMANDS:
            return _client(args[0], client_parser(args[0]).parse_args(args[1:]))
        if args and args[0] in KV_COMMANDS:
            return _kv(args[0], kv_parser(args[0]).parse_args(args[1:]))
        if args and args[0] == "task":
            return _task(task_parser(args[1] if len(args) > 1 else None).parse_args(args[1:]))
        if args and args[0] == "localnet":
            from .localnet import main as localnet

            return localnet(args[1:], _Parser)
        return _run(run_parser().parse_args(args))
    except NodeUnreachable as exc:
        return _fail(str(exc), EXIT_UNREACHABLE)
    except ApiRefused as exc:
        return _fail(str(exc), {503: EXIT_QUORUM, 504: EXIT_OUTCOME_UNKNOWN}.get(exc.status,
                                                                                EXIT_USAGE))
    except BaseException as exc:
        message = user_error(exc)
        if message is None:
            raise
        logging.getLogger(__name__).debug("%s", message, exc_info=exc)  # --log-level debug
        return _fail(message, EXIT_USAGE)


def _task(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if args.operation == "create":
        from tasks.taskfile import TaskFileError, read_task_file

        try:
            spec = read_task_file(Path(args.file))
        except TaskFileError as exc:
            raise UsageError(str(exc)) from None
        answer = call_json(data_dir, "POST", "/tasks", spec)
    elif args.operation == "claim":
        answer = call_json(data_dir, "POST", f"/tasks/{quote(args.task_id, safe='')}/claim",
                           {"round": args.round})
    else:
        answer = call_json(data_dir, "POST", f"/tasks/{quote(args.task_id, safe='')}/"
                           f"{args.operation}", {"amount": args.amount})
    print(json.dumps(answer))
    return 0


def _client(command: str, args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if command == "metrics":
        sys.stdout.write(get(data_dir, "/metrics").decode())
        return 0
    answer = get_json(data_dir, f"/{command}")
    if getattr(args, "json", False) or command not in TABLES or not isinstance(answer, dict):
        print(json.dumps(answer, indent=2))
    else:
        print(TABLES[command](answer))
    return 0


def _kv(command: str, args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    path = "/kv/" + quote(args.key, safe="")
    level = {"consistency": args.consistency} if args.consistency else {}
    if command == "get":
        answer = call_json(data_dir, "GET", path + _query(level))
    elif command == "del":
        answer = call_json(data_dir, "DELETE", path + _query({**level, **_override(args)}))
    elif command == "put":
        answer = call_json(data_dir, "PUT", path + _query(_override(args)),
                           {"value": args.value, **level})
    elif command == "incr":
        answer = call_json(data_dir, "POST", path + "/incr", {"by": args.amount, **level})
    elif command == "hset":
        answer = call_json(data_dir, "POST", path + "/hset",
                           {"field": args.field, "value": args.value, **level})
    elif command == "hdel":
        answer = call_json(data_dir, "POST", path + "/hdel", {"field": args.field, **level})
    else:
        answer = call_json(data_dir, "POST", f"{path}/{command}",
                           {"members": args.members, **level})
    print(json.dumps(answer))
    return 0


def _override(args: argparse.Namespace) -> dict[str, str]:
    return {"override_skew": "true"} if args.override_skew else {}


def _query(params: dict[str, str]) -> str:
    return "?" + urlencode(params) if params else ""


def _run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: libp2p takes a second to import, and the client
    # commands must not pay for it.
    import trio

    from .kv_extension import kv_extension
    from .options import build_kv_config, build_options, build_tasks_config
    from .runner import run_node

    options = build_options(args)
    if args.no_tasks and options.network.admission.kind == "stake":
        raise UsageError("the stake admission rule reads stakes off the chain: it needs task "
                         "rounds (drop --no-tasks)")
    stores: list[Any] = []
    extensions = [kv_extension(build_kv_config(args), on_ready=stores.append)]
    if not args.no_tasks:
        from .tasks_extension import tasks_extension

        extensions.append(tasks_extension(build_tasks_config(args),
                                          lambda: stores[0] if stores else None))
    setup_logging(args.log_level, args.libp2p_log_level)
    trio.run(functools.partial(run_node, options, extensions=extensions))
    return 0


def setup_logging(level: str, libp2p_level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(libp2p_level.upper())
    if not os.environ.get("LIBP2P_DEBUG"):
        # py-libp2p cuts its loggers off from the root on import unless LIBP2P_DEBUG routes
        # them to its own handlers: send them through ours, so --libp2p-log-level applies
        logging.getLogger("libp2p").propagate = True
        for name, logger in logging.root.manager.loggerDict.items():
            if name.startswith("libp2p.") and isinstance(logger, logging.Logger):
                logger.setLevel(logging.NOTSET)  # some set their own level (INFO) on import


def user_error(exc: BaseException) -> str | None:
    """The message of an error the user can fix, found even inside the exception groups
    that nurseries wrap errors in; None for anything else (a bug: let it show)."""
    if isinstance(exc, NodeError):
        return str(exc)
    from p2p import ConfigError, IdentityError  # already loaded if a node was started
    from shard import StoreOpenError  # a damaged LevelDB in the data dir

    if isinstance(exc, ConfigError | IdentityError | StoreOpenError):
        return str(exc)
    if isinstance(exc, BaseExceptionGroup):
        messages = [user_error(inner) for inner in exc.exceptions]
        if messages and all(m is not None for m in messages):
            return messages[0]
    return None


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message.splitlines()[0] if message else 'failed'}",
          file=sys.stderr, flush=True)
    return code
