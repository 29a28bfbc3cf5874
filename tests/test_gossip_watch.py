# Watching gossip through the control API (tasknet_node/gossipwatch.py): three node.py
# processes on 127.0.0.1 subscribe to a topic with POST /subscribe, each publishes on it with
# POST /publish, and every node reads every message back with GET /gossip (author, payload,
# receive time, size, the cursor); bad input gets its 4xx answer. The topic log's eviction
# and cursor arithmetic are checked on their own (sans-IO).
# Every process is killed in the fixture's teardown, whatever happens in the test.
from __future__ import annotations

import time
from typing import Any

from p2p import GossipMessage
from tasknet_node.api import MAX_TOPIC_CHARS
from tasknet_node.gossipwatch import MAX_TOPICS, TopicLog

from process_helpers import JsonApi, NodeProcess, Processes, processes_fixture, wait_for

NET = "gossip-watch"
FAST = ["--heartbeat-interval", "0.3", "--suspect-after", "1", "--dead-after", "2",
        "--no-tasks"]
TOPIC = "news"

processes = processes_fixture(NodeProcess)


def _records(api: JsonApi, topic: str = TOPIC, since: int = 0) -> list[dict[str, Any]]:
    status, answer = api.call("GET", f"/gossip?topic={topic}&since={since}")
    assert status == 200, answer
    records: list[dict[str, Any]] = answer["records"]
    return records


def test_three_nodes_subscribe_publish_and_read_back(processes: Processes) -> None:
    boot = processes.node("boot", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0",
                          "--network", NET, *FAST)
    _, boot_addr = wait_for(boot.announced, 20, "the bootstrap's start line")
    nodes = [boot] + [processes.node(name, "--join", boot_addr, "--network", NET, *FAST)
                      for name in ("a", "b")]
    ids = [wait_for(n.peer_id, 20, "a start line") for n in nodes]
    everyone = dict.fromkeys(ids, "alive")
    wait_for(lambda: all(n.states() == everyone for n in nodes), 30,
             "all three nodes to list each other alive")
    wait_for(lambda: all(n.status() for n in nodes), 20, "every API up")
    apis = [JsonApi(n.data_dir) for n in nodes]
    try:
        for api in apis:
            status, answer = api.call("POST", "/subscribe", {"topic": TOPIC})
            assert (status, answer["new"], answer["last_seq"]) == (200, True, 0), answer
            status, again = api.call("POST", "/subscribe", {"topic": TOPIC})
            assert (status, again["new"]) == (200, False), again
            assert _records(api) == []

        # the mesh forms at a gossip heartbeat after subscribing: probe until one message
        # from the bootstrap node reaches both others
        probes = 0

        def mesh_formed() -> bool:
            nonlocal probes
            probes += 1
            status, _ = apis[0].call("POST", "/publish",
                                     {"topic": TOPIC, "payload": {"probe": probes}})
            assert status == 200
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if all(_records(api) for api in apis[1:]):
                    return True
                time.sleep(0.05)
            return False

        wait_for(mesh_formed, 30, "a probe to reach every node")
        cursors = [max(r["seq"] for r in _records(api)) for api in apis]

        sent_ms = time.time() * 1000
        for i, api in enumerate(apis):
            status, _ = api.call("POST", "/publish",
                                 {"topic": TOPIC, "payload": {"from_node": i, "text": "hi"}})
            assert status == 200
        wanted = {(ids[i], i) for i in range(3)}

        def everyone_has_all() -> bool:
            return all({(r["from"], r["payload"]["from_node"])
                        for r in _records(api, since=cursor)
                        if "from_node" in r.get("payload", {})} == wanted
                       for api, cursor in zip(apis, cursors, strict=True))

        wait_for(everyone_has_all, 20, "every node to receive every node's message")
        read_ms = time.time() * 1000
        for api, cursor in zip(apis, cursors, strict=True):
            records = _records(api, since=cursor)
            assert [r["seq"] for r in records] == list(range(cursor + 1, cursor + 1 +
                                                             len(records)))
            for record in records:
                if "from_node" not in record["payload"]:
                    continue  # a late probe
                assert record["payload"]["text"] == "hi"
                assert sent_ms - 1 <= record["received_ms"] <= read_ms + 1
                assert 100 < record["size"] < 1000  # a signed envelope of a small payload
                assert record["origin_seq"] > 0
            # the cursor: nothing after the newest, one at a time with a limit
            last = records[-1]["seq"]
            status, answer = api.call("GET", f"/gossip?topic={TOPIC}&since={last}")
            assert (status, answer["records"], answer["next"], answer["last_seq"],
                    answer["missed"]) == (200, [], last, last, 0)
            status, answer = api.call("GET", f"/gossip?topic={TOPIC}&since={cursor}&limit=1")
            assert [r["seq"] for r in answer["records"]] == [cursor + 1]
            assert answer["next"] == cursor + 1
            status, listing = api.call("GET", "/gossip")
            assert status == 200 and listing["max_topics"] == MAX_TOPICS
            assert [(t["topic"], t["last_seq"]) for t in listing["topics"]] == [(TOPIC, last)]
    finally:
        for api in apis:
            api.close()


def test_bad_subscribe_and_read_requests_get_4xx(processes: Processes) -> None:
    node = processes.node("solo", "--bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0",
                          "--network", NET, *FAST)
    wait_for(node.status, 20, "the node's API")
    api = JsonApi(node.data_dir)
    try:
        def subscribe(body: Any, content_type: str = "application/json") -> tuple[int, str]:
            status, answer = api.call("POST", "/subscribe", body, content_type)
            return status, answer.get("error", "")

        # a web page cannot make the node subscribe: JSON only (as for /publish)
        assert subscribe(b'{"topic": "x"}', "text/plain") == (415, "unsupported_media_type")
        assert subscribe(b"{not json") == (400, "bad_json")
        assert subscribe({"topic": 5}) == (400, "bad_request")
        assert subscribe(["news"]) == (400, "bad_request")
        assert subscribe({"topic": ""}) == (400, "bad_topic")
        assert subscribe({"topic": "members"}) == (400, "bad_topic")  # the p2p layer's own
        assert subscribe({"topic": "x" * (MAX_TOPIC_CHARS + 1)}) == (400, "bad_topic")
        assert subscribe(rb'{"topic": "t\ud800"}') == (400, "bad_topic")

        status, answer = api.call("GET", "/gossip?topic=never")
        assert (status, answer["error"]) == (404, "not_subscribed")
        assert subscribe({"topic": "t0"}) == (200, "")
        for query in ("since=-1", "since=x", "limit=0", f"limit={10**6}"):
            status, answer = api.call("GET", f"/gossip?topic=t0&{query}")
            assert (status, answer["error"]) == (400, "bad_request"), query

        # at most MAX_TOPICS topics; the ones it has stay readable
        for i in range(1, MAX_TOPICS):
            assert subscribe({"topic": f"t{i}"}) == (200, "")
        assert subscribe({"topic": "one-too-many"}) == (409, "too_many_topics")
        assert subscribe({"topic": "t3"}) == (200, "")  # already watched: still fine
        status, listing = api.call("GET", "/gossip")
        assert len(listing["topics"]) == MAX_TOPICS
        status, answer = api.call("GET", "/gossip?topic=one-too-many")
        assert status == 404
    finally:
        api.close()


def _message(n: int, payload: Any = None, size: int = 100) -> GossipMessage:
    return GossipMessage("t", "peer", n, {"n": n} if payload is None else payload, size)


def test_topic_log_keeps_the_newest_and_counts_what_a_reader_missed() -> None:
    log = TopicLog("t", max_records=3, max_bytes=10_000)
    for n in range(1, 6):
        log.add(_message(n), received_ms=1000.0 + n)
    assert [r.seq for r in log.records] == [3, 4, 5] and log.evicted == 2
    records, missed = log.read(0, 10)
    assert [r.to_dict()["payload"] for r in records] == [{"n": 3}, {"n": 4}, {"n": 5}]
    assert missed == 2
    records, missed = log.read(3, 1)
    assert [r.seq for r in records] == [4] and missed == 0
    assert log.read(5, 10) == ([], 0)
    assert records[0].received_ms == 1004.0

    # by bytes too, the newest record always kept
    small = TopicLog("t", max_records=100, max_bytes=250)
    for n in range(1, 4):
        small.add(_message(n, size=100), 0.0)
    assert [r.seq for r in small.records] == [2, 3] and small.held_bytes == 200
    small.add(_message(4, size=1000), 0.0)
    assert [r.seq for r in small.records] == [4] and small.held_bytes == 1000

    # a payload JSON cannot carry is shown by its length
    raw = TopicLog("t").add(_message(1, payload=b"\x00" * 40), 0.0).to_dict()
    assert "payload" not in raw and raw["payload_len"] == 42  # msgpack: bin8 header + 40
    shown = TopicLog("t").add(_message(1, payload=[1, "a"]), 0.0).to_dict()
    assert shown["payload"] == [1, "a"] and "payload_len" not in shown

    # what a record holds is counted by its JSON text when that is larger than its envelope
    # (a 1 MiB list of small integers is ~2 MB of text), so the byte bound holds
    big = [7] * 100_000  # ~100 KB of msgpack, 300 KB of JSON text
    bounded = TopicLog("t", max_records=100, max_bytes=1_000_000)
    for n in range(1, 6):
        bounded.add(_message(n, payload=big, size=100_010), 0.0)
    assert bounded.held_bytes <= 1_000_000 and len(bounded.records) == 3
    assert all(isinstance(r.payload_json, str) for r in bounded.records)  # text, not objects


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_deeply_nested_payload_is_shown_by_its_length() -> None:
    # a peer's payload nested as deep as msgpack unpacks (up to 1,023 levels): json.dumps ran
    # out of stack (RecursionError) and msgpack could not pack it again, which stopped the
    # node; nested past MAX_JSON_DEPTH, /gossip could not answer (or its reader parse) it
    for depth in (101, 600, 1000):
        record = TopicLog("t").add(_message(1, payload=_nested(depth), size=depth + 50), 0.0)
        shown = record.to_dict()
        assert "payload" not in shown and 0 < shown["payload_len"] <= depth + 50, depth
    shown = TopicLog("t").add(_message(1, payload=_nested(100)), 0.0).to_dict()
    assert shown["payload"] == _nested(100)
