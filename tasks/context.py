# What a task sees of the node it runs on: `NodeTaskContext` (the TaskContext of tasks/api.py
# over the replicated store and the node key) and `StoreProver` (the storage task's view of
# the partitions this node replicates).
# Lives here: key scoping (task/<task id>/<node id>/<key>), blobs in the store (blob/<cid>,
# checked on read), signing and verifying with node keys, partition digests.
# Must not live here: round logic (tasks/engine.py, tasks/driver.py), the store itself (kv/).
from __future__ import annotations

import hashlib
import logging
from typing import Any

from libp2p.peer.id import ID

import crdt
from kv import KV
from kv.ops import render
from p2p.identity import Identity, verify_signature

from .api import StorageProver
from .blobs import cid_matches, cid_of

BLOB_PREFIX = "blob/"
TASK_PREFIX = "task/"
# keys a storage digest leaves out: they change every round (task data and blobs), so two
# replicas would digest them at different moments
VOLATILE_PREFIXES = (BLOB_PREFIX.encode(), TASK_PREFIX.encode())


class StoreProver(StorageProver):
    """Partitions of this node's replicated store, for the storage-proof task."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv

    def owned_partitions(self) -> list[int]:
        return sorted(self.kv.ring.partitions_of(self.kv.me))

    def replicas_of(self, partition: int) -> list[str]:
        return list(self.kv.ring.owners(partition))

    def members(self) -> list[str]:
        return sorted(self.kv.ring.members)

    def partitions_of(self, node_id: str) -> list[int]:
        return sorted(self.kv.ring.partitions_of(node_id))

    async def digest(self, partition: int, challenge: bytes) -> bytes:
        """sha256 over the challenge and every (key, value) of the partition, in key order,
        leaving out the task namespaces (see VOLATILE_PREFIXES). Values, not CRDT states:
        replicas hold the same values with internal metadata (dots, actors) that may differ
        after compaction. Two replicas that converged digest the same bytes; a replica that
        lost keys does not."""
        h = hashlib.sha256(challenge)
        for key, state in self.kv.store.iterate(partition):
            if key.startswith(VOLATILE_PREFIXES):
                continue
            value = crdt.decode(state).value()
            h.update(len(key).to_bytes(4, "big") + key)
            h.update(hashlib.sha256(repr(_plain(value)).encode()).digest())
        return h.digest()


def _plain(value: Any) -> Any:
    """A value in an order-independent form (sets sorted) for digesting."""
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, dict):
        return sorted(((k, _plain(v)) for k, v in value.items()), key=repr)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class NodeTaskContext:
    """The TaskContext a node gives one task."""

    def __init__(self, kv: KV, identity: Identity, task_id: str, *,
                 storage: StorageProver | None = None) -> None:
        self.kv = kv
        self.identity = identity
        self._task_id = task_id
        self._round = 0
        self._storage = storage
        self._log = logging.getLogger(f"tasks.task.{task_id}")

    def set_round(self, round: int) -> None:
        self._round = round

    @property
    def task_id(self) -> str:
        return self._task_id

    @property
    def round(self) -> int:
        return self._round

    @property
    def window(self) -> str:
        return "unknown"

    @property
    def node_id(self) -> str:
        return str(self.identity.peer_id)

    @property
    def log(self) -> logging.Logger:
        return self._log

    @property
    def storage(self) -> StorageProver | None:
        return self._storage

    def _key(self, key: str) -> str:
        """task/<task id>/<node id>/<key>: each node's own namespace of each task (as a Koii
        task's local store); what other nodes must read goes through blobs."""
        if not isinstance(key, str) or not key:
            raise ValueError("a task key is a non-empty string")
        return f"{TASK_PREFIX}{self._task_id}/{self.node_id}/{key}"

    async def get(self, key: str) -> Any:
        return await self.kv.get(self._key(key))

    async def put(self, key: str, value: Any) -> None:
        await self.kv.put(self._key(key), value)

    def sign(self, data: bytes) -> bytes:
        return self.identity.sign(data)

    def verify(self, node_id: str, data: bytes, signature: bytes) -> bool:
        try:
            public_key = ID.from_base58(node_id).extract_public_key()
        except Exception:
            return False
        if public_key is None:
            return False
        return verify_signature(public_key.to_bytes(), data, signature)

    async def put_blob(self, data: bytes) -> str:
        cid = cid_of(data)
        await self.kv.put(BLOB_PREFIX + cid, bytes(data))
        return cid

    async def get_blob(self, cid: str) -> bytes:
        # content-addressed: a copy that hashes to its cid is the blob, whoever holds it, so
        # this node's own copy is read first (no replica asked: an auditor or claimant that
        # replicates the key reads no network); only without one are R replicas read
        local = self.kv.local_state(BLOB_PREFIX + cid).state
        if local is not None:
            try:
                data = render(crdt.decode(local))
            except crdt.DecodeError:
                data = None
            if isinstance(data, bytes) and cid_matches(cid, data):
                return data
        data = await self.kv.get(BLOB_PREFIX + cid)
        if not isinstance(data, bytes) or not cid_matches(cid, data):
            raise KeyError(cid)
        return data
