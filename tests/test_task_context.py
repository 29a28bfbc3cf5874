# The task context over a real replicated store (three in-process nodes on 127.0.0.1, LevelDB
# dirs): blobs are content-addressed, so a node reads its own copy first and asks replicas
# only without one; whatever it reads, a copy that does not hash to its cid is never returned.
from __future__ import annotations

import time

import pytest

import crdt
from p2p.identity import Identity
from tasks.context import BLOB_PREFIX, NodeTaskContext

from kv_helpers import handles, wait_for


async def test_a_blob_is_read_from_the_local_copy_and_checked_against_its_cid(tmp_path):
    async with handles(tmp_path, 3) as nodes:
        kvs = [n.kv for n in nodes]
        writer, reader = (NodeTaskContext(kv, Identity.generate(), "t1") for kv in kvs[:2])
        cid = await writer.put_blob(b"greeting")
        await wait_for(lambda: all(kv.local_state(BLOB_PREFIX + cid).state is not None
                                   for kv in kvs), 15, "the blob on every replica")
        reads_before = kvs[1].metrics["reads"]
        assert await reader.get_blob(cid) == b"greeting"
        assert kvs[1].metrics["reads"] == reads_before  # no replica was asked

        # the reader's own copy of another blob is tampered with (a newer write of other
        # bytes): neither it nor the merge of the replicas' answers is returned
        real = await writer.put_blob(b"real")
        await wait_for(lambda: kvs[1].local_state(BLOB_PREFIX + real).state is not None, 15,
                       "the second blob on the reader")
        register = crdt.new("lww")
        newer_ms = int(time.time() * 1000) + 1000  # newer than the real write, within the bound
        tampered = register.assign(b"tampered", kvs[1].clock.now(newer_ms), "someone")
        await kvs[1].writer.merge([((BLOB_PREFIX + real).encode(), crdt.encode(tampered))])
        with pytest.raises(KeyError):
            await reader.get_blob(real)

        # with both other replicas gone, the reader still has its own copy
        for node in nodes[::2]:
            await node.stop()
        assert await reader.get_blob(cid) == b"greeting"
