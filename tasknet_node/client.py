# The client side of the control API, for `node.py status|peers|metrics|put|get|... --data-dir
# DIR`.
# Lives here: finding a running node through DATA_DIR/api.json and one HTTP request to it.
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


class ApiRefused(Exception):
    """The node answered, with an error: `status` and the {"error": code, "message": ...}
    it sent."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.status = status
        self.code = code


def get(data_dir: Path, path: str, timeout: float = 5.0) -> bytes:
    try:
        return _request(data_dir, "GET", path, None, timeout)
    except ApiRefused as exc:
        raise NodeUnreachable(f"{path} answered {exc.status} {exc}") from None


def get_json(data_dir: Path, path: str) -> object:
    return json.loads(get(data_dir, path))


def call_json(data_dir: Path, method: str, path: str, body: object = None,
              timeout: float = 60.0) -> object:
    """Send `body` as JSON (none if None) and return the JSON answer; ApiRefused if the node
    answered with an error, NodeUnreachable if none answered."""
    data = None if body is None else json.dumps(body).encode()
    return json.loads(_request(data_dir, method, path, data, timeout))


def _request(data_dir: Path, method: str, path: str, data: bytes | None,
             timeout: float) -> bytes:
    try:
        info = read_api_info(data_dir)
    except DataDirError as exc:
        raise NodeUnreachable(str(exc)) from None
    headers = {"content-type": "application/json"} if data is not None else {}
    request = urllib.request.Request(info.url + path, data=data, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        raise _refusal(exc) from None
    except (urllib.error.URLError, OSError) as exc:
        if not process_exists(info.pid):
            raise NodeUnreachable(
                f"the node of data dir {data_dir} is not running "
                f"(its api.json is left from pid {info.pid}, which has exited)"
            ) from None
        reason = getattr(exc, "reason", exc)
        raise NodeUnreachable(f"cannot reach the control API at {info.url}: {reason}") from None


def _refusal(exc: urllib.error.HTTPError) -> ApiRefused:
    try:
        answer = json.loads(exc.read())
    except (OSError, ValueError):
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return ApiRefused(exc.code, answer["error"], str(answer.get("message", "")))
    return ApiRefused(exc.code, str(exc.reason), "")


def process_exists(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user's counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
