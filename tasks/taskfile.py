# Task files: the TOML a task's creator writes (`node.py task create --file TASK.toml`), read
# and checked here into plain fields, and turned into the chain's create_task fields (windows
# in slots) once the chain's slot length is known. Pure: no chain, no node.
#
#   name = "hello"              # the task's code: a task installed on the creating node
#   task_id = "hello-2"         # optional (default: name); 1..64 bytes
#   round_time_s = 10           # seconds a round lasts
#   submission_window_s = 4     # optional (default 40% of the round)
#   audit_window_s = 4          # optional (default 40% of the round)
#   min_stake = 1000            # stake a node needs to submit
#   bounty_per_round = 500      # paid among a round's accepted submitters
#   fund = 50000                # optional: put this much in the task's pool at once
#   start_in_s = 2              # optional: rounds start this long after creation
#   # optional, as in docs/task-rounds.md: allowed_failed_distributions, slash_ppm,
#   # unstake_delay_rounds, max_auditors
from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

REQUIRED = ("name", "round_time_s", "min_stake", "bounty_per_round")
SECONDS = ("round_time_s", "submission_window_s", "audit_window_s", "start_in_s")
WHOLE = ("min_stake", "bounty_per_round", "fund", "allowed_failed_distributions", "slash_ppm",
         "unstake_delay_rounds", "max_auditors")
TEXT = ("name", "task_id")
KNOWN = frozenset(SECONDS + WHOLE + TEXT)


class TaskFileError(ValueError):
    """A task file that cannot be read or has a bad field."""


def read_task_file(path: Path) -> dict[str, Any]:
    """The checked fields of the task file at `path` (TaskFileError with one line if bad)."""
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TaskFileError(f"task file {path}: {exc}") from None
    return check_task_fields(data, str(path))


def check_task_fields(data: Any, where: str = "task") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TaskFileError(f"{where}: not a table of fields")
    unknown = sorted(set(data) - KNOWN)
    if unknown:
        raise TaskFileError(f"{where}: unknown fields {unknown} (known: {sorted(KNOWN)})")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise TaskFileError(f"{where}: missing {missing}")
    for key in TEXT:
        if key in data and (not isinstance(data[key], str) or not data[key]):
            raise TaskFileError(f"{where}: {key} must be a non-empty string")
    for key in SECONDS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or value < 0):
            raise TaskFileError(f"{where}: {key} must be a number of seconds >= 0")
    for key in WHOLE:
        value = data.get(key)
        if value is not None and (type(value) is not int or value < 0):
            raise TaskFileError(f"{where}: {key} must be a whole number >= 0")
    if data["round_time_s"] <= 0:
        raise TaskFileError(f"{where}: round_time_s must be > 0")
    return dict(data)


def create_fields(spec: dict[str, Any], slot_ms: int, now_slot: int,
                  code_hash: bytes) -> dict[str, Any]:
    """The create_task transaction's fields for a checked task file, on a chain whose slots
    last `slot_ms` and whose current slot is `now_slot`."""
    def slots(seconds: float) -> int:
        return max(1, round(seconds * 1000 / slot_ms))

    round_time = slots(spec["round_time_s"])
    default_window = max(1, round_time * 2 // 5)
    fields: dict[str, Any] = {
        "task_id": spec.get("task_id", spec["name"]),
        "name": spec["name"],
        "code_hash": code_hash,
        "round_time": round_time,
        "submission_window": slots(spec["submission_window_s"])
        if "submission_window_s" in spec else default_window,
        "audit_window": slots(spec["audit_window_s"])
        if "audit_window_s" in spec else default_window,
        "min_stake": spec["min_stake"],
        "bounty_per_round": spec["bounty_per_round"],
        "start_slot": now_slot + slots(spec.get("start_in_s", 2.0)),
    }
    for key in ("allowed_failed_distributions", "slash_ppm", "unstake_delay_rounds",
                "max_auditors"):
        if key in spec:
            fields[key] = spec[key]
    return fields
