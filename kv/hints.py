# Hinted handoff storage: deltas held for a replica that was down when they were written.
# Lives here: a LevelDB of its own (beside the main store) keyed by target peer and arrival
# sequence, written with sync so an acknowledged hint survives a crash.
# Must not live here: deciding when to deliver (the KV service does that).
from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import plyvel

_SEQ = struct.Struct(">Q")


class HintStore:
    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self._db = plyvel.DB(str(path), create_if_missing=True)
        self._seq = 0
        for key in self._db.iterator(include_value=False, reverse=True):
            self._seq = _SEQ.unpack(key[-_SEQ.size:])[0]
            break
        self._counts: dict[str, int] = {}
        for key in self._db.iterator(include_value=False):
            target = key[: -_SEQ.size - 1].decode()
            self._counts[target] = self._counts.get(target, 0) + 1

    def close(self) -> None:
        self._db.close()

    def add(self, target: str, items: list[tuple[bytes, bytes]]) -> None:
        prefix = target.encode() + b"\x00"
        with self._db.write_batch(sync=True) as batch:
            for key, delta in items:
                self._seq += 1
                batch.put(prefix + _SEQ.pack(self._seq), msgpack.packb([key, delta]))
        self._counts[target] = self._counts.get(target, 0) + len(items)

    def targets(self) -> list[str]:
        return [t for t, n in self._counts.items() if n > 0]

    def pending(self) -> dict[str, int]:
        return {t: n for t, n in self._counts.items() if n > 0}

    def take(self, target: str, limit: int, max_bytes: int) -> list[tuple[bytes, bytes, bytes]]:
        """Up to `limit` hints (and about `max_bytes`) for `target`, oldest first:
        (hint id, key, delta). The first hint is always taken, whatever its size."""
        out: list[tuple[bytes, bytes, bytes]] = []
        size = 0
        for hint_id, value in self._db.iterator(prefix=target.encode() + b"\x00"):
            key, delta = msgpack.unpackb(value)
            size += len(key) + len(delta)
            if out and size > max_bytes:
                break
            out.append((hint_id, key, delta))
            if len(out) >= limit:
                break
        return out

    def remove(self, target: str, hint_ids: list[bytes]) -> None:
        with self._db.write_batch(sync=True) as batch:
            for hint_id in hint_ids:
                batch.delete(hint_id)
        self._counts[target] = max(0, self._counts.get(target, 0) - len(hint_ids))
