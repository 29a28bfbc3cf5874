# Readable text for the client commands `node.py status`, `peers` and `tasks`: the control
# API's JSON answers turned into aligned tables and "name  value" blocks, as kubo and
# riak-admin print theirs (`--json` prints the answer itself).
# Lives here: that rendering, pure (an answer in, text out); every field it reads may be
# missing (the status sections depend on the node's extensions) and shows as "-".
# Must not live here: any request to the node (client.py) or argument parsing (cli.py).
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

MISSING = "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """`rows` under `headers`, each column as wide as its widest cell, two spaces apart
    (numbers right-aligned)."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_is_number(row[i]) or row[i] is None for row in rows)
               for i in range(len(headers))]
    lines = [_line(list(headers), widths, [False] * len(headers))]
    lines += [_line(row, widths, numeric) for row in cells]
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """One "name  value" line per pair, values aligned; a list value takes one line per
    item."""
    width = max((len(name) for name, _ in pairs), default=0)
    lines = []
    for name, value in pairs:
        items = value if isinstance(value, list) and value else [value]
        for i, item in enumerate(items):
            lines.append(f"{name if i == 0 else '':<{width}}  {_cell(item)}".rstrip())
    return "\n".join(lines)


def render_status(status: dict[str, Any]) -> str:
    members = status.get("members") or []
    states = Counter(str(m.get("state")) for m in members)
    pairs: list[tuple[str, Any]] = [
        ("peer id", status.get("peer_id")),
        ("network", status.get("network")),
        ("addresses", status.get("addrs") or None),
        ("incarnation", status.get("incarnation")),
        ("uptime", _seconds(status.get("uptime_s"))),
        ("connected", _count(len(status.get("connected_peers") or []), "peer")),
        ("members", ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or None),
        ("admission", _admission(status.get("admission"))),
    ]
    kv = status.get("kv")
    if isinstance(kv, dict):
        pairs.append(("kv", f"{kv.get('keys', MISSING)} keys, "
                            f"{kv.get('partitions_owned', MISSING)} of "
                            f"{kv.get('partitions', MISSING)} partitions, "
                            f"{kv.get('copies', MISSING)} copies, replication backlog "
                            f"{kv.get('replication_backlog', MISSING)}, hints pending "
                            f"{sum((kv.get('hints_pending') or {}).values())}"))
        if kv.get("handoff"):
            handoff = kv["handoff"]
            pairs.append(("handoff", f"{handoff.get('partitions_left', MISSING)} partitions "
                                     f"left, {handoff.get('keys_sent', MISSING)} keys sent"))
        if kv.get("warning"):
            pairs.append(("warning", kv["warning"]))
    tasks = status.get("tasks")
    if isinstance(tasks, dict):
        chain = tasks.get("chain") or {}
        state = "connected" if chain.get("connected") else f"not connected: {chain.get('error')}"
        pairs.append(("chain", f"{chain.get('kind', MISSING)} ({state})"))
        if "account" in tasks:
            pairs.append(("account", tasks["account"]))
        if "running" in tasks:
            pairs.append(("tasks running", ", ".join(tasks["running"]) or "none"))
    process = status.get("process")
    if isinstance(process, dict) and "rss_mb" in process:
        pairs.append(("memory", f"{process['rss_mb']} MiB resident, "
                                f"{process.get('cpu_s', MISSING)} s CPU"))
    return fields(pairs) + "\n\n" + render_members(members, status.get("connected_peers"),
                                                     me=status.get("peer_id"))


def render_peers(peers: dict[str, Any]) -> str:
    connected = peers.get("connected") or []
    members = peers.get("members") or []
    head = f"{len(connected)} connected, {len(members)} other members known"
    if not members:
        return head
    return head + "\n\n" + render_members(members, connected)


def render_members(members: Sequence[dict[str, Any]], connected: Any,
                   me: Any = None) -> str:
    linked = set(connected or [])
    rows = [(m.get("peer_id"), m.get("state"),
             "self" if m.get("peer_id") == me else "yes" if m.get("peer_id") in linked else "no",
             m.get("incarnation"), _seconds(m.get("last_seen_s_ago"), ago=True),
             (m.get("addrs") or [None])[0])
            for m in members]
    return table(("PEER ID", "STATE", "CONNECTED", "INCARNATION", "LAST SEEN", "ADDRESS"), rows)


def render_tasks(answer: dict[str, Any]) -> str:
    tasks = answer.get("tasks") or []
    if not tasks:
        return "no tasks on the chain"
    rows = []
    for task in tasks:
        submission, audit = task.get("last_submission"), task.get("last_audit")
        running = "yes" if task.get("running") else f"no: {task.get('not_run') or 'not run'}"
        rows.append((
            task.get("task_id"), task.get("name"), task.get("round"), task.get("window"),
            task.get("my_stake"), task.get("pool"),
            f"round {submission.get('round')}" if isinstance(submission, dict) else None,
            f"round {audit.get('round')}: {audit.get('valid')}/{audit.get('audited')} valid"
            if isinstance(audit, dict) else None,
            task.get("rewards_claimed"), task.get("claimable"), running,
        ))
    return table(("TASK", "NAME", "ROUND", "WINDOW", "MY STAKE", "POOL", "SUBMITTED",
                  "AUDITED", "REWARDS", "CLAIMABLE", "RUNNING"), rows)


def _admission(admission: Any) -> Any:
    if not isinstance(admission, dict):
        return admission
    return admission.get("describe") or admission.get("rule")


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def _seconds(value: Any, ago: bool = False) -> str | None:
    if not isinstance(value, int | float):
        return None
    text = f"{value:.1f} s" if value < 120 else f"{value / 60:.0f} min"
    return text + " ago" if ago else text


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _line(cells: Sequence[str], widths: Sequence[int], right: Sequence[bool]) -> str:
    padded = [cell.rjust(width) if r else cell.ljust(width)
              for cell, width, r in zip(cells, widths, right, strict=True)]
    return "  ".join(padded).rstrip()
