# The hello-world task, the reference for task authors: each round every node stores a
# greeting naming itself and the round, submits its cid, and auditors fetch and check it.
# Lives here: that task and nothing else (keep it short enough to read in a minute).
from __future__ import annotations

from ..api import Task, TaskContext
from ..blobs import cid_of


def greeting(node_id: str, round: int) -> bytes:
    return f"Hello, World! from {node_id} in round {round}".encode()


class HelloWorld(Task):
    name = "hello"

    def __init__(self, ctx: TaskContext) -> None:
        super().__init__(ctx)
        self.stored: dict[int, str] = {}  # round -> cid of the greeting stored in it

    async def task(self, round: int) -> None:
        self.stored[round] = await self.ctx.put_blob(greeting(self.ctx.node_id, round))
        for old in [r for r in self.stored if r < round - 2]:
            del self.stored[old]

    async def submission(self, round: int) -> str:
        # kept in memory: a node restarted between its work and its submission misses the
        # round. Read, not taken: the driver asks again when sending the submission failed
        # (the chain unavailable); task() forgets rounds past
        cid = self.stored.get(round)
        if cid is None:
            raise RuntimeError(f"no greeting stored for round {round}")
        return cid

    async def audit(self, submission: str, round: int, submitter: str) -> bool:
        if submission != cid_of(greeting(submitter, round)):
            return False  # not the greeting of that node and round
        try:
            data = await self.ctx.get_blob(submission)
        except KeyError:
            # not (yet) readable here: while nodes join, a key may sit on replicas a reader
            # does not ask until handoff ends; no evidence against the submitter
            self.ctx.log.info("greeting %s of %s not found; accepted", submission, submitter)
            return True
        return data == greeting(submitter, round)

    # distribution: the default, equal shares of the bounty among the accepted submitters.
