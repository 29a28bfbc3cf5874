# Task rounds as part of every node: the chain (the embedded ledger in a directory every node
# on this machine shares, or a TaskSettlement contract on an EVM chain, reached with retries
# while the store runs on), the built-in tasks a bootstrap node creates on a new chain, funding
# and staking (from the localnet faucet on the ledger), one `tasks.driver.TaskDriver` per task,
# and the HTTP face (/tasks, /tasks/{id}, /tasks/{id}/rounds/{n}, /wallet, POST operations),
# metrics and the `tasks` status section.
# Lives here: wiring and the HTTP contract of tasks. Must not live here: round logic (tasks/),
# the rules or the ledger (chain/), argument parsing (cli.py), the node's lifecycle (runner.py).
from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from chain.adapter import ChainAdapter, ChainError, ChainUnavailable
from chain.assignment import window_of
from chain.ledger import Ledger, LedgerAdapter
from chain.rules import Refused
from kv import KV
from p2p import Network
from p2p.admission import STAKE
from tasks.api import CodeHashMismatch, Task, check_code_hash, code_hash
from tasks.builtin import BUILTIN
from tasks.context import NodeTaskContext, StoreProver
from tasks.driver import TaskDriver
from tasks.engine import Misbehaviour, config_of
from tasks.taskfile import TaskFileError, check_task_fields, create_fields

from .admission_check import keep_stake_admission
from .api import ControlApi, Metric
from .http import JSONResponse, Request, Response
from .http import error_response as _error
from .runner import NodeExtension, Say, print_line

log = logging.getLogger(__name__)

TASKS_DIR = "tasks"  # under the node's data dir: each task's record of what this node did
STAKE_PER_TASK = 1_000
BOUNTY_PER_ROUND = 1_000
GENESIS_ROUNDS_FUNDED = 100_000  # the bootstrap funds this many rounds of each built-in task
NODE_FUNDS = 100_000  # what a localnet node takes from the faucet when it has less
# tasks this node runs at most: anyone may create tasks on the chain, for free, under the name
# and code hash of a task this node has installed; each one run costs a stake, two loops that
# look at the chain every few seconds and a record file, so past the limit a new task is not
# run (its `not_run` reason says so; --max-tasks raises it)
MAX_TASKS = 32


CHAINS = ("ledger", "evm")
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0  # backoff while the chain cannot be reached


@dataclass
class TasksConfig:
    ledger_dir: Path
    chain: str = "ledger"  # or "evm": a TaskSettlement contract at `contract` via `chain_url`
    chain_url: str | None = None
    contract: str | None = None
    create_builtin: bool = False  # a bootstrap node creates the built-in tasks on a new ledger
    builtin: tuple[str, ...] = ("hello", "storage")
    round_time_s: float = 6.0
    slot_ms: int = 250  # for a ledger this node creates
    misbehaviour: Misbehaviour | None = None
    extra_tasks: dict[str, type[Task]] = field(default_factory=dict)  # --task-module
    min_stake: int = STAKE_PER_TASK
    bounty_per_round: int = BOUNTY_PER_ROUND
    max_tasks: int = MAX_TASKS  # tasks this node runs at most (--max-tasks)


def task_settings(cfg: TasksConfig, slot_ms: int) -> dict[str, int]:
    """Round time and windows in slots: a submission window and an audit window of 40% of
    the round each, the rest idle."""
    round_time = max(3, round(cfg.round_time_s * 1000 / slot_ms))
    window = max(1, round_time * 2 // 5)
    return {"round_time": round_time, "submission_window": window, "audit_window": window}


def tasks_extension(config: TasksConfig, kv_ready: Callable[[], KV | None], *,
                    say: Say = print_line) -> NodeExtension:
    """The node extension that runs task rounds with `config`; `kv_ready` gives the store
    (the KV extension must come first)."""

    @asynccontextmanager
    async def extension(net: Network, api: ControlApi) -> AsyncIterator[TaskNode]:
        kv = kv_ready()
        if kv is None:
            raise RuntimeError("task rounds need the key-value store extension first")
        node = TaskNode(net, kv, config, say)
        node.register(api)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.run)
                try:
                    yield node
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if node.chain is not None:
                await node.chain.close()

    return extension


async def open_chain(config: TasksConfig, net: Network) -> ChainAdapter:
    """The chain of `config`: the embedded ledger (created on first use), or the EVM contract
    with this node's wallet (`wallet.key` in the data dir, created on first use). Raises
    ChainUnavailable / ChainError with a message for the operator."""
    if config.chain == "evm":
        from chain.evm.adapter import EvmAdapter
        from chain.evm.wallet import load_or_create_wallet

        if not config.chain_url or not config.contract:
            raise ChainError("--chain evm needs --chain-url URL and --contract ADDRESS")
        wallet = await trio.to_thread.run_sync(
            lambda: load_or_create_wallet(net.config.data_dir))
        url, contract = config.chain_url, config.contract
        return await EvmAdapter.open(url, contract, wallet, net.identity)
    ledger = await trio.to_thread.run_sync(
        lambda: Ledger.open_localnet(config.ledger_dir, slot_ms=config.slot_ms))
    return LedgerAdapter(ledger, net.identity)


class TaskNode:
    """This node's part in every task on the chain."""

    def __init__(self, net: Network, kv: KV, config: TasksConfig, say: Say,
                 chain: ChainAdapter | None = None) -> None:
        self.net = net
        self.kv = kv
        self._chain = chain
        self.config = config
        self.say = say
        self.drivers: dict[str, TaskDriver] = {}
        self.refused_tasks: dict[str, str] = {}  # tasks this node will not run: why
        self.waiting_tasks: dict[str, str] = {}  # tasks it cannot run yet (funds): why
        self.events: list[dict[str, Any]] = []
        self.chain_error: str | None = None
        self.installed: dict[str, type[Task]] = {**BUILTIN, **config.extra_tasks}

    @property
    def chain(self) -> ChainAdapter:
        """The chain; only used once `run` connected (the HTTP routes check `connected`)."""
        if self._chain is None:
            raise ChainUnavailable(self.chain_error or "the chain is not connected yet")
        return self._chain

    @property
    def connected(self) -> bool:
        return self._chain is not None

    # -- running ------------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the chain, retrying with backoff (1 s doubling to 30 s) while it cannot be
        reached or is not what the node was told: the store runs on meanwhile."""
        pause = RETRY_FIRST_S
        while self._chain is None:
            try:
                self._chain = await open_chain(self.config, self.net)
            except (ChainError, Refused, OSError, ValueError) as exc:
                message = f"{exc}".splitlines()[0] if f"{exc}" else type(exc).__name__
                if message != self.chain_error:
                    self.say(f"tasks: chain not ready ({message}); retrying, the store runs on")
                self.chain_error = message
                await trio.sleep(pause)
                pause = min(RETRY_MAX_S, pause * 2)
        if self.chain_error is not None:
            self.say("tasks: chain connected")
        self.chain_error = None
        chain = self._chain
        where = chain.describe()
        self.say(f"tasks: settling on {where.get('kind')} as {chain.account}"
                 + (f" ({where['url']}, contract {where['contract']})" if "url" in where else ""))

    async def run(self) -> None:
        await self.connect()
        async with trio.open_nursery() as nursery:
            if self.net.admission.rule.kind == STAKE:
                nursery.start_soon(keep_stake_admission, self.net, self.chain, self.say)
            if self.config.create_builtin:
                await self._create_builtin_tasks()
            pause = RETRY_FIRST_S
            while True:
                try:
                    await self._look_at_tasks(nursery)
                    pause = RETRY_FIRST_S
                except ChainUnavailable as exc:
                    log.warning("tasks: chain unavailable (%s); retrying in %.0f s", exc, pause)
                    await trio.sleep(pause)
                    pause = min(RETRY_MAX_S, pause * 2)
                    continue
                await trio.sleep(2.0)

    async def _look_at_tasks(self, nursery: trio.Nursery) -> None:
        for view in await self.chain.tasks():
            task_id = view["task_id"]
            if task_id in self.drivers:
                why = await self._stake_to_minimum(view)
                if why is not None:  # its rounds say it is not staked
                    log.info("task %s: %s", task_id, why)
                continue
            if task_id in self.refused_tasks:
                continue
            if len(self.drivers) >= self.config.max_tasks:
                self.waiting_tasks.pop(task_id, None)
                self._refuse(task_id, f"this node runs {self.config.max_tasks} tasks already, "
                                      "its limit (--max-tasks)")
                continue
            driver = await self._driver_for(view)
            if driver is not None:
                self.drivers[task_id] = driver
                self.waiting_tasks.pop(task_id, None)
                nursery.start_soon(self._run_driver, driver)
                nursery.start_soon(driver.keep_rewards)

    async def _run_driver(self, driver: TaskDriver) -> None:
        try:
            await driver.run()
        except Exception as exc:  # one task's failure must not stop the node or other tasks
            log.exception("task %s stopped", driver.task_id)
            self.refused_tasks[driver.task_id] = f"stopped: {exc}"
            self.say(f"task {driver.name}: stopped ({exc})")

    async def _driver_for(self, view: dict[str, Any]) -> TaskDriver | None:
        task_id = view["task_id"]
        name = view["config"]["name"]
        task_class = self.installed.get(name)
        if task_class is None:
            self._refuse(task_id, f"no code installed for task {name!r}")
            return None
        try:
            check_code_hash(task_class, view["config"]["code_hash"], task_id)
        except CodeHashMismatch as exc:
            self._refuse(task_id, str(exc))
            return None
        why = await self._stake_to_minimum(view)
        if why is not None:  # no funds yet: said once, tried again on every look
            if self.waiting_tasks.get(task_id) != why:
                self.say(f"task {task_id}: waiting ({why})")
            self.waiting_tasks[task_id] = why
            return None
        ctx = NodeTaskContext(self.kv, self.net.identity, task_id,
                              storage=StoreProver(self.kv))
        return TaskDriver(self.chain, task_id, task_class(ctx), ctx,
                          self.net.config.data_dir / TASKS_DIR,
                          misbehaviour=self.config.misbehaviour, say=self.say,
                          on_event=self._on_event)

    def _refuse(self, task_id: str, why: str) -> None:
        self.refused_tasks[task_id] = why
        self.say(f"task {task_id}: not run ({why})")

    def _on_event(self, task_id: str, event: dict[str, Any]) -> None:
        self.events = [*self.events[-99:], {"task_id": task_id, **event}]

    async def _have_funds(self, amount: int, take: int) -> bool:
        """Whether this node's free balance holds `amount`, after taking `take` from the
        localnet faucet when it did not (False when that fails: no faucet on this ledger)."""
        if await self.chain.balance(self.chain.account) >= amount:
            return True
        try:
            await self.chain.fund_from_faucet(take)
        except (ChainError, Refused) as exc:
            log.info("cannot take %d from a faucet: %s", take, exc)
            return False
        return True

    async def _stake_to_minimum(self, view: dict[str, Any]) -> str | None:
        """Stake up to the task's minimum (at start, and again after a slash) from the free
        balance (rewards) or, on a localnet, the faucet; None when staked, else why not."""
        staked = view["stakes"].get(self.chain.account, 0)
        need = view["config"]["min_stake"] - staked
        if need <= 0:
            return None
        if not await self._have_funds(need, take=max(NODE_FUNDS, need)):
            return (f"account {self.chain.account} holds less than the stake of {need} it "
                    f"needs; fund it")
        try:
            await self.chain.send({"op": "stake", "task_id": view["task_id"], "amount": need})
        except Refused as exc:
            return f"stake refused: {exc.reason} ({exc.detail})"
        self.say(f"task {view['config']['name']}: staked {need}"
                 + (" more (back to the minimum)" if staked else ""))
        return None

    async def _create_builtin_tasks(self) -> None:
        existing = {v["config"]["name"] for v in await self.chain.tasks()}
        slots = task_settings(self.config, self.chain.slot_ms)
        for name in self.config.builtin:
            if name in existing:
                continue
            funds = self.config.bounty_per_round * GENESIS_ROUNDS_FUNDED
            if not await self._have_funds(funds, take=funds):
                self.say(f"task {name}: not created (no funds for its bounty)")
                continue
            start = await self.chain.now() + 2
            try:
                await self.chain.send({
                    "op": "create_task", "task_id": name, "name": name,
                    "code_hash": bytes.fromhex(code_hash(BUILTIN[name])), **slots,
                    "min_stake": self.config.min_stake,
                    "bounty_per_round": self.config.bounty_per_round, "start_slot": start,
                })
                await self.chain.send({"op": "fund", "task_id": name, "amount": funds})
            except Refused as exc:
                if exc.reason != "task_exists":
                    self.say(f"task {name}: not created ({exc.reason}: {exc.detail})")
                continue
            self.say(f"task {name}: created, rounds of {slots['round_time']} slots of "
                     f"{self.chain.slot_ms} ms, bounty {self.config.bounty_per_round} a round")

    async def _claim(self, task_id: str, body: Any) -> Response:
        r = body.get("round") if isinstance(body, dict) else None
        if type(r) is not int or r < 0:
            return _error(400, "bad_request", '"round" must be a whole number')
        driver = self.drivers.get(task_id)
        if driver is None:
            return _error(404, "not_found", f"this node does not run task {task_id!r}")
        try:
            amount = await driver.claim_now(r)
        except Refused as exc:
            return _error(409, exc.reason, exc.detail)
        return _json({"ok": True, "round": r, "amount": amount})

    # -- reading ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        if self._chain is None:
            return {"chain": {"kind": self.config.chain, "connected": False,
                              "error": self.chain_error}}
        return {
            "account": self.chain.account,
            "chain": {**self.chain.describe(), "connected": True},
            "running": sorted(self.drivers),
            "not_run": dict(self.refused_tasks),
            "waiting": dict(self.waiting_tasks),
            "tasks": {task_id: {"round": d.current_round, "metrics": dict(d.metrics),
                                "rewards_by_round": d.rewards.by_round(),
                                "claimable": d.rewards.claimable,
                                **d.last} for task_id, d in sorted(self.drivers.items())},
        }

    def metrics(self) -> list[Metric]:
        samples = []
        for task_id, driver in self.drivers.items():
            for name, value in driver.metrics.items():
                samples.append(Metric(f"tasknet_task_{name}", value, "counter",
                                      f"task rounds: {name.replace('_', ' ')}",
                                      (("task", task_id),)))
        return samples

    async def task_rows(self) -> list[dict[str, Any]]:
        me = self.chain.account
        slot = await self.chain.now()
        rows = []
        for view in await self.chain.tasks():
            cfg = config_of(view)
            round_now, window = window_of(cfg, slot)
            driver = self.drivers.get(view["task_id"])
            rows.append({
                "task_id": view["task_id"], "name": cfg.name,
                "round": round_now if round_now >= 0 else None,
                "window": window if round_now >= 0 else "not started",
                "my_stake": view["stakes"].get(me, 0), "pool": view["pool"],
                "running": driver is not None,
                "not_run": self.refused_tasks.get(view["task_id"])
                or self.waiting_tasks.get(view["task_id"]),
                "last_submission": driver.last.get("submission") if driver else None,
                "last_audit": driver.last.get("audit") if driver else None,
                "rewards_claimed": driver.metrics["rewards"] if driver else 0,
                "claimable": driver.rewards.claimable if driver else None,
            })
        return rows

    # -- HTTP ---------------------------------------------------------------------------
    def register(self, api: ControlApi) -> None:
        api.add_route("/tasks", self._when_connected(self._tasks))
        api.add_route("/tasks", self._when_connected(self._create), methods=("POST",))
        api.add_route("/tasks/{task_id}", self._when_connected(self._task))
        api.add_route("/tasks/{task_id}/rounds/{n}", self._when_connected(self._round))
        api.add_route("/tasks/{task_id}/{op}", self._when_connected(self._operation),
                      methods=("POST",))
        api.add_route("/wallet", self._when_connected(self._wallet))
        api.add_status("tasks", self.status)
        api.add_metrics(self.metrics)

    def _when_connected(self, handler: Callable[[Request], Awaitable[Response]]
                        ) -> Callable[[Request], Awaitable[Response]]:
        """`handler`, answering 503 while the chain is not connected or does not answer."""
        async def guarded(request: Request) -> Response:
            if self._chain is None:
                return _error(503, "chain_unavailable",
                              self.chain_error or "the chain is not connected yet")
            try:
                return await handler(request)
            except ChainUnavailable as exc:
                return _error(503, "chain_unavailable", str(exc))
        return guarded

    async def _tasks(self, request: Request) -> Response:
        return _json({"tasks": await self.task_rows()})

    async def _task(self, request: Request) -> Response:
        view = await self.chain.task(request.path_params["task_id"])
        if view is None:
            return _error(404, "not_found", "no such task")
        driver = self.drivers.get(view["task_id"])
        # this node's rewards: what it can still claim, what it claimed by round (None, {}
        # where it does not run the task)
        return _json({**view, "claimable": driver.rewards.claimable if driver else None,
                      "rewards_by_round": driver.rewards.by_round() if driver else {}})

    async def _round(self, request: Request) -> Response:
        try:
            n = int(request.path_params["n"])
        except ValueError:
            return _error(400, "bad_request", "the round is a whole number")
        try:
            return _json(await self.chain.round_view(request.path_params["task_id"], n))
        except Refused as exc:
            return _error(404, exc.reason, exc.detail)

    async def _wallet(self, request: Request) -> Response:
        me = self.chain.account
        stakes = {v["task_id"]: v["stakes"].get(me, 0) for v in await self.chain.tasks()}
        return _json({"account": me, "balance": await self.chain.balance(me),
                      "stakes": stakes,
                      "rewards_claimed": {t: d.metrics["rewards"]
                                          for t, d in self.drivers.items()},
                      "claimable": {t: d.rewards.claimable for t, d in self.drivers.items()}})

    async def _create(self, request: Request) -> Response:
        """POST /tasks with a task file's fields (tasks/taskfile.py): create it, fund it."""
        try:
            spec = check_task_fields(await request.json())
        except TaskFileError as exc:
            return _error(400, "bad_request", str(exc))
        except ValueError:
            return _error(400, "bad_json", "the body is not JSON")
        task_class = self.installed.get(spec["name"])
        if task_class is None:
            return _error(409, "not_installed", f"no code installed on this node for task "
                          f"{spec['name']!r} (installed: {sorted(self.installed)})")
        fields = create_fields(spec, self.chain.slot_ms, await self.chain.now(),
                               bytes.fromhex(code_hash(task_class)))
        fund = spec.get("fund", 0)
        try:
            if fund and not await self._have_funds(fund, take=fund):
                return _error(409, "insufficient_balance",
                              f"account {self.chain.account} cannot fund {fund}")
            receipt = await self.chain.send({"op": "create_task", **fields})
            if fund:
                await self.chain.send({"op": "fund", "task_id": fields["task_id"],
                                       "amount": fund})
        except Refused as exc:
            return _error(409, exc.reason, exc.detail)
        self.say(f"task {fields['task_id']}: created ({spec['name']}), rounds of "
                 f"{fields['round_time']} slots, pool {fund}")
        return _json({"ok": True, "task_id": fields["task_id"], "height": receipt.height,
                      "config": {k: v for k, v in fields.items() if k != "code_hash"},
                      "funded": fund})

    async def _operation(self, request: Request) -> Response:
        op = request.path_params["op"]
        if op not in ("fund", "stake", "unstake", "claim"):
            return _error(404, "not_found",
                          f"no operation {op!r}; one of fund, stake, unstake, claim")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "bad_json", "the body is not JSON")
        if op == "claim":
            return await self._claim(request.path_params["task_id"], body)
        amount = body.get("amount") if isinstance(body, dict) else None
        if type(amount) is not int or amount <= 0:
            return _error(400, "bad_request", '"amount" must be a positive whole number')
        try:
            receipt = await self.chain.send({"op": op, "task_id": request.path_params["task_id"],
                                             "amount": amount})
        except Refused as exc:
            return _error(409, exc.reason, exc.detail)
        return _json({"ok": True, "height": receipt.height, "result": receipt.result})


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex() if len(value) == 32 else base64.b64encode(value).decode()
    return value


def _json(value: Any, status: int = 200) -> Response:
    return JSONResponse(_plain(value), status_code=status)
