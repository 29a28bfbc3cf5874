# The canonical binary form of CRDT states and the base classes the CRDT types derive from.
#
# Wire format: one msgpack array [type tag, format version, *body]; the body is type
# specific and written in a canonical order (sorted actors, dots, elements and keys; plain
# values as their canonical bytes), so equal states always give identical bytes. Decoding
# treats input as untrusted: size and nesting limits, strict shapes, and every failure is a
# DecodeError. merge_encoded, a store's per-write hot path, works on the plain unpacked
# documents: each type's merge_docs/checked_doc checks them with fast tests (counts_ok,
# context_doc, ...) and falls back to the Reader's checks, which say what is wrong.
# CausalState runs merge, wire form and that fast path for the causal types on the entries
# hooks each of them gives (its join, entries checks and wire form).
# No CRDT semantics live here, only the framing, the checks, the base classes and the registry.
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Self, TypeVar

import msgpack

from .causal import CausalContext, ContextDoc, Dot, context_doc_to_wire, merge_context_docs
from .errors import DecodeError
from .values import check_packed

DEFAULT_MAX_SIZE = 16 * 1024 * 1024
DEFAULT_MAX_DEPTH = 32
MAX_DEPTH_LIMIT = 256  # keeps the recursive checks far from Python's recursion limit
MAX_UINT64 = 2**64 - 1

_BYTES_TYPES = (bytes, bytearray, memoryview)
_ONLY_STR = {str}
_ONLY_INT = {int}
_BY_TAG: dict[int, type[State]] = {}
_BY_NAME: dict[str, type[State]] = {}
# One reusable packer (packb builds a new one per call). Sharing it across threads is safe:
# without a `default` hook, pack() runs to completion without releasing the GIL.
_packb = msgpack.Packer().pack
_unpackb = msgpack.unpackb


class State(ABC):
    """A CRDT state: an immutable value in a join semilattice.

    Every type offers value() (plain Python), merge(other) -> new state (the join; inputs are
    never changed), mutators that take the acting replica's id (a str) and return a delta
    (a small state of the same type: applying it is `state.merge(delta)`), is_empty(),
    encode() and decode(). Equality is value equality.
    """

    __slots__ = ()
    TYPE_NAME: ClassVar[str]
    TAG: ClassVar[int]
    VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "TAG" not in cls.__dict__:
            return  # a shared base of several types (CausalState), not a type of its own
        if cls.TAG in _BY_TAG or cls.TYPE_NAME in _BY_NAME:
            raise RuntimeError(f"duplicate CRDT type registration for {cls.TYPE_NAME}")
        _BY_TAG[cls.TAG] = cls
        _BY_NAME[cls.TYPE_NAME] = cls

    @abstractmethod
    def value(self) -> Any:
        """The state's value as plain Python."""

    @abstractmethod
    def merge(self, other: Self) -> Self:
        """The join (least upper bound) of two states of the same type."""

    @abstractmethod
    def is_empty(self) -> bool:
        """True for the bottom state (what new() returns)."""

    @abstractmethod
    def wire_body(self) -> list[Any]:
        """The body of the canonical wire form (after tag and version)."""

    @classmethod
    @abstractmethod
    def from_wire_body(cls, body: list[Any], reader: Reader, depth: int) -> Self:
        """Parse and check a body; `depth` is the nesting depth of the list holding it."""

    @classmethod
    def merge_docs(cls, current: list[Any], incoming: list[Any], reader: Reader) -> list[Any]:
        """Canonical document [tag, version, *body] of the merge of two documents of this type
        (tag and version already checked, bodies not). Types override this with a fast path
        for well-formed input that falls back to this one, whose errors say what is wrong."""
        mine = cls.from_wire_body(current[2:], reader, 1)
        return [cls.TAG, cls.VERSION,
                *mine.merge(cls.from_wire_body(incoming[2:], reader, 1)).wire_body()]

    @classmethod
    def checked_doc(cls, doc: list[Any], reader: Reader) -> list[Any]:
        """Canonical document of a document of this type (tag and version already checked),
        after the checks decode() makes. Types may override this with a cheaper check."""
        return [cls.TAG, cls.VERSION, *cls.from_wire_body(doc[2:], reader, 1).wire_body()]

    def encode(self) -> bytes:
        """Canonical bytes: equal states give identical bytes."""
        return encode(self)

    @classmethod
    def decode(cls, data: bytes, *, max_size: int = DEFAULT_MAX_SIZE,
               max_depth: int = DEFAULT_MAX_DEPTH) -> Self:
        """Decode bytes that must hold a state of this type (DecodeError otherwise)."""
        state = decode(data, max_size=max_size, max_depth=max_depth)
        if not isinstance(state, cls):
            raise DecodeError(f"expected a {cls.TYPE_NAME} state, got {state.TYPE_NAME}")
        return state

    def _check_same_type(self, other: object) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(self).__name__} with {type(other).__name__}")


E = TypeVar("E")


class CausalState(State, Generic[E]):
    """The skeleton of the causal types (MV register, add-wins set, OR-map): entries and the
    causal context that says which dots they have seen. Each type keeps its own entries, join
    and wire form, and names them here through the hooks below (staticmethods); the merge,
    the wire form and merge_encoded's fast path on plain documents are shared."""

    __slots__ = ("_entries", "_context")
    _entries: E
    _context: CausalContext

    # The join of two entries under their contexts: (a, ca, b, cb) -> entries.
    _join: ClassVar[staticmethod[[Any, CausalContext, Any, CausalContext], Any]]
    # Parse and check wire entries whose dots must all be in the context:
    # (obj, reader, depth of the list, context) -> entries.
    _read_entries: ClassVar[staticmethod[[Any, Reader, int, CausalContext], Any]]
    # Canonical wire form of entries.
    _entries_to_wire: ClassVar[staticmethod[[Any], list[Any]]]
    # The fast path (None: a type without one always takes State's object merge).
    # Wire entries checked against a context (obj, context, depth values may nest) -> the
    # type's document entries, or None when anything is wrong (read_entries then explains).
    _entries_doc: ClassVar[staticmethod[[Any, ContextDoc, int], Any] | None] = None
    # Canonical wire entries of the join of two document entries: (a, ca, b, cb) -> list.
    _merge_entries_docs: ClassVar[staticmethod[[Any, ContextDoc, Any, ContextDoc], list[Any]]
                                  | None] = None

    def __init__(self) -> None:
        self._entries = {}  # type: ignore[assignment]  # every causal type keeps a dict
        self._context = CausalContext()

    @classmethod
    def _make(cls, entries: E, context: CausalContext) -> Self:
        state = cls.__new__(cls)
        state._entries = entries
        state._context = context
        return state

    @property
    def context(self) -> CausalContext:
        return self._context

    def is_empty(self) -> bool:
        return not self._entries and self._context.is_empty()

    def merge(self, other: Self) -> Self:
        self._check_same_type(other)
        return self._make(self._join(self._entries, self._context, other._entries, other._context),
                          self._context.merge(other._context))

    def wire_body(self) -> list[Any]:
        return [context_to_wire(self._context), self._entries_to_wire(self._entries)]

    @classmethod
    def from_wire_body(cls, body: list[Any], reader: Reader, depth: int) -> Self:
        context_obj, entries_obj = reader.fields(body, cls.TYPE_NAME, 2)
        context = reader.context(context_obj, depth + 1)
        return cls._make(cls._read_entries(entries_obj, reader, depth + 1, context), context)

    @classmethod
    def merge_docs(cls, current: list[Any], incoming: list[Any], reader: Reader) -> list[Any]:
        # merge_encoded's hot path: [tag, version, context, entries] documents checked with
        # the fast tests and joined as they are, without state objects.
        entries_doc, merge_entries = cls._entries_doc, cls._merge_entries_docs
        max_depth = reader.max_depth
        if (entries_doc is not None and merge_entries is not None and len(current) == 4
                and len(incoming) == 4 and max_depth >= 4):
            ca, cb = context_doc(current[2]), context_doc(incoming[2])
            if ca is not None and cb is not None:
                a = entries_doc(current[3], ca, max_depth - 2)
                b = entries_doc(incoming[3], cb, max_depth - 2)
                if a is not None and b is not None:
                    return [cls.TAG, cls.VERSION, merge_context_docs(ca, cb),
                            merge_entries(a, ca, b, cb)]
        return super().merge_docs(current, incoming, reader)

    @classmethod
    def checked_doc(cls, doc: list[Any], reader: Reader) -> list[Any]:
        # Entries that pass the fast check are canonical as they are; the context gets
        # compacted.
        entries_doc, max_depth = cls._entries_doc, reader.max_depth
        if entries_doc is not None and len(doc) == 4 and max_depth >= 4:
            context = context_doc(doc[2])
            if context is not None and entries_doc(doc[3], context, max_depth - 2) is not None:
                return [cls.TAG, cls.VERSION, context_doc_to_wire(*context), doc[3]]
        return super().checked_doc(doc, reader)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, type(self)):
            return NotImplemented
        return self._entries == other._entries and self._context == other._context

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.value()!r}, {self._context!r})"


TYPE_NAMES: tuple[str, ...] = ("lww", "mvreg", "gcounter", "pncounter", "orset", "ormap")


def state_class(type_name: str) -> type[State]:
    """The class registered for a type name (ValueError for an unknown name)."""
    try:
        return _BY_NAME[type_name]
    except KeyError:
        raise ValueError(
            f"unknown CRDT type name {type_name!r}; known: {', '.join(TYPE_NAMES)}") from None


def new(type_name: str) -> State:
    """The empty (bottom) state of the named type: one of TYPE_NAMES."""
    return state_class(type_name)()


def encode(state: State) -> bytes:
    """Canonical bytes of a state."""
    return _packb([state.TAG, state.VERSION, *state.wire_body()])  # type: ignore[no-any-return]


def decode(data: bytes, *, max_size: int = DEFAULT_MAX_SIZE,
           max_depth: int = DEFAULT_MAX_DEPTH) -> State:
    """Decode untrusted bytes into a state of whatever type they declare.

    Refuses, with DecodeError, input longer than `max_size` bytes, nesting deeper than
    `max_depth` (arrays, maps and containers inside plain values all count), unknown type
    tags, unsupported format versions, non-canonical plain values and malformed bodies.
    """
    reader = _DEFAULT_READER if max_depth == DEFAULT_MAX_DEPTH else Reader(max_depth)
    return reader.state(_unpack(data, max_size), 1)


def merge_encoded(old: bytes | None, delta: bytes) -> bytes:
    """Canonical bytes of decode(old).merge(decode(delta)); `old` None means no state yet.

    Both inputs are checked as in decode() with the default limits. States of different
    types cannot be merged: DecodeError.
    """
    # The hot path of every store write: unpack each input once (in C), let the type check
    # and merge the plain documents, pack once; no state objects on the way. Well-formed
    # bytes skip the calls of _unpack and Reader.state_class (the same checks, inlined: a
    # fifth of this function's time); anything else takes them, and their errors.
    reader = _DEFAULT_READER
    if type(delta) is bytes and len(delta) <= DEFAULT_MAX_SIZE:
        try:
            incoming = _unpackb(delta)
        except Exception:
            incoming = _unpack(delta, DEFAULT_MAX_SIZE)  # raises the DecodeError
    else:
        incoming = _unpack(delta, DEFAULT_MAX_SIZE)
    found = (_BY_TAG.get(incoming[0]) if type(incoming) is list and len(incoming) >= 2
             and type(incoming[0]) is int else None)
    if found is not None and type(incoming[1]) is int and incoming[1] == found.VERSION:
        cls = found
    else:
        cls = reader.state_class(incoming, 1)
    if old is None:
        return _packb(cls.checked_doc(incoming, reader))  # type: ignore[no-any-return]
    if type(old) is bytes and len(old) <= DEFAULT_MAX_SIZE:
        try:
            current = _unpackb(old)
        except Exception:
            current = _unpack(old, DEFAULT_MAX_SIZE)
    else:
        current = _unpack(old, DEFAULT_MAX_SIZE)
    if (type(current) is list and len(current) >= 2 and current[0] == cls.TAG
            and type(current[0]) is int and type(current[1]) is int
            and current[1] == cls.VERSION):
        current_cls = cls
    else:
        current_cls = reader.state_class(current, 1)
    if current_cls is not cls:
        raise DecodeError(
            f"cannot merge a {cls.TYPE_NAME} delta into a {current_cls.TYPE_NAME} state")
    return _packb(cls.merge_docs(current, incoming, reader))  # type: ignore[no-any-return]


def _unpack(data: bytes, max_size: int) -> Any:
    if not isinstance(data, _BYTES_TYPES):
        raise TypeError(f"encoded state must be bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise DecodeError(f"encoded state is {len(data)} bytes, over the limit of {max_size}")
    try:
        return _unpackb(data)  # msgpack >= 1.0: raw=False, strict_map_key=True
    except Exception as exc:
        raise DecodeError(f"not a valid msgpack document: {exc or type(exc).__name__}") from None


class Reader:
    """Shape checks for untrusted wire data; every failure raises DecodeError."""

    __slots__ = ("max_depth",)

    def __init__(self, max_depth: int) -> None:
        if type(max_depth) is not int or not 1 <= max_depth <= MAX_DEPTH_LIMIT:
            raise ValueError(f"max_depth must be an int in 1..{MAX_DEPTH_LIMIT}")
        self.max_depth = max_depth

    def state_class(self, obj: Any, depth: int) -> type[State]:
        """The class named by a [tag, version, *body] list, with the version checked."""
        if type(obj) is list and len(obj) >= 2 and type(obj[0]) is int:  # hot path
            cls = _BY_TAG.get(obj[0])
            if cls is not None and type(obj[1]) is int and obj[1] == cls.VERSION:
                return cls
        doc = self.array(obj, "state", depth)
        if len(doc) < 2:
            raise DecodeError("state must start with a type tag and a format version")
        tag, version = doc[0], doc[1]
        if type(tag) is not int:
            raise DecodeError(f"type tag must be an int, got {type(tag).__name__}")
        cls = _BY_TAG.get(tag)
        if cls is None:
            raise DecodeError(f"unknown CRDT type tag {tag}")
        if version != cls.VERSION or type(version) is not int:
            raise DecodeError(f"unsupported {cls.TYPE_NAME} format version {version!r} "
                              f"(supported: {cls.VERSION})")
        return cls

    def state(self, obj: Any, depth: int) -> State:
        cls = self.state_class(obj, depth)
        return cls.from_wire_body(obj[2:], self, depth)

    def fields(self, body: list[Any], type_name: str, count: int) -> list[Any]:
        if len(body) != count:
            raise DecodeError(f"{type_name} body: expected {count} fields, got {len(body)}")
        return body

    def array(self, obj: Any, what: str, depth: int, length: int | None = None) -> list[Any]:
        if type(obj) is not list:
            raise DecodeError(f"{what}: expected an array, got {type(obj).__name__}")
        if depth > self.max_depth:
            raise DecodeError(f"{what}: nested deeper than max_depth={self.max_depth}")
        if length is not None and len(obj) != length:
            raise DecodeError(f"{what}: expected {length} items, got {len(obj)}")
        return obj

    def uint(self, obj: Any, what: str, low: int = 0) -> int:
        if type(obj) is not int or not low <= obj <= MAX_UINT64:
            raise DecodeError(f"{what}: expected an int in {low}..2**64-1, got {obj!r:.40}")
        return obj

    def text(self, obj: Any, what: str) -> str:
        if type(obj) is not str:
            raise DecodeError(f"{what}: expected a string, got {type(obj).__name__}")
        return obj

    def actor(self, obj: Any, what: str) -> str:
        if type(obj) is not str or not obj:
            raise DecodeError(f"{what}: expected a non-empty actor id string, got {obj!r:.40}")
        return obj

    def flag(self, obj: Any, what: str) -> bool:
        if type(obj) is not bool:
            raise DecodeError(f"{what}: expected a bool, got {type(obj).__name__}")
        return obj

    def value(self, obj: Any, what: str, depth: int) -> bytes:
        """A plain value carried as its canonical bytes; `depth` is that of its container."""
        if type(obj) is not bytes:
            raise DecodeError(f"{what}: expected a packed value (bin), got {type(obj).__name__}")
        try:
            check_packed(obj, self.max_depth - depth)
        except DecodeError as exc:
            raise DecodeError(f"{what}: {exc}") from None
        return obj

    def pairs(self, obj: Any, what: str, depth: int, *, unique_actors: bool) -> list[Dot]:
        """A flat [actor, n, actor, n, ...] list, n >= 1, in strictly increasing order
        (of actor alone when unique_actors, else of (actor, n))."""
        flat = self.array(obj, what, depth)
        if len(flat) == 2:  # the common case of a single dot
            actor, n = flat
            if type(actor) is not str or not actor or type(n) is not int or not 0 < n <= MAX_UINT64:
                self.dot(actor, n, what)  # raises, naming the bad part
            return [(actor, n)]
        if not flat:
            return []
        actors, counts = flat[::2], flat[1::2]
        if len(actors) != len(counts):
            raise DecodeError(f"{what}: expected actor/counter pairs, got an odd length")
        # Checks done with builtins over whole lists (hot path); any failure is explained.
        if (set(map(type, actors)) != _ONLY_STR or set(map(type, counts)) != _ONLY_INT
                or not all(actors) or min(counts) < 1 or max(counts) > MAX_UINT64):
            for actor, n in zip(actors, counts, strict=True):
                self.dot(actor, n, what)
        pairs: list[Dot] = list(zip(actors, counts, strict=True))
        if unique_actors:
            in_order = sorted(set(actors)) == actors
        else:
            in_order = sorted(set(pairs)) == pairs
        if not in_order:
            raise DecodeError(f"{what}: entries not in strictly increasing order")
        return pairs

    def counts(self, obj: Any, what: str, depth: int) -> dict[str, int]:
        """A map actor -> count (count >= 1) with keys in sorted order."""
        if type(obj) is not dict:
            raise DecodeError(f"{what}: expected a map, got {type(obj).__name__}")
        if depth > self.max_depth:
            raise DecodeError(f"{what}: nested deeper than max_depth={self.max_depth}")
        if not obj:
            return obj
        previous = ""
        for actor, n in obj.items():
            if type(actor) is not str or type(n) is not int or not 1 <= n <= MAX_UINT64:
                self.dot(actor, n, what)  # raises, naming the bad part
            if actor <= previous:
                raise DecodeError(f"{what}: actors not in strictly increasing order")
            previous = actor
        return obj

    def dot(self, actor: Any, counter: Any, what: str) -> Dot:
        return (self.actor(actor, what), self.uint(counter, what, 1))

    def context(self, obj: Any, depth: int) -> CausalContext:
        if depth < self.max_depth:  # hot path: well-formed input
            doc = context_doc(obj)
            if doc is not None:
                return CausalContext(doc[0], doc[1])
        parts = self.array(obj, "causal context", depth, 2)
        vv = self.pairs(parts[0], "version vector", depth + 1, unique_actors=True)
        cloud = self.pairs(parts[1], "dot cloud", depth + 1, unique_actors=False)
        return CausalContext(dict(vv), cloud)


def counts_ok(obj: Any) -> bool:
    """True if `obj` is a well-formed wire count map (what Reader.counts accepts): the fast
    check of merge hot paths, which fall back to Reader.counts to explain a failure."""
    if type(obj) is not dict:
        return False
    previous = ""
    for actor, n in obj.items():
        if (type(actor) is not str or actor <= previous or type(n) is not int
                or not 0 < n <= MAX_UINT64):
            return False
        previous = actor
    return True


def context_doc(obj: Any) -> ContextDoc | None:
    """The context of a well-formed wire causal context (what Reader.context accepts), else
    None: the fast check of merge hot paths, which fall back to Reader.context to explain."""
    if type(obj) is not list or len(obj) != 2:
        return None
    flat, cloud_flat = obj
    if type(flat) is not list or type(cloud_flat) is not list or len(flat) % 2:
        return None
    vv: dict[str, int] = {}
    previous = ""
    for i in range(0, len(flat), 2):
        actor, n = flat[i], flat[i + 1]
        if (type(actor) is not str or actor <= previous or type(n) is not int
                or not 0 < n <= MAX_UINT64):
            return None
        vv[actor] = n
        previous = actor
    cloud = dots_doc(cloud_flat)
    return None if cloud is None else (vv, set(cloud))


def dots_doc(flat: Any) -> list[Dot] | None:
    """The dots of a well-formed flat [actor, n, ...] list in strictly increasing order, else
    None (what Reader.pairs accepts with unique_actors false)."""
    if type(flat) is not list or len(flat) % 2:
        return None
    dots: list[Dot] = []
    previous: Dot = ("", 0)
    for i in range(0, len(flat), 2):
        dot = (flat[i], flat[i + 1])
        actor, n = dot
        if (type(actor) is not str or actor == "" or type(n) is not int
                or not 0 < n <= MAX_UINT64 or dot <= previous):
            return None
        dots.append(dot)
        previous = dot
    return dots


def check_actor(actor: object) -> str:
    """Actor (replica) ids are non-empty str everywhere in this package."""
    if type(actor) is not str or not actor:
        raise ValueError(f"actor must be a non-empty str, got {actor!r}")
    return check_text(actor, "actor")


def check_text(text: str, what: str) -> str:
    """`text` if msgpack can write it (UTF-8 encodable: no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text: {text!r}") from None
    return text


def context_to_wire(context: CausalContext) -> list[Any]:
    vv: list[Any] = []
    for actor, n in sorted(context.version_vector.items()):
        vv += (actor, n)
    cloud: list[Any] = []
    for actor, n in sorted(context.cloud):
        cloud += (actor, n)
    return [vv, cloud]


def sorted_counts(counts: dict[str, int]) -> dict[str, int]:
    """The wire form of an actor -> count map: the same map with its keys in sorted order."""
    return dict(sorted(counts.items()))


_DEFAULT_READER = Reader(DEFAULT_MAX_DEPTH)
