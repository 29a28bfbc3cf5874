# Observed-remove map from str keys to nested CRDTs, in delta-state form (Almeida et al.,
# "Delta State Replicated Data Types", 2018: a map of embedded causal CRDTs that
# share one causal context). Nothing but this type and the ways nested types live inside it.
#
# Semantics, for a key updated on one replica while another replica concurrently removes it:
#   * The key survives: an update concurrent with a remove wins (add-wins, like ORSet).
#   * Causal nested types ("orset", "mvreg", "ormap") use reset-remove: the remove takes
#     away everything its replica had observed under the key, so after the merge the key
#     holds only the effects of the concurrent update(s) (e.g. the one element added).
#   * Whole-value nested types ("lww", "gcounter", "pncounter") keep the updater's view:
#     each update stores the updater's complete nested state under a fresh dot, so the key
#     comes back as the updater saw it plus its update (a counter keeps its whole count).
#   * A remove followed (causally) by an update starts the key from empty, and a removed
#     key never comes back when an old replica merges: the shared causal context records
#     the removed dots, with no per-key tombstone.
#   * A key whose nested state becomes empty disappears (e.g. its last set element was
#     removed, or its register cleared).
# A field is a (key, type name) pair. Updating a key locally with a type it does not hold,
# while it holds another, raises ValueError; if replicas concurrently create one key with
# different types, both are kept, value() shows the one whose type comes first in
# TYPE_NAMES, and get(key, type_name) reads each. An update delta of a whole-value type
# carries that key's whole nested state.
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from functools import reduce
from typing import Any

from . import mvreg, orset
from .causal import CausalContext, Dot, join_dot_funs
from .codec import (
    TYPE_NAMES,
    CausalState,
    Reader,
    State,
    check_actor,
    check_text,
    state_class,
)
from .errors import DecodeError
from .gcounter import GCounter
from .lww import LWWRegister
from .pncounter import PNCounter

Field = tuple[str, str]  # (key, type name)
Fields = dict[Field, Any]  # field -> the nested type's store (see _Embedding)
Updater = Callable[[Any], State]

_TAG_OF = {name: index + 1 for index, name in enumerate(TYPE_NAMES)}


class _Embedding(ABC):
    """How one nested type is stored in a map field, joined, read and written."""

    @abstractmethod
    def join(self, a: Any, ca: CausalContext, b: Any, cb: CausalContext) -> Any: ...

    @abstractmethod
    def dots(self, store: Any) -> Iterable[Dot]: ...

    @abstractmethod
    def view(self, store: Any, context: CausalContext) -> State: ...

    @abstractmethod
    def delta(self, actor: str, store: Any, context: CausalContext,
              fn: Updater) -> tuple[Any, CausalContext]: ...

    @abstractmethod
    def to_wire(self, store: Any) -> list[Any]: ...

    @abstractmethod
    def read(self, obj: Any, reader: Reader, depth: int, context: CausalContext) -> Any: ...


class _CausalEmbedding(_Embedding):
    """A causal type whose entries (dot store) live in the field, under the map's context."""

    def __init__(self, cls: type[CausalState[Any]], dots: Callable[[Any], Iterable[Dot]]) -> None:
        self.cls = cls  # its entries hooks (join, wire form, reading) serve the field as well
        self._dots = dots

    def join(self, a: Any, ca: CausalContext, b: Any, cb: CausalContext) -> Any:
        return self.cls._join(a, ca, b, cb)

    def dots(self, store: Any) -> Iterable[Dot]:
        return self._dots(store)

    def view(self, store: Any, context: CausalContext) -> State:
        return self.cls._make(store, context)

    def delta(self, actor: str, store: Any, context: CausalContext,
              fn: Updater) -> tuple[Any, CausalContext]:
        nested = _call(fn, self.view(store, context), self.cls)
        entries = nested._entries
        # Keep only context dots that belong to this field, so an updater returning a full
        # state (with the whole map's context) cannot remove other keys.
        own = {*self.dots(store), *self.dots(entries)}
        return entries, CausalContext.from_dots(d for d in own if nested._context.contains(d))

    def to_wire(self, store: Any) -> list[Any]:
        return self.cls._entries_to_wire(store)

    def read(self, obj: Any, reader: Reader, depth: int, context: CausalContext) -> Any:
        return self.cls._read_entries(obj, reader, depth, context)


class _WholeEmbedding(_Embedding):
    """A non-causal type: the field maps dots to complete nested states, joined together."""

    def __init__(self, cls: Any) -> None:
        self.cls = cls

    def join(self, a: Any, ca: CausalContext, b: Any, cb: CausalContext) -> Any:
        return join_dot_funs(a, ca, b, cb, _merge_states)

    def dots(self, store: Any) -> Iterable[Dot]:
        return store.keys()  # type: ignore[no-any-return]

    def view(self, store: Any, context: CausalContext) -> State:
        return reduce(_merge_states, store.values(), self.cls())

    def delta(self, actor: str, store: Any, context: CausalContext,
              fn: Updater) -> tuple[Any, CausalContext]:
        current = self.view(store, context)
        dot = context.next_dot(actor)
        whole = current.merge(_call(fn, current, self.cls))
        return {dot: whole}, CausalContext.from_dots([dot, *store])

    def to_wire(self, store: Any) -> list[Any]:
        flat: list[Any] = []
        for dot in sorted(store):
            flat += (dot[0], dot[1], store[dot].wire_body())
        return flat

    def read(self, obj: Any, reader: Reader, depth: int, context: CausalContext) -> Any:
        flat = reader.array(obj, f"ormap {self.cls.TYPE_NAME} field", depth)
        if len(flat) % 3:
            raise DecodeError("ormap field: expected actor/counter/state triples")
        store: dict[Dot, State] = {}
        previous: Dot | None = None
        for i in range(0, len(flat), 3):
            dot = reader.dot(flat[i], flat[i + 1], "ormap field dot")
            if previous is not None and dot <= previous:
                raise DecodeError("ormap field: dots not in strictly increasing order")
            if not context.contains(dot):
                raise DecodeError(f"ormap field: dot {dot} missing from the causal context")
            body = reader.array(flat[i + 2], "ormap nested state", depth + 1)
            store[dot] = self.cls.from_wire_body(body, reader, depth + 1)
            previous = dot
        return store


def _merge_states(a: State, b: State) -> State:
    return a.merge(b)


def _call(fn: Updater, current: State, cls: type[State]) -> Any:
    nested = fn(current)
    if type(nested) is not cls:
        raise TypeError(f"update function must return a {cls.__name__} delta, "
                        f"got {type(nested).__name__}")
    return nested


def join_fields(a: Fields, ca: CausalContext, b: Fields, cb: CausalContext) -> Fields:
    out: Fields = {}
    for field in a.keys() | b.keys():
        embedding = _EMBEDDINGS[field[1]]
        store = embedding.join(a.get(field, {}), ca, b.get(field, {}), cb)
        if store:
            out[field] = store
    return out


def fields_dots(fields: Fields) -> list[Dot]:
    return [dot for (_, name), store in fields.items() for dot in _EMBEDDINGS[name].dots(store)]


def fields_to_wire(fields: Fields) -> list[Any]:
    flat: list[Any] = []
    for key, name in sorted(fields, key=lambda field: (field[0], _TAG_OF[field[1]])):
        flat += (key, _TAG_OF[name], _EMBEDDINGS[name].to_wire(fields[(key, name)]))
    return flat


def read_fields(obj: Any, reader: Reader, depth: int, context: CausalContext) -> Fields:
    """Parse fields whose dots must all be in `context`; `depth` is that of the list."""
    flat = reader.array(obj, "ormap fields", depth)
    if len(flat) % 3:
        raise DecodeError("ormap fields: expected key/type tag/store triples")
    fields: Fields = {}
    previous: tuple[str, int] | None = None
    for i in range(0, len(flat), 3):
        key = reader.text(flat[i], "ormap key")
        tag = reader.uint(flat[i + 1], "ormap field type tag")
        if not 1 <= tag <= len(TYPE_NAMES):
            raise DecodeError(f"ormap field {key!r}: unknown CRDT type tag {tag}")
        if previous is not None and (key, tag) <= previous:
            raise DecodeError("ormap fields: not in strictly increasing (key, tag) order")
        name = TYPE_NAMES[tag - 1]
        store = _EMBEDDINGS[name].read(flat[i + 2], reader, depth + 1, context)
        if not store:
            raise DecodeError(f"ormap field {key!r}: empty nested state")
        fields[(key, name)] = store
        previous = (key, tag)
    return fields


class ORMap(CausalState[Fields]):
    """Map from str keys to nested CRDTs. value() -> {key: nested value()}.

    Mutators, each -> delta: update(actor, key, type_name, fn) where fn receives the key's
    current nested state (empty if absent) and returns a delta of that type made with the
    nested type's own mutators (e.g. `lambda s: s.add(actor, "x")`); remove(key), and
    remove_many(keys) for many keys in one delta. See the
    module header for what happens when they are concurrent.
    """

    TYPE_NAME = "ormap"
    TAG = 6
    __slots__ = ()
    _join = staticmethod(join_fields)
    _read_entries = staticmethod(read_fields)
    _entries_to_wire = staticmethod(fields_to_wire)

    def _sorted_fields(self) -> list[Field]:
        return sorted(self._entries, key=lambda field: (field[0], _TAG_OF[field[1]]))

    def keys(self) -> list[str]:
        return sorted({key for key, _ in self._entries})

    def get(self, key: str, type_name: str | None = None) -> State | None:
        """The nested state under `key` (of `type_name`, or the one value() shows)."""
        for field in self._sorted_fields():
            if field[0] == key and type_name in (None, field[1]):
                return _EMBEDDINGS[field[1]].view(self._entries[field], self._context)
        return None

    def value(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in self._sorted_fields():
            if field[0] not in out:
                out[field[0]] = _EMBEDDINGS[field[1]].view(
                    self._entries[field], self._context).value()
        return out

    def update(self, actor: str, key: str, type_name: str, fn: Updater) -> ORMap:
        """Delta applying fn's nested delta to the `type_name` value under `key`."""
        check_actor(actor)
        if type(key) is not str:
            raise TypeError(f"ormap keys must be str, got {type(key).__name__}")
        check_text(key, "ormap key")
        state_class(type_name)  # ValueError for an unknown type name
        held = sorted(name for field_key, name in self._entries if field_key == key)
        if held and type_name not in held:
            raise ValueError(f"key {key!r} holds {' and '.join(held)}, not {type_name}")
        field = (key, type_name)
        embedding = _EMBEDDINGS[type_name]
        store, context = embedding.delta(actor, self._entries.get(field, {}), self._context, fn)
        return ORMap._make({field: store} if store else {}, context)

    def remove(self, key: str) -> ORMap:
        """Delta removing everything seen under `key` (empty delta if the key is absent)."""
        own = {field: store for field, store in self._entries.items() if field[0] == key}
        return ORMap._make({}, CausalContext.from_dots(fields_dots(own)))

    def remove_many(self, keys: Iterable[str]) -> ORMap:
        """One delta removing every key in `keys` (the join of their remove deltas), in time
        linear in the map's fields and the keys given."""
        removed = set(keys)
        own = {field: store for field, store in self._entries.items() if field[0] in removed}
        return ORMap._make({}, CausalContext.from_dots(fields_dots(own)))


_EMBEDDINGS: dict[str, _Embedding] = {
    "orset": _CausalEmbedding(orset.ORSet, orset.entries_dots),
    "mvreg": _CausalEmbedding(mvreg.MVRegister, lambda entries: entries),
    "ormap": _CausalEmbedding(ORMap, fields_dots),
    "lww": _WholeEmbedding(LWWRegister),
    "gcounter": _WholeEmbedding(GCounter),
    "pncounter": _WholeEmbedding(PNCounter),
}
