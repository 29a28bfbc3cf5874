# What tasks a node takes up from the chain (tasknet_node/tasks_extension.py), on a real ledger
# file: anyone may create tasks, for free, under the name and code hash of a task the node has
# installed, so the node runs at most `max_tasks` of them and says why it does not run the rest
# (each task run costs a stake, two loops that look at the chain and a record file).
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import trio
from chain_worlds import SUPPLY, LedgerWorld

from tasknet_node.tasks_extension import TaskNode, TasksConfig
from tasks.api import code_hash
from tasks.builtin.hello import HelloWorld

CREATED = 5  # tasks a stranger creates under the installed `hello`
LIMIT = 2


async def test_a_node_runs_at_most_max_tasks_of_the_tasks_anyone_created(
        tmp_path: Path) -> None:
    w = LedgerWorld(tmp_path / "ledger.db", ["node", "stranger"])
    try:
        for i in range(CREATED):
            # the first asks a stake the node cannot pay (no faucet here): it waits for funds,
            # and once the limit is reached it is not run either
            w.send("stranger", i, "create_task", task_id=f"junk-{i}", name="hello",
                   code_hash=bytes.fromhex(code_hash(HelloWorld)), round_time=10,
                   submission_window=4, audit_window=4,
                   min_stake=2 * SUPPLY if i == 0 else 1, bounty_per_round=0,
                   start_slot=w.start() + 1_000)
        lines: list[str] = []
        net = SimpleNamespace(identity=w.ids["node"],
                              config=SimpleNamespace(data_dir=tmp_path / "node"))
        config = TasksConfig(ledger_dir=tmp_path, max_tasks=LIMIT)
        node = TaskNode(net, SimpleNamespace(), config,  # type: ignore[arg-type]
                        lines.append, chain=w.adapter("node"))
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await node._look_at_tasks(nursery)
                assert list(node.waiting_tasks) == ["junk-0"]
                await node._look_at_tasks(nursery)  # a second look starts no more either
                nursery.cancel_scope.cancel()
        assert sorted(node.drivers) == ["junk-1", "junk-2"]
        assert sorted(node.refused_tasks) == ["junk-0", "junk-3", "junk-4"]
        assert node.waiting_tasks == {}
        assert all("its limit (--max-tasks)" in why for why in node.refused_tasks.values())
        assert node.status()["not_run"] == node.refused_tasks
    finally:
        w.close()
