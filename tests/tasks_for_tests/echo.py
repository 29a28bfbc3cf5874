# A task for tests, installed with `node.py --task-module`: each node stores a line per round
# and submits a token naming the round; auditors check the token. With TASKNET_TEST_FAULT set
# in a node's environment, that node's task code fails in turn: in rounds 0, 3, 6, ... task()
# raises; in rounds 1, 4, 7, ... submission() hangs far past its window; in rounds 2, 5, 8, ...
# it returns a submission over the 512-byte limit.
from __future__ import annotations

import os

import trio

from tasks.api import Task


class Echo(Task):
    name = "echo"

    def _faulty(self, round: int, phase: int) -> bool:
        return bool(os.environ.get("TASKNET_TEST_FAULT")) and round % 3 == phase

    async def task(self, round: int) -> None:
        if self._faulty(round, 0):
            raise RuntimeError("task code failing on purpose")
        await self.ctx.put(f"round/{round}", f"echo-{round}")

    async def submission(self, round: int) -> str:
        token = await self.ctx.get(f"round/{round}")
        if not isinstance(token, str):
            raise RuntimeError(f"no work stored for round {round}")
        if self._faulty(round, 1):
            await trio.sleep(30)  # hangs far past its window: cancelled at the window's end
        if self._faulty(round, 2):
            return token + "x" * 600
        return token

    def audit(self, submission: str, round: int, submitter: str) -> bool:
        return submission == f"echo-{round}"
