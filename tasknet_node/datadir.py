# The files a running node keeps in its data dir for other processes to read.
# Lives here: the data-dir lock (one node per data dir), `node.json` (peer id and dialable
# addresses, kept across restarts so others can find a node), `api.json` (where the control
# API listens; removed on clean exit), atomic JSON writes and their readers.
# Must not live here: networking or anything that imports libp2p (the CLI client reads these
# files and must start fast).
from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import NodeError

LOCK_FILE = "lock"
NODE_FILE = "node.json"
API_FILE = "api.json"


class DataDirError(NodeError):
    """The data dir cannot be used, or does not hold what a reader expects."""


@dataclass(frozen=True)
class ApiInfo:
    host: str
    port: int
    pid: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def prepare(data_dir: Path) -> None:
    """Create `data_dir` (mode 0700 when new) and check that it is a writable directory."""
    if data_dir.exists() and not data_dir.is_dir():
        raise DataDirError(f"cannot use data dir {data_dir}: it is not a directory")
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirError(f"cannot use data dir {data_dir}: {exc.strerror or exc}") from None
    if not os.access(data_dir, os.R_OK | os.W_OK | os.X_OK):
        raise DataDirError(f"cannot use data dir {data_dir}: not readable and writable")


@contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `data_dir` while the node runs. The kernel drops the lock
    when the process dies, so a killed node never leaves a stale lock behind."""
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise DataDirError(f"cannot use data dir {data_dir}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise DataDirError(
                f"data dir {data_dir} is in use by another node (pid {holder}); "
                "give each node its own --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace `path` atomically, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise DataDirError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise DataDirError(f"cannot read {path}: not a JSON object")
    return value


def write_api_info(data_dir: Path, info: ApiInfo) -> None:
    write_json(data_dir / API_FILE,
               {"host": info.host, "port": info.port, "pid": info.pid, "url": info.url})


def remove_api_info(data_dir: Path) -> None:
    (data_dir / API_FILE).unlink(missing_ok=True)


def read_api_info(data_dir: Path) -> ApiInfo:
    path = data_dir / API_FILE
    try:
        value = read_json(path)
    except FileNotFoundError:
        raise DataDirError(f"no node is running with data dir {data_dir} (no {API_FILE})") from None
    try:
        return ApiInfo(str(value["host"]), int(value["port"]), int(value["pid"]))
    except (KeyError, TypeError, ValueError):
        raise DataDirError(f"cannot read {path}: missing host, port or pid") from None


def write_node_info(data_dir: Path, peer_id: str, network: str, addrs: list[str]) -> None:
    write_json(data_dir / NODE_FILE, {"peer_id": peer_id, "network": network, "addrs": addrs})


def read_node_addrs(data_dir: Path) -> list[str]:
    """The dialable addresses (with /p2p/<peer-id>) the node in `data_dir` last listened on."""
    path = data_dir / NODE_FILE
    value = read_json(path)  # FileNotFoundError is the caller's to explain
    addrs = value.get("addrs")
    if not isinstance(addrs, list) or not addrs or not all(isinstance(a, str) for a in addrs):
        raise DataDirError(f"cannot read {path}: no addresses in it")
    return addrs
