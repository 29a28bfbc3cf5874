# The `node.py` command line: run a node, or ask a running one (status, peers, metrics).
# Lives here: argument syntax and help, logging setup, and turning every error a user can
# fix into one line on stderr with exit code 2 (1 when a queried node does not answer).
# Must not live here: option defaults and checks (options.py) or the node itself (runner.py).
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .client import NodeUnreachable, get, get_json
from .errors import NodeError, UsageError

PROG = "node.py"
CLIENT_COMMANDS = {
    "status": "print the node's status as JSON: peer id, addresses, network, members, metrics",
    "peers": "print connected peers and known members with their state as JSON",
    "metrics": "print the node's metrics in Prometheus text format",
}
LOG_LEVELS = ["debug", "info", "warning", "error", "critical"]
THIRD_PARTY_LOGGERS = ("libp2p", "multiaddr")
EXIT_USAGE = 2
EXIT_UNREACHABLE = 1


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


def run_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run a tasknet node. Other forms: "
        + "; ".join(f"'{PROG} {c} --data-dir DIR' to {h}" for c, h in CLIENT_COMMANDS.items()),
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in CLIENT_COMMANDS:
            return _client(args[0], client_parser(args[0]).parse_args(args[1:]))
        return _run(run_parser().parse_args(args))
    except NodeUnreachable as exc:
        return _fail(str(exc), EXIT_UNREACHABLE)
    except BaseException as exc:
        message = user_error(exc)
        if message is None:
            raise
        return _fail(message, EXIT_USAGE)


def _client(command: str, args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if command == "metrics":
        sys.stdout.write(get(data_dir, "/metrics").decode())
    else:
        print(json.dumps(get_json(data_dir, f"/{command}"), indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: libp2p takes a second to import, and the client
    # commands must not pay for it.
    import trio

    from .options import build_options
    from .runner import run_node

    options = build_options(args)
    setup_logging(args.log_level, args.libp2p_log_level)
    trio.run(run_node, options)
    return 0


def setup_logging(level: str, libp2p_level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(libp2p_level.upper())


def user_error(exc: BaseException) -> str | None:
    """The message of an error the user can fix, found even inside the exception groups
    that nurseries wrap errors in; None for anything else (a bug: let it show)."""
    if isinstance(exc, NodeError):
        return str(exc)
    from p2p import ConfigError, IdentityError  # already loaded if a node was started

    if isinstance(exc, ConfigError | IdentityError):
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
