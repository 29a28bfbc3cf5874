# The replicated key-value store as part of every node: `kv.KV` runs beside the network, its
# HTTP + JSON face on the control API, its metrics, its `kv` status section, and handoff
# progress lines.
# Lives here: the HTTP contract of the store (paths, request parsing, limits of requests, the
# mapping of store errors to status codes, JSON rendering of stored values) and the node
# extension that wires it all in. The size limits of keys and values are the store's own
# (kv.ops.check_op, the same for every way an op comes in): too_large maps to 413.
# Must not live here: what the store does (kv/), argument parsing (cli.py), the node's
# lifecycle (runner.py).
from __future__ import annotations

import base64
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import trio

import crdt
from crdt.values import pack_value
from kv import KV, Consistency, KVConfig, NotAdmitted, OpError, OutcomeUnknown, QuorumError
from kv.ops import render
from p2p import Network, RequestError
from shard import Ring

from .api import ControlApi, Metric
from .http import JSONResponse, Request, Response, parse_json
from .http import error_response as _error
from .runner import NodeExtension, Say, print_line

log = logging.getLogger(__name__)

KV_DIR = "kv"  # under the node's data dir: the store's LevelDB and its hints
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_BATCH = 10_000  # keys per /kv-batch or /kv-read request
OPERATIONS = ("incr", "sadd", "srem", "hset", "hdel")
HANDOFF_REPORT_INTERVAL = 2.0

Endpoint = Callable[[Request], Awaitable[Response]]
# the store's counters on /metrics (as tasknet_kv_<name>_total), with their help text
COUNTERS = (
    ("writes", "operations this node coordinated that reached their write quorum"),
    ("reads", "keys this node read with their read quorum"),
    ("read_repairs", "stale replicas sent the merged state by a read"),
    ("hints_delivered", "hinted writes delivered to the replica they were meant for"),
    ("handoff_keys_sent", "states streamed to new owners after ring changes"),
    ("hints_expired", "hints dropped unsent because they outlived hint_ttl_s"),
    ("hints_dropped", "hints dropped unsent because the replica refused them or no frame "
                      "can carry them"),
    ("replayed_batches", "replication batches refused as replayed or outside the replay "
                         "window"),
    ("tombstones_collected", "register tombstones removed here once every replica confirmed"
                             " them"),
    ("skew_refused", "states from peers refused: their wall time was beyond the clock skew "
                     "bound"),
    ("handoff_skew_withheld", "states beyond the clock skew bound a handoff did not send (peers"
                              " would refuse them; they read as absent)"),
    ("skew_overrides", "stored states beyond the clock skew bound replaced by an operator's "
                       "override_skew write"),
    ("hedged_ops", "forwarded writes also sent to the next replica because the first had not "
                   "answered within hedge_after_s"),
    ("unknown_outcomes", "writes this node coordinated that failed with outcome_unknown (their "
                         "replica did not answer: applied or not)"),
    ("slow_marks", "replicas passed over as the one that applies writes after keeping a "
                   "forwarded write waiting"),
    ("expired_ops", "forwarded writes this replica did not apply: they came after their "
                    "coordinator may have sent them elsewhere"),
)


def kv_extension(config: KVConfig, *, say: Say = print_line,
                 report_interval: float = HANDOFF_REPORT_INTERVAL,
                 on_ready: Callable[[KV], None] | None = None) -> NodeExtension:
    """The node extension that runs the store with `config` in DATA_DIR/kv and serves it;
    `on_ready` is given the running store (for extensions that use it)."""

    @asynccontextmanager
    async def extension(net: Network, api: ControlApi) -> AsyncIterator[KV]:
        async with KV.start(net, net.config.data_dir / KV_DIR, config) as kv:
            KvApi(kv).register(api)
            if on_ready is not None:
                on_ready(kv)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(report_handoff, kv.status, say, report_interval)
                try:
                    yield kv
                finally:
                    nursery.cancel_scope.cancel()

    return extension


async def report_handoff(status: Callable[[], dict[str, Any]], say: Say,
                         interval: float) -> None:
    """Every `interval` seconds while partitions are being handed off, a progress line when
    it changed; one line when the handoff is over."""
    last = ""
    while True:
        await trio.sleep(interval)
        progress = status()["handoff"]
        if progress:
            line = (f"handoff: {progress['partitions_left']} partitions left, "
                    f"{progress['keys_sent']} keys sent")
            if line != last:
                say(line)
                last = line
        elif last:
            say("handoff: done")
            last = ""


class ApiError(Exception):
    """A request the API answers with `status` and {"error": code, "message": ...}."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class KvApi:
    """The store's endpoints. Every answer is JSON; a request the store cannot serve is a
    4xx or 503 with {"error": code, "message": text}, never a traceback."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv

    def register(self, api: ControlApi) -> None:
        api.add_route("/kv/{key:path}", _guarded(self.key), methods=("GET", "PUT", "DELETE"))
        api.add_route("/kv/{key:path}/{op}", _guarded(self.operation), methods=("POST",))
        api.add_route("/kv-batch", _guarded(self.batch), methods=("POST",))
        api.add_route("/kv-read", _guarded(self.read), methods=("POST",))
        api.add_route("/kv-status", _guarded(self.status))
        api.add_route("/kv-partitions", _guarded(self.partitions))
        api.add_route("/kv-local/{key:path}", _guarded(self.local))
        api.add_metrics(self.metrics)
        api.add_status("kv", self.kv.status)

    async def key(self, request: Request) -> Response:
        key = _key(request.path_params["key"])
        if request.method == "GET":
            consistency = _consistency(request.query_params.get("consistency"))
            return _json({"key": key, "value": await self.kv.get(key, consistency)})
        if request.method == "PUT":
            body = await _body(request)
            if "value" not in body:
                raise ApiError(400, "bad_request", 'expected {"value": ...}')
            await self.kv.put(key, _value(body["value"]), _write_consistency(request, body),
                              override_skew=_override_skew(request))
            return _json({"ok": True})
        await self.kv.delete(key, _consistency(request.query_params.get("consistency")),
                             override_skew=_override_skew(request))
        return _json({"ok": True})

    async def operation(self, request: Request) -> Response:
        key = _key(request.path_params["key"])
        op = request.path_params["op"]
        if op not in OPERATIONS:
            raise ApiError(404, "not_found", f"no operation {op!r}; one of {', '.join(OPERATIONS)}")
        body = await _body(request)
        consistency = _write_consistency(request, body)
        if op == "incr":
            by = body.get("by", 1)
            if type(by) is not int or not -2**63 <= by < 2**63:
                raise ApiError(400, "bad_request", '"by" must be an integer in -2**63..2**63-1')
            await self.kv.incr(key, by, consistency)
        elif op in ("sadd", "srem"):
            members = body.get("members")
            if not isinstance(members, list) or not members:
                raise ApiError(400, "bad_request", 'expected {"members": [...]} (not empty)')
            members = [_value(m) for m in members]
            if op == "sadd":
                await self.kv.sadd(key, *members, consistency=consistency)
            else:
                await self.kv.srem(key, *members, consistency=consistency)
        else:
            field = body.get("field")
            if not isinstance(field, str):
                raise ApiError(400, "bad_request", '"field" must be a string')
            if op == "hset":
                if "value" not in body:
                    raise ApiError(400, "bad_request", 'expected {"field": ..., "value": ...}')
                await self.kv.hset(key, field, _value(body["value"]), consistency)
            else:
                await self.kv.hdel(key, field, consistency)
        return _json({"ok": True})

    async def batch(self, request: Request) -> Response:
        body = await _body(request)
        items = body.get("put")
        if not isinstance(items, dict) or not 0 < len(items) <= MAX_BATCH:
            raise ApiError(400, "bad_request",
                           f'expected {{"put": {{key: value, ...}}}} with 1 to {MAX_BATCH} keys')
        puts = {_key(key): _value(value) for key, value in items.items()}
        await self.kv.put_many(puts, _write_consistency(request, body))
        return _json({"ok": True, "count": len(puts)})

    async def read(self, request: Request) -> Response:
        body = await _body(request)
        keys = body.get("keys")
        if not isinstance(keys, list) or not 0 < len(keys) <= MAX_BATCH \
                or not all(isinstance(k, str) for k in keys):
            raise ApiError(400, "bad_request",
                           f'expected {{"keys": [...]}} with 1 to {MAX_BATCH} string keys')
        wanted: list[str | bytes] = [_key(k) for k in keys]
        consistency = _consistency(body.get("consistency"))
        return _json({"values": await self.kv.get_many(wanted, consistency)})

    async def status(self, request: Request) -> Response:
        return _json(self.kv.status())

    async def partitions(self, request: Request) -> Response:
        # one snapshot: the rows and the total are read in the same step of the event loop
        return _json({"keys": len(self.kv.store), "partitions": self.kv.partition_status(),
                      "ring": ring_shares(self.kv.ring)})

    async def local(self, request: Request) -> Response:
        """Debugging: what this node's own store holds for a key, without asking replicas."""
        key = _key(request.path_params["key"])
        raw = key.encode()
        state, replicas = self.kv.local_state(raw)
        return _json({
            "key": key,
            "present": state is not None,
            "value": render(crdt.decode(state)) if state is not None else None,
            "replicas": replicas,
        })

    def metrics(self) -> Iterator[Metric]:
        status = self.kv.status()
        yield Metric("kv_keys", status["keys"], "gauge", "keys in this node's store")
        yield Metric("kv_partitions_owned", status["partitions_owned"], "gauge",
                     "partitions this node holds a replica of")
        for name, help_text in COUNTERS:
            yield Metric(f"kv_{name}", status["metrics"][name], "counter", help_text)
        yield Metric("kv_hints_pending", sum(status["hints_pending"].values()), "gauge",
                     "hinted writes held here for replicas that were down")
        yield Metric("kv_replication_backlog", status["replication_backlog"], "gauge",
                     "deltas queued for other replicas")


def ring_shares(ring: Ring) -> dict[str, dict[str, int]]:
    """Per ring member, how many partitions it replicates and of how many it is the primary
    (the whole ring as this node sees it; the dashboard's ring table)."""
    shares = {member: {"partitions": 0, "primary": 0} for member in sorted(ring.members)}
    for partition in range(ring.partitions):
        owners = ring.owners(partition)
        for owner in owners:
            shares[owner]["partitions"] += 1
        if owners:
            shares[owners[0]]["primary"] += 1
    return shares


def _guarded(handler: Endpoint) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error(exc.status, exc.code, str(exc))
        except Exception as exc:
            status, code = _classify(exc)
            if status == 0:
                raise  # a bug: let it show
            return _error(status, code, _first_leaf(exc))
    return endpoint


def _classify(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error code) for a store error (the first one, inside the exception
    groups of the store's nurseries), or (0, "") if anything in it is unexpected."""
    if isinstance(exc, BaseExceptionGroup):
        kinds = [_classify(inner) for inner in exc.exceptions]
        return (0, "") if (0, "") in kinds else kinds[0]
    if isinstance(exc, OutcomeUnknown):  # a QuorumError: tested first
        # the replica that applies the write did not answer in time: the write may or may
        # not have been applied (an incr retried may count twice), unlike a plain quorum
        # failure, whose replica answered
        return 504, OutcomeUnknown.code
    if isinstance(exc, QuorumError):
        return 503, "quorum"
    if isinstance(exc, NotAdmitted):
        return 403, "not_admitted"
    if isinstance(exc, OpError):
        return (413 if exc.code == "too_large" else 400), exc.code
    if isinstance(exc, RequestError):
        # kv.KV lets a transport failure of the mutating replica (a timeout, a connection
        # reset mid-request) escape as itself rather than as QuorumError; to the client it
        # means the same: the write is not acknowledged
        return 503, "unavailable"
    return 0, ""


def _first_leaf(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return str(exc)


def _json(value: Any, status: int = 200) -> Response:
    return JSONResponse(_jsonable(value), status_code=status)


def _jsonable(value: Any) -> Any:
    """Stored values as JSON: what JSON cannot carry (bytes, non-finite floats, written by
    embedding programs) becomes {"$base64": ...} or {"$float": "nan" | "inf" | "-inf"}."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return {"$base64": base64.b64encode(value).decode()}
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": str(value)}
    return value


def _key(text: str) -> str:
    if not text:
        raise ApiError(400, "bad_request", "empty key")
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate, which JSON's \ud800 escapes can carry
        raise ApiError(400, "bad_request", "key is not valid Unicode (a lone surrogate)"
                       ) from None
    return text


def _value(value: Any) -> Any:
    """`value` if the store can hold it (its size is the store's to check)."""
    try:
        pack_value(value)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, "bad_value", str(exc)) from None
    return value


def _consistency(text: Any) -> Consistency | None:
    if text is None:
        return None
    try:
        return Consistency(text)
    except ValueError:
        levels = ", ".join(c.value for c in Consistency)
        raise ApiError(400, "bad_request", f"consistency must be one of {levels}") from None


def _override_skew(request: Request) -> bool:
    """The operator's ?override_skew=true: replace a stored state beyond the clock skew
    bound (see kv.KV.put)."""
    text = request.query_params.get("override_skew")
    if text is None or text in ("false", "0"):
        return False
    if text in ("true", "1"):
        return True
    raise ApiError(400, "bad_request", "override_skew must be true or false")


def _write_consistency(request: Request, body: dict[str, Any]) -> Consistency | None:
    return _consistency(body.get("consistency", request.query_params.get("consistency")))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object a request carries, nested at most MAX_JSON_DEPTH levels. The content
    type must say JSON: a web page cannot send that cross-origin without a CORS preflight,
    which this API never grants."""
    if request.media_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, "too_large", f"body larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = parse_json(b"".join(chunks), parse_constant=_reject_constant)
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, nesting too deep
        raise ApiError(400, "bad_json", f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object")
    return body
