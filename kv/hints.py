# Hinted handoff storage: deltas held for a replica that was down when they were written.
# Lives here: a LevelDB of its own (beside the main store) keyed by target peer and arrival
# sequence, written with sync so an acknowledged hint survives a crash, and the expiry of hints
# older than a given age.
# Must not live here: deciding when to deliver or what age is too old (kv/repair.py does).
#
# Layout: key = target + b"\x00" + 8-byte sequence; value = msgpack [key, delta, added_ms],
# added_ms the wall time the hint was stored, never less than the hint stored before it (so
# hints are in added order within a target and expiry stops at the first young one). Records
# of the first format, [key, delta], are rewritten on open with the open time as added_ms:
# their age counts from the upgrade. Open reads every record: a damaged database (LevelDB's
# paranoid checks, or a record that is not a hint) is refused with StoreOpenError, never met
# later by a delivery or an expiry.
from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import plyvel

from shard import StoreOpenError, open_leveldb

_SEQ = struct.Struct(">Q")
_MOVE_ASIDE = ("move the directory aside and restart: the writes it held for other replicas "
               "reach them by anti-entropy instead")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class HintStore:
    def __init__(self, path: Path, clock: Callable[[], int] = wall_ms) -> None:
        """`clock`: wall time in milliseconds (tests pass their own)."""
        # paranoid checks: a damaged log stops the open (StoreOpenError) instead of losing hints
        self._db = open_leveldb(str(path), create=True, what="hints database",
                                advice=_MOVE_ASIDE, paranoid_checks=True)
        self._clock = clock
        self._seq = 0  # the highest sequence of any target (targets sort before sequences)
        self._last_added = 0
        self._counts: dict[str, int] = {}
        try:
            self._load()
        except (plyvel.Error, ValueError, TypeError, IndexError, struct.error) as exc:
            self._db.close()
            raise StoreOpenError(f"cannot open hints database {path}: unreadable record "
                                 f"({exc!r}); {_MOVE_ASIDE}") from exc
        except BaseException:
            self._db.close()
            raise

    def _load(self) -> None:
        """Counts, the last sequence and the last added time from the stored hints; records of
        the first format rewritten."""
        legacy: list[tuple[bytes, bytes]] = []
        for key, value in self._db.iterator():
            target = key[: -_SEQ.size - 1].decode()
            self._counts[target] = self._counts.get(target, 0) + 1
            self._seq = max(self._seq, _SEQ.unpack(key[-_SEQ.size:])[0])
            record = msgpack.unpackb(value)  # every record: later reads must not meet garbage
            if (not isinstance(record, list) or len(record) not in (2, 3)
                    or not all(isinstance(part, bytes) for part in record[:2])):
                raise ValueError(f"hint {key!r} is not [key, delta, added]")
            if len(record) == 2:
                legacy.append((key, value))
            elif type(record[2]) is int:
                self._last_added = max(self._last_added, record[2])
            else:
                raise ValueError(f"hint {key!r} has no added time")
        if legacy:
            opened = self._stamp()
            with self._db.write_batch(sync=True) as batch:
                for key, value in legacy:
                    batch.put(key, msgpack.packb([*msgpack.unpackb(value), opened]))

    def _stamp(self) -> int:
        self._last_added = max(self._last_added, self._clock())
        return self._last_added

    def close(self) -> None:
        self._db.close()

    def add(self, target: str, items: list[tuple[bytes, bytes]]) -> None:
        prefix = target.encode() + b"\x00"
        added = self._stamp()
        with self._db.write_batch(sync=True) as batch:
            for key, delta in items:
                self._seq += 1
                batch.put(prefix + _SEQ.pack(self._seq), msgpack.packb([key, delta, added]))
        self._counts[target] = self._counts.get(target, 0) + len(items)

    def targets(self) -> list[str]:
        return list(self.pending())

    def pending(self) -> dict[str, int]:
        return {t: n for t, n in self._counts.items() if n > 0}

    def take(self, target: str, limit: int, max_bytes: int) -> list[tuple[bytes, bytes, bytes]]:
        """Up to `limit` hints (and about `max_bytes`) for `target`, oldest first:
        (hint id, key, delta). The first hint is always taken, whatever its size."""
        out: list[tuple[bytes, bytes, bytes]] = []
        size = 0
        for hint_id, value in self._db.iterator(prefix=target.encode() + b"\x00"):
            key, delta = msgpack.unpackb(value)[:2]
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
        left = self._counts.get(target, 0) - len(hint_ids)
        if left > 0:
            self._counts[target] = left
        else:  # a target met once (a member since forgotten) keeps no entry
            self._counts.pop(target, None)

    def expire(self, target: str, max_age_ms: int, chunk: int = 10_000) -> int:
        """Delete the hints for `target` stored more than `max_age_ms` ago; return how many."""
        oldest = self._clock() - max_age_ms
        expired: list[bytes] = []
        total = 0
        for hint_id, value in self._db.iterator(prefix=target.encode() + b"\x00"):
            if msgpack.unpackb(value)[2] >= oldest:
                break  # added times never decrease: every later hint is younger
            expired.append(hint_id)
            if len(expired) >= chunk:
                self.remove(target, expired)
                total, expired = total + len(expired), []
        if expired:
            self.remove(target, expired)
        return total + len(expired)
