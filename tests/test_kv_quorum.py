# Model test of quorum counting (kv/quorum.py): a batch of writes, each with its level and
# number of copies, whose other replicas answer in any order (directly, or through a fallback
# node holding a hint for a replica that is down, or not at all: the hint kept here), with the
# batch filled at any point among the answers. After every step each write's count must equal
# a plain specification (acks that count: direct ones, and a fallback's only for a sloppy
# quorum, not at ALL; settled once enough counted or every replica is known), and the group
# must report done exactly once, only when filled and every write settled.
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from kv.config import Consistency
from kv.quorum import AckGroup, Acks

# what became of one other replica of a write
FATES = ("direct_ok", "direct_fail", "fallback_ok", "fallback_fail", "kept_here")


@dataclass
class Spec:
    """The specification of one write: which replica outcomes are known and which count."""

    needed: int
    total: int
    strict: bool
    known: int = 0
    ok: int = 0

    def learn(self, fate: str) -> None:
        self.known += 1
        if fate == "direct_ok" or (fate == "fallback_ok" and not self.strict):
            self.ok += 1

    @property
    def settled(self) -> bool:
        return self.needed <= 0 or self.total == 0 or self.ok >= self.needed or \
            self.known >= self.total


writes_strategy = st.lists(
    st.tuples(st.sampled_from(list(Consistency)), st.integers(1, 5), st.data()),
    min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(writes=writes_strategy, data=st.data())
def test_acks_agree_with_the_specification(writes, data):
    done_calls = [0]
    group = AckGroup(lambda: done_calls.__setitem__(0, done_calls[0] + 1))
    specs: list[Spec] = []
    acks: list[Acks] = []
    # per write, the outcomes still to arrive: (write index, fate), a fallback's answer later
    pending: list[tuple[int, str]] = []
    steps = ["add"] * len(writes) + ["fill"]
    added = 0
    filled = False

    def check() -> None:
        for spec, count in zip(specs, acks, strict=True):
            assert count.ok == spec.ok
            assert count.settled == spec.settled
        expected = 1 if filled and all(s.settled for s in specs) else 0
        assert done_calls[0] == expected

    while steps or pending:
        choices = ([steps[0]] if steps else []) + (["answer"] if pending else [])
        step = data.draw(st.sampled_from(choices))
        if step == "answer":
            index, fate = pending.pop(data.draw(st.integers(0, len(pending) - 1)))
            specs[index].learn(fate)
            acks[index](fate in ("direct_ok", "fallback_ok"))
        elif step == "fill":
            steps.pop(0)
            filled = True
            group.filled()
        else:
            steps.pop(0)
            level, copies, write_data = writes[added]
            fates = write_data.draw(st.lists(st.sampled_from(FATES), min_size=copies - 1,
                                             max_size=copies - 1))
            strict = level is Consistency.ALL
            # the coordinator is one of the copies and acks itself
            spec = Spec(level.needed(copies) - 1, copies - 1, strict)
            count = Acks(spec.needed, spec.total, group, strict)
            specs.append(spec)
            acks.append(count)
            for fate in fates:  # what the write path does as it sends the write out
                if fate.startswith("direct"):
                    pending.append((added, fate))
                    continue
                outcome = count.via_fallback()  # the replica is down: a hint goes out
                if outcome is None:  # strict: counted as failed at once
                    spec.learn("kept_here")
                elif fate == "kept_here":  # no fallback took it: kept here, not an ack
                    spec.learn(fate)
                    outcome(False)
                else:
                    pending.append((added, fate))
            added += 1
        check()
    assert filled and done_calls[0] == 1
    for spec, count in zip(specs, acks, strict=True):
        assert count.met == (spec.ok >= spec.needed)


def test_a_fallback_counts_for_a_quorum_but_not_for_all():
    done: list[bool] = []
    for level, acknowledged in ((Consistency.QUORUM, True), (Consistency.ALL, False)):
        group = AckGroup(lambda: done.append(True))
        count = Acks(level.needed(3) - 1, 2, group, level is Consistency.ALL)
        count(True)  # one replica acked directly
        hinted = count.via_fallback()  # the other is down: its fallback holds the hint
        if hinted is not None:
            hinted(True)
        group.filled()
        assert count.settled and count.met is acknowledged
    assert done == [True, True]
