# The client side of the control API, for `node.py status|peers|metrics --data-dir DIR`.
# Lives here: finding a running node through DATA_DIR/api.json and one HTTP GET to it.
# Must not live here: anything that imports libp2p or trio (these commands must start fast).
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from .datadir import DataDirError, read_api_info


class NodeUnreachable(Exception):
    """No node answers for the data dir: it is not running, or its API does not respond."""


def get(data_dir: Path, path: str, timeout: float = 5.0) -> bytes:
    try:
        info = read_api_info(data_dir)
    except DataDirError as exc:
        raise NodeUnreachable(str(exc)) from None
    try:
        with urllib.request.urlopen(info.url + path, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        raise NodeUnreachable(f"{info.url}{path} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        if not _process_exists(info.pid):
            raise NodeUnreachable(
                f"the node of data dir {data_dir} is not running "
                f"(its api.json is left from pid {info.pid}, which has exited)"
            ) from None
        reason = getattr(exc, "reason", exc)
        raise NodeUnreachable(f"cannot reach the control API at {info.url}: {reason}") from None


def get_json(data_dir: Path, path: str) -> object:
    return json.loads(get(data_dir, path))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
