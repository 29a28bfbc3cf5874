# Behaviour in named situations: concurrent add/remove, unseen removes, re-adds, deletion
# markers that must not come back, LWW ties, clock skew, ORMap nested-update-vs-remove,
# and argument checking.
from __future__ import annotations

import pytest

from crdt import (
    HLC,
    ClockDriftError,
    GCounter,
    LWWRegister,
    MVRegister,
    ORMap,
    ORSet,
    PNCounter,
    Timestamp,
    decode,
    encode,
    merge_encoded,
)


def apply(state, delta):  # type: ignore[no-untyped-def]
    return state.merge(delta)


# --- ORSet -------------------------------------------------------------------------------

def test_concurrent_add_and_remove_add_wins() -> None:
    a = apply(ORSet(), ORSet().add("a", "x"))
    b = a  # b has seen a's add
    b = apply(b, b.remove("x"))
    a = apply(a, a.add("a", "x"))  # concurrent re-add on a
    assert a.merge(b).value() == ["x"] == b.merge(a).value()
    # A concurrent add on the remover's side of a different actor also wins.
    c = apply(ORSet(), ORSet().add("c", "y"))
    d = c.merge(ORSet())
    c_removed = apply(c, c.remove("y"))
    d_added = apply(d, d.add("d", "y"))
    assert c_removed.merge(d_added).contains("y")


def test_remove_of_unseen_element_has_no_effect() -> None:
    empty = ORSet()
    delta = empty.remove("x")
    assert delta.is_empty()
    added = apply(ORSet(), ORSet().add("a", "x"))
    # b removes "x" before hearing of a's add: the add survives.
    b = apply(ORSet(), ORSet().remove("x"))
    assert b.merge(added).value() == ["x"]


def test_remove_then_readd_and_late_replica_cannot_resurrect() -> None:
    s = ORSet()
    s = apply(s, s.add("a", "x"))
    s = apply(s, s.add("a", "y"))
    late = s  # a replica that stops hearing anything from here on
    s = apply(s, s.remove("x"))
    assert s.merge(late).value() == ["y"] == late.merge(s).value()
    s = apply(s, s.add("a", "x"))
    assert s.merge(late).value() == ["x", "y"]
    s = apply(s, s.remove("x"))
    assert sorted(s.merge(late).value()) == ["y"]
    # Removes leave no per-element tombstone: only the causal context remembers.
    assert s.value() == ["y"] and len(s) == 1
    assert s.context.version_vector == {"a": 3} and not s.context.cloud


def test_remove_delta_carries_only_the_causal_context() -> None:
    s = ORSet().merge(ORSet().add("a", "x")).merge(ORSet().add("b", "x"))  # concurrent adds
    delta = s.remove("x")
    assert delta.value() == [] and delta.context.version_vector == {"a": 1, "b": 1}
    # A sequential re-add supersedes the earlier add: only its own dot stays live.
    again = apply(s, s.add("c", "x"))
    assert again.remove("x").context.version_vector == {"c": 1}


def test_out_of_order_deltas_leave_gaps_in_the_dot_cloud() -> None:
    s = ORSet()
    deltas = []
    for element in ("p", "q", "r"):
        d = s.add("a", element)
        deltas.append(d)
        s = apply(s, d)
    receiver = ORSet().merge(deltas[2])
    assert receiver.context.cloud == frozenset({("a", 3)})
    receiver = receiver.merge(deltas[0]).merge(deltas[1])
    assert receiver == s and receiver.context.version_vector == {"a": 3}
    assert not receiver.context.cloud


# --- registers ---------------------------------------------------------------------------

def test_lww_ties_break_on_actor_id_in_any_merge_order() -> None:
    ts = Timestamp(100, 0)
    low = LWWRegister().assign("from a", ts, "a")
    high = LWWRegister().assign("from b", ts, "b")
    assert low.merge(high).value() == "from b" == high.merge(low).value()
    assert encode(low.merge(high)) == encode(high.merge(low))
    # The same (timestamp, actor) with different payloads still merges deterministically.
    one = LWWRegister().assign(1, ts, "a")
    two = LWWRegister().assign(2, ts, "a")
    assert one.merge(two) == two.merge(one)


def test_lww_later_timestamp_wins_and_tombstone_stays_deleted() -> None:
    reg = LWWRegister()
    reg = apply(reg, reg.assign("v1", Timestamp(1, 0), "a"))
    late = reg
    reg = apply(reg, reg.assign("v2", Timestamp(2, 0), "b"))
    reg = apply(reg, reg.delete(Timestamp(3, 0), "a"))
    assert reg.deleted and reg.value() is None and not reg.is_empty()
    assert reg.merge(late).deleted and late.merge(reg).deleted
    assert merge_encoded(encode(reg), encode(late)) == encode(reg)
    # A write after the deletion brings the register back deliberately.
    reg = apply(reg, reg.assign(None, Timestamp(4, 0), "a"))
    assert not reg.deleted and reg.value() is None and reg.timestamp == Timestamp(4, 0)


def test_mvreg_keeps_concurrent_values_until_overwritten() -> None:
    a = apply(MVRegister(), MVRegister().assign("a", "one"))
    b = apply(MVRegister(), MVRegister().assign("b", "two"))
    both = a.merge(b)
    assert both.value() == ["one", "two"]
    overwritten = apply(both, both.assign("c", "three"))
    assert overwritten.value() == ["three"] and overwritten.merge(a).value() == ["three"]
    cleared = apply(overwritten, overwritten.clear())
    assert cleared.value() == [] and cleared.merge(both).value() == []


# --- counters ----------------------------------------------------------------------------

def test_counters_sum_each_actor_once() -> None:
    g = GCounter()
    delta = g.increment("a", 5)
    g = apply(g, delta)
    assert g.merge(delta).merge(delta).value() == 5  # duplicated delivery counts once
    g = apply(g, g.increment("b"))
    assert g.value() == 6 and g.counts() == {"a": 5, "b": 1}
    p = PNCounter()
    p = apply(p, p.increment("a", 3))
    p = apply(p, p.decrement("b", 5))
    assert p.value() == -2


def test_counting_zero_gives_an_empty_delta() -> None:
    g = GCounter({"a": 2, "b": 0})
    assert g.counts() == {"a": 2} and g.increment("a", 0).is_empty()
    p = PNCounter({"a": 1})
    assert p.decrement("a", 0).is_empty() and p.increment("b", 0).is_empty()


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_counter_amounts_must_be_non_negative_ints(bad: object) -> None:
    with pytest.raises(ValueError):
        GCounter().increment("a", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PNCounter().decrement("a", bad)  # type: ignore[arg-type]


# --- HLC ---------------------------------------------------------------------------------

def test_hlc_is_monotonic_when_physical_time_goes_backwards() -> None:
    clock = HLC()
    readings = [clock.now(t) for t in (1000, 1000, 900, 500, 1001, 1001)]
    assert readings == sorted(readings) and len(set(readings)) == len(readings)
    assert readings[3] == Timestamp(1000, 3) and readings[4] == Timestamp(1001, 0)


def test_hlc_observe_moves_past_remote_within_drift() -> None:
    clock = HLC(max_drift_ms=50)
    clock.now(1000)
    ahead = clock.observe(Timestamp(1040, 7), 1000)
    assert ahead == Timestamp(1040, 8)
    assert clock.now(1001) == Timestamp(1040, 9)  # stays ahead of the slower local clock
    assert clock.observe(Timestamp(10, 0), 1100) == Timestamp(1100, 0)


def test_hlc_observe_with_equal_walls_passes_both_logical_counters() -> None:
    clock = HLC()
    clock.now(1000)
    assert clock.observe(Timestamp(1000, 5), 1000) == Timestamp(1000, 6)
    assert clock.observe(Timestamp(1000, 2), 999) == Timestamp(1000, 7)


def test_hlc_rejects_remote_timestamp_beyond_max_drift() -> None:
    clock = HLC(max_drift_ms=50)
    before = clock.now(1000)
    with pytest.raises(ClockDriftError, match="ahead"):
        clock.observe(Timestamp(1051, 0), 1000)
    assert clock.last == before  # unchanged by the refused timestamp
    assert clock.observe(Timestamp(1050, 0), 1000) == Timestamp(1050, 1)


def test_hlc_and_timestamps_check_their_inputs() -> None:
    with pytest.raises(ValueError):
        HLC().now(-1)
    with pytest.raises(ValueError):
        HLC(max_drift_ms=-5)
    with pytest.raises(ValueError):
        LWWRegister().assign(1, Timestamp(-1, 0), "a")
    with pytest.raises(ValueError):
        LWWRegister().assign(1, (1, 2, 3), "a")  # type: ignore[arg-type]


# --- ORMap -------------------------------------------------------------------------------

def test_ormap_nested_set_update_concurrent_with_remove_resets_the_key() -> None:
    m = ORMap()
    m = apply(m, m.update("a", "tags", "orset", lambda s: s.add("a", "old")))
    remover, updater = m, m
    remover = apply(remover, remover.remove("tags"))
    updater = apply(updater, updater.update("b", "tags", "orset", lambda s: s.add("b", "new")))
    merged = remover.merge(updater)
    assert merged == updater.merge(remover)
    assert merged.value() == {"tags": ["new"]}  # the update survives, the removed part not


def test_ormap_whole_value_update_concurrent_with_remove_keeps_updaters_view() -> None:
    m = ORMap()
    m = apply(m, m.update("a", "hits", "gcounter", lambda c: c.increment("a", 5)))
    remover = apply(m, m.remove("hits"))
    updater = apply(m, m.update("b", "hits", "gcounter", lambda c: c.increment("b", 1)))
    assert remover.merge(updater).value() == {"hits": 6}
    # Without a concurrent update the remove sticks, even against the old state.
    assert remover.merge(m).value() == {}


def test_ormap_remove_then_update_starts_fresh_and_old_replicas_cannot_resurrect() -> None:
    m = ORMap()
    m = apply(m, m.update("a", "hits", "gcounter", lambda c: c.increment("a", 5)))
    m = apply(m, m.update("a", "name", "lww", lambda r: r.assign("x", Timestamp(1, 0), "a")))
    late = m
    m = apply(m, m.remove("hits"))
    m = apply(m, m.remove("name"))
    assert m.merge(late).value() == {} == late.merge(m).value()
    m = apply(m, m.update("a", "hits", "gcounter", lambda c: c.increment("a", 2)))
    assert m.merge(late).value() == {"hits": 2}
    assert decode(merge_encoded(encode(m), encode(late))) == m.merge(late)


def test_ormap_key_disappears_when_its_nested_state_empties() -> None:
    m = ORMap()
    m = apply(m, m.update("a", "s", "orset", lambda s: s.add("a", 1)))
    m = apply(m, m.update("a", "s", "orset", lambda s: s.remove(1)))
    assert m.value() == {} and m.keys() == []


def test_ormap_nested_maps() -> None:
    m = ORMap()
    m = apply(m, m.update("a", "user", "ormap",
                          lambda u: u.update("a", "roles", "orset", lambda s: s.add("a", "x"))))
    m = apply(m, m.update("a", "user", "ormap",
                          lambda u: u.update("a", "age", "pncounter",
                                             lambda c: c.increment("a", 3))))
    assert m.value() == {"user": {"roles": ["x"], "age": 3}}
    m = apply(m, m.update("a", "user", "ormap", lambda u: u.remove("roles")))
    assert m.value() == {"user": {"age": 3}}
    assert decode(encode(m)) == m


def test_ormap_types_per_key() -> None:
    m = ORMap()
    m = apply(m, m.update("a", "k", "orset", lambda s: s.add("a", 1)))
    with pytest.raises(ValueError, match="holds orset, not gcounter"):
        m.update("a", "k", "gcounter", lambda c: c.increment("a"))
    other = ORMap()
    other = apply(other, other.update("b", "k", "gcounter", lambda c: c.increment("b", 4)))
    both = m.merge(other)
    # Concurrent creation with two types keeps both; value() shows the TYPE_NAMES-first one.
    assert both.value() == {"k": 4}
    orset = both.get("k", "orset")
    assert orset is not None and orset.value() == [1]
    both = apply(both, both.update("a", "k", "orset", lambda s: s.add("a", 2)))  # either type
    with pytest.raises(ValueError, match="holds gcounter and orset, not lww"):
        both.update("a", "k", "lww", lambda r: r)
    both = apply(both, both.remove("k"))
    assert both.value() == {}


def test_ormap_update_function_cannot_remove_other_keys_or_change_type() -> None:
    m = ORMap()
    m = apply(m, m.update("a", "keep", "orset", lambda s: s.add("a", 1)))
    # An updater returning a whole state (carrying the map's whole context) is tolerated.
    m = apply(m, m.update("a", "other", "orset", lambda s: s.merge(s.add("a", 2))))
    assert m.value() == {"keep": [1], "other": [2]}
    with pytest.raises(TypeError, match="must return a GCounter"):
        m.update("a", "n", "gcounter", lambda c: ORSet())
    with pytest.raises(ValueError, match="unknown CRDT type name"):
        m.update("a", "n", "bogus", lambda c: c)


# --- argument checks ---------------------------------------------------------------------

@pytest.mark.parametrize("actor", ["", b"a", None, 3, "\ud800"])
def test_actor_ids_are_non_empty_strings(actor: object) -> None:
    with pytest.raises(ValueError, match="actor"):
        ORSet().add(actor, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="actor"):
        GCounter().increment(actor)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [{1: 2}, {1, 2}, object(), 2**64, bytearray(b"x")])
def test_values_must_be_plain_msgpack(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        ORSet().add("a", value)
    with pytest.raises((TypeError, ValueError)):
        MVRegister().assign("a", value)


def test_too_deep_values_are_refused_locally() -> None:
    deep: list[object] = []
    for _ in range(40):
        deep = [deep]
    with pytest.raises(ValueError, match="deeper"):
        LWWRegister().assign(deep, Timestamp(1, 0), "a")


def test_map_keys_are_encodable_strings() -> None:
    with pytest.raises(TypeError):
        ORMap().update("a", 1, "gcounter", lambda c: c.increment("a"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="UTF-8"):
        ORMap().update("a", "\ud800", "gcounter", lambda c: c.increment("a"))


def test_merge_requires_the_same_type() -> None:
    with pytest.raises(TypeError):
        GCounter().merge(PNCounter())  # type: ignore[arg-type]
