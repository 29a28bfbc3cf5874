# Watching gossip through the control API: `POST /subscribe` makes the node subscribe to a
# topic (at most MAX_TOPICS of them for the life of the process), and `GET /gossip?topic=T&
# since=SEQ` reads back what arrived on it, from a bounded log per topic (the newest
# MAX_RECORDS messages, at most MAX_TOPIC_BYTES of them) that a background task fills as
# messages arrive, each stamped with its wall-clock receive time.
# Lives here: the sans-IO topic log (TopicLog: records numbered per topic, eviction, reads
# from a cursor; the receive time is passed in), the drain tasks, the two endpoints and the
# node extension that wires them (`watch_gossip`).
# Must not live here: publishing (api.py's /publish), gossip validation (p2p/network.py).
from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from p2p import GossipMessage, Network

from .api import ControlApi, Metric, bad_topic
from .http import MAX_JSON_DEPTH, JSONResponse, Request, Response, nests_deeper
from .http import error_response as _error

MAX_TOPICS = 16  # topics the API may subscribe the node to (a node never leaves a topic)
MAX_RECORDS = 1000  # kept per topic: the newest
MAX_TOPIC_BYTES = 4 * 1024 * 1024  # kept per topic, counted in signed-envelope bytes


@dataclass(frozen=True)
class GossipRecord:
    """One message as the node received it on a watched topic."""

    seq: int  # this node's number for it on this topic: 1, 2, ... (the read cursor)
    author: str  # peer id of the node that signed it
    origin_seq: int  # the author's sequence number of the message
    received_ms: float  # wall-clock time of arrival, milliseconds since the epoch
    size: int  # bytes of the signed envelope
    # the payload as JSON text when it is JSON-serialisable, else None: text, not the
    # decoded objects, which take up to ~35 times the bytes (a list of small integers)
    payload_json: str | None
    payload_len: int | None  # else: bytes of its msgpack encoding (see _as_json)

    @property
    def held_bytes(self) -> int:
        """What keeping the record costs, roughly: its JSON text or its envelope."""
        return max(self.size, len(self.payload_json or ""))

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "seq": self.seq, "from": self.author, "origin_seq": self.origin_seq,
            "received_ms": self.received_ms, "size": self.size}
        if self.payload_len is None:
            record["payload"] = json.loads(self.payload_json or "null")
        else:
            record["payload_len"] = self.payload_len
        return record


def _as_json(payload: Any, size: int) -> tuple[str | None, int | None]:
    """(its JSON text, None) if it is JSON-serialisable and nests at most MAX_JSON_DEPTH levels
    (what any JSON reader takes, and what /gossip can answer), else (None, its msgpack
    length, or `size` when msgpack cannot pack it again: a peer's payload may nest up to
    the 1,023 levels msgpack unpacks, past the 511 it packs and the ~990 json.dumps
    recurses through)."""
    try:
        text = json.dumps(payload, allow_nan=False, ensure_ascii=False)
        text.encode()  # a lone surrogate
        if text.count("[") + text.count("{") <= MAX_JSON_DEPTH or not nests_deeper(payload):
            return text, None
    except (TypeError, ValueError, RecursionError):  # bytes, NaN, a non-string key, deep
        pass
    try:
        return None, len(msgpack.packb(payload, use_bin_type=True))
    except (TypeError, ValueError):  # nested past msgpack's packing limit
        return None, size


class TopicLog:
    """The newest messages of one topic, numbered in arrival order (sans-IO)."""

    def __init__(self, topic: str, max_records: int = MAX_RECORDS,
                 max_bytes: int = MAX_TOPIC_BYTES) -> None:
        self.topic = topic
        self.max_records, self.max_bytes = max_records, max_bytes
        self.records: deque[GossipRecord] = deque()
        self.held_bytes = 0
        self.last_seq = 0
        self.evicted = 0

    def add(self, message: GossipMessage, received_ms: float) -> GossipRecord:
        payload, payload_len = _as_json(message.payload, message.size)
        self.last_seq += 1
        record = GossipRecord(self.last_seq, message.author, message.seq,
                              round(received_ms, 3), message.size, payload, payload_len)
        self.records.append(record)
        self.held_bytes += record.held_bytes
        while len(self.records) > self.max_records or (
                self.held_bytes > self.max_bytes and len(self.records) > 1):
            self.held_bytes -= self.records.popleft().held_bytes
            self.evicted += 1
        return record

    def read(self, since: int, limit: int) -> tuple[list[GossipRecord], int]:
        """Up to `limit` records numbered after `since`, oldest first, and how many records
        after `since` were evicted before this read (missed for good)."""
        first = self.records[0].seq if self.records else self.last_seq + 1
        missed = max(0, first - since - 1)
        start = max(0, since + 1 - first)
        out = [self.records[i] for i in range(start, min(len(self.records), start + limit))]
        return out, missed

    def summary(self) -> dict[str, Any]:
        return {"topic": self.topic, "last_seq": self.last_seq, "held": len(self.records),
                "held_bytes": self.held_bytes, "evicted": self.evicted}


class GossipWatch:
    """The topics the control API subscribed this node to, and their logs."""

    def __init__(self, net: Network, nursery: trio.Nursery, *,
                 max_topics: int = MAX_TOPICS, clock: Callable[[], float] = time.time) -> None:
        self.net = net
        self.max_topics = max_topics
        self.logs: dict[str, TopicLog] = {}
        self._nursery = nursery
        self._clock = clock

    def register(self, api: ControlApi) -> None:
        api.add_route("/subscribe", self._subscribe, methods=("POST",))
        api.add_route("/gossip", self._gossip)
        api.add_metrics(self.metrics)

    def metrics(self) -> list[Metric]:
        return [
            Metric("gossip_watched_topics", len(self.logs), "gauge",
                   "topics the control API subscribed this node to"),
            Metric("gossip_watch_records", sum(log.last_seq for log in self.logs.values()),
                   "counter", "messages recorded on watched topics"),
        ]

    async def subscribe(self, topic: str) -> bool:
        """Subscribe to `topic` and record what arrives on it; False if it already was.
        ValueError when MAX_TOPICS are watched already."""
        if topic in self.logs:
            return False
        if len(self.logs) >= self.max_topics:
            raise ValueError(f"this node already watches {self.max_topics} topics, "
                             "its limit until it restarts")
        log = self.logs[topic] = TopicLog(topic)  # taken before the await: no double join
        try:
            receive = await self.net.subscribe_raw(topic)
        except BaseException:
            del self.logs[topic]
            raise
        self._nursery.start_soon(self._record, log, receive)
        return True

    async def _record(self, log: TopicLog,
                      receive: trio.MemoryReceiveChannel[GossipMessage]) -> None:
        async with receive:
            async for message in receive:
                log.add(message, self._clock() * 1000)

    # -- endpoints ---------------------------------------------------------------------
    async def _subscribe(self, request: Request) -> Response:
        # as for /publish: a JSON content type cannot be sent cross-origin without a CORS
        # preflight, which this API never grants, so a web page cannot make the node subscribe
        if request.media_type != "application/json":
            return _error(415, "unsupported_media_type", "send the request as application/json")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "bad_json", "body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("topic"), str):
            return _error(400, "bad_request", 'expected {"topic": "..."}')
        topic = body["topic"]
        refused = bad_topic(topic)
        if refused is not None:
            return refused
        try:
            new = await self.subscribe(topic)
        except ValueError as exc:
            return _error(409, "too_many_topics", str(exc))
        return JSONResponse({"subscribed": True, "topic": topic, "new": new,
                             "last_seq": self.logs[topic].last_seq})

    async def _gossip(self, request: Request) -> Response:
        params = request.query_params
        topic = params.get("topic")
        if topic is None:
            return JSONResponse({"topics": [log.summary() for log in self.logs.values()],
                                 "max_topics": self.max_topics})
        log = self.logs.get(topic)
        if log is None:
            return _error(404, "not_subscribed",
                          f"not watching topic {topic!r}: POST /subscribe first")
        try:
            since = _whole(params.get("since", "0"), "since", 0, None)
            limit = _whole(params.get("limit", str(MAX_RECORDS)), "limit", 1, MAX_RECORDS)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        records, missed = log.read(since, limit)
        return JSONResponse({
            "topic": topic, "records": [r.to_dict() for r in records],
            "next": records[-1].seq if records else since,
            "last_seq": log.last_seq, "missed": missed})


def _whole(text: str, name: str, low: int, high: int | None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name!r} must be a whole number, not {text!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name!r} must be {bounds}, not {value}")
    return value


@asynccontextmanager
async def watch_gossip(net: Network, api: ControlApi) -> AsyncIterator[GossipWatch]:
    """The node extension that serves /subscribe and /gossip (runner.py enters it)."""
    async with trio.open_nursery() as nursery:
        watch = GossipWatch(net, nursery)
        watch.register(api)
        try:
            yield watch
        finally:
            nursery.cancel_scope.cancel()
