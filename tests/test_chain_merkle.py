# Merkle distribution lists (chain/merkle.py) and the round roles (chain/assignment.py): proofs
# verify for every listed entry and for nothing else; the auditor ring gives every submission
# exactly k = min(max_auditors, n - 1) auditors and every auditor exactly k targets.
from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chain.assignment import (
    audit_assignment,
    audit_seed,
    auditor_count,
    auditor_order,
    auditors_of,
    distribution_order,
    distributor_of,
    first_seed,
    may_audit,
    next_seed,
    prp,
    round_of,
    targets_of,
    window_of,
)
from chain.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    distribution_proof,
    distribution_proofs,
    distribution_root,
    hash_pair,
    ledger_leaf,
    merkle_proof,
    merkle_proofs,
    merkle_root,
    sha256,
    verify_ledger_claim,
    verify_proof,
)


def random_entries(rng: random.Random, n: int) -> dict[str, int]:
    return {f"node-{rng.getrandbits(48):012x}-{i}": rng.randrange(1, 10**12) for i in range(n)}


# --- the tree itself ---


def test_small_trees_follow_openzeppelins_layout() -> None:
    a, b, c = sorted(sha256(bytes([i])) for i in range(3))
    assert merkle_root([a], sha256) == a
    assert merkle_proof([a], 0, sha256) == []
    assert merkle_root([b, a], sha256) == sha256(a + b)
    # three leaves: nodes [root, H(a,b), c, b, a]; the lone leaf c pairs with H(a, b)
    assert merkle_root([c, a, b], sha256) == hash_pair(hash_pair(a, b, sha256), c, sha256)
    assert merkle_proof([c, a, b], 0, sha256) == [hash_pair(a, b, sha256)]
    assert merkle_proof([c, a, b], 1, sha256) == [b, c]


def test_root_ignores_the_order_leaves_are_given_in() -> None:
    rng = random.Random(7)
    leaves = [sha256(rng.randbytes(8)) for _ in range(37)]
    shuffled = leaves[:]
    rng.shuffle(shuffled)
    assert merkle_root(leaves) == merkle_root(shuffled)


def test_an_empty_tree_is_refused_and_an_empty_list_has_the_zero_root() -> None:
    with pytest.raises(ValueError):
        merkle_root([])
    assert distribution_root({}) == EMPTY_ROOT
    assert distribution_proofs({}) == {}


def test_the_hash_is_a_parameter() -> None:
    def blake(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=32).digest()

    leaves = [blake(bytes([i])) for i in range(10)]
    root = merkle_root(leaves, blake)
    assert root != merkle_root(leaves, sha256)
    for i, proof in enumerate(merkle_proofs(leaves, blake)):
        assert verify_proof(leaves[i], proof, root, blake)
        assert not verify_proof(leaves[i], proof, root, sha256)


@pytest.mark.parametrize("n", [*range(1, 34), 63, 64, 65, 100, 257, 1000, 2000])
def test_every_entry_of_a_distribution_list_verifies(n: int) -> None:
    entries = random_entries(random.Random(n), n)
    root = distribution_root(entries)
    proofs = distribution_proofs(entries)
    assert set(proofs) == set(entries)
    for account, amount in entries.items():
        assert verify_ledger_claim(account, amount, proofs[account], root)
        assert len(proofs[account]) <= n.bit_length()
    account = next(iter(entries))
    assert distribution_proof(entries, account) == proofs[account]


@settings(max_examples=150, deadline=None)
@given(
    entries=st.dictionaries(
        st.text(min_size=1, max_size=12), st.integers(0, 2**256 - 1), min_size=1, max_size=40
    ),
    data=st.data(),
)
def test_a_wrong_amount_or_account_never_verifies(
    entries: dict[str, int], data: st.DataObject
) -> None:
    root = distribution_root(entries)
    proofs = distribution_proofs(entries)
    account = data.draw(st.sampled_from(sorted(entries)))
    amount = entries[account]
    proof = proofs[account]
    assert verify_ledger_claim(account, amount, proof, root)
    wrong_amount = data.draw(st.integers(0, 2**256 - 1).filter(lambda x: x != amount))
    assert not verify_ledger_claim(account, wrong_amount, proof, root)
    other = data.draw(st.text(min_size=1, max_size=12).filter(lambda a: a != account))
    assert not verify_ledger_claim(other, amount, proof, root)
    for listed, listed_amount in entries.items():  # another entry's proof does not carry it
        if (listed, listed_amount) != (account, amount) and proofs[listed] != proof:
            assert not verify_ledger_claim(account, amount, proofs[listed], root)


def test_the_leaf_encoding_separates_account_from_amount() -> None:
    assert ledger_leaf("a", 1) != ledger_leaf("a", 2)
    assert ledger_leaf("ab", 0) != ledger_leaf("a", int.from_bytes(b"b".ljust(32, b"\0"), "big"))
    expected = sha256(sha256(b"\0\0\0\x01a" + (5).to_bytes(32, "big")))
    assert ledger_leaf("a", 5) == expected
    with pytest.raises(ValueError):
        ledger_leaf("a", -1)
    with pytest.raises(ValueError):
        ledger_leaf("a", 2**256)


def test_ten_thousand_leaves_and_all_proofs_well_under_a_second() -> None:
    entries = random_entries(random.Random(1), 10_000)
    started = time.perf_counter()
    root = distribution_root(entries)
    proofs = distribution_proofs(entries)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    sample = random.Random(2).sample(sorted(entries), 50)
    assert all(verify_ledger_claim(a, entries[a], proofs[a], root) for a in sample)


def test_a_tree_knows_its_leaves() -> None:
    leaves = [sha256(bytes([i])) for i in range(5)]
    tree = MerkleTree(leaves)
    assert tree.has_leaf(leaves[3]) and not tree.has_leaf(sha256(b"x"))
    with pytest.raises(KeyError):
        tree.proof(sha256(b"x"))


# --- the round clock ---


@dataclass(frozen=True)
class Clock:
    start_slot: int = 100
    round_time: int = 10
    submission_window: int = 4
    audit_window: int = 3


@pytest.mark.parametrize(
    ("slot", "expected"),
    [
        (0, (-1, "idle")),
        (99, (-1, "idle")),
        (100, (0, "submission")),
        (103, (0, "submission")),
        (104, (0, "audit")),
        (106, (0, "audit")),
        (107, (0, "idle")),
        (109, (0, "idle")),
        (110, (1, "submission")),
        (1234, (113, "audit")),
    ],
)
def test_window_of(slot: int, expected: tuple[int, str]) -> None:
    assert window_of(Clock(), slot) == expected
    assert round_of(Clock(), slot) == (None if expected[0] < 0 else expected[0])


# --- auditor ring and distributors ---


def submitters(n: int, salt: str = "") -> dict[str, str]:
    return {f"peer{salt}{i:05d}": f"cid-{i}" for i in range(n)}


def seed_of(subs: dict[str, str], task: str = "task", r: int = 7) -> bytes:
    return audit_seed(task, r, subs.values())


def check_ring(n: int, max_auditors: int = 5) -> None:
    subs = submitters(n, salt=str(max_auditors))
    seed = seed_of(subs)
    k = min(max_auditors, n - 1)
    assert auditor_count(n, max_auditors) == k
    auditors = audit_assignment(seed, list(subs), max_auditors)
    assert set(auditors) == set(subs)
    load: Counter[str] = Counter()
    for target, assigned in auditors.items():
        assert len(assigned) == k
        assert len(set(assigned)) == k
        assert target not in assigned
        load.update(assigned)
    assert all(load[a] == k for a in subs) if k else not load


@pytest.mark.parametrize("n", range(1, 201))
def test_every_submission_gets_exactly_k_distinct_auditors(n: int) -> None:
    check_ring(n)


@pytest.mark.parametrize("max_auditors", [1, 2, 3, 64])
def test_the_ring_for_other_auditor_counts(max_auditors: int) -> None:
    for n in (1, 2, 3, 4, 9, 70):
        check_ring(n, max_auditors)


def test_auditors_of_and_targets_of_agree_with_the_whole_assignment() -> None:
    subs = submitters(23)
    seed = seed_of(subs, r=3)
    accounts = list(subs)
    everything = audit_assignment(seed, accounts, 5)
    for target in subs:
        assert auditors_of(seed, accounts, target, 5) == everything[target]
    order = auditor_order(seed, accounts)
    for position, auditor in enumerate(order):
        targets = targets_of(seed, accounts, auditor, 5)
        assert targets == [order[(position - step) % len(order)] for step in range(1, 6)]
        assert set(targets) == {t for t in subs if auditor in everything[t]}
        for target in accounts:  # what a contract checks, pair by pair
            expected = target in targets
            assert may_audit(seed, 23, 5, accounts.index(auditor), accounts.index(target)) \
                == expected
    assert auditors_of(seed, accounts, "stranger", 5) == []
    assert targets_of(seed, accounts, "stranger", 5) == []


def test_ten_thousand_submitters() -> None:
    subs = submitters(10_000)
    seed = seed_of(subs, r=1)
    everything = audit_assignment(seed, list(subs), 5)
    load: Counter[str] = Counter()
    for target, assigned in everything.items():
        assert len(set(assigned)) == 5 and target not in assigned
        load.update(assigned)
    assert set(load.values()) == {5} and len(load) == 10_000


def test_the_seed_depends_on_every_submission_and_the_round() -> None:
    subs = submitters(5)
    seed = seed_of(subs, r=1)
    # a running hash: the order of inclusion counts
    assert seed_of(dict(reversed(list(subs.items()))), r=1) != seed
    assert seed_of(subs, r=2) != seed
    assert seed_of(subs, task="task2", r=1) != seed
    changed = dict(subs, peer00003="other")
    assert seed_of(changed, r=1) != seed
    assert seed_of({k: v for k, v in subs.items() if k != "peer00000"}, r=1) != seed
    running = first_seed("task", 1)
    for text in subs.values():
        running = next_seed(running, text)
    assert running == seed


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 15, 16, 17, 64, 65, 257, 1000])
def test_prp_is_a_permutation(n: int) -> None:
    for key in (bytes(32), hashlib.sha256(str(n).encode()).digest()):
        positions = [prp(key, n, i) for i in range(n)]
        assert sorted(positions) == list(range(n))
    with pytest.raises(ValueError):
        prp(bytes(32), n, n)


def test_prp_depends_on_the_key() -> None:
    a = [prp(bytes(32), 100, i) for i in range(100)]
    b = [prp(b"\x01" * 32, 100, i) for i in range(100)]
    assert a != b and a != list(range(100))


def test_distributors_take_turns_and_wrap() -> None:
    accepted = ["a", "b", "c"]
    seed = audit_seed("task", 0, accepted)
    order = distribution_order(seed, accepted)
    assert sorted(order) == accepted
    assert [distributor_of(seed, accepted, j) for j in range(6)] == order + order
    with pytest.raises(ValueError):
        distributor_of(seed, [], 0)
