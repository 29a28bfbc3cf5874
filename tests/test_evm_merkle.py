# EVM distribution lists: for random lists of 1 to 10,000 entries, every entry's proof
# verifies with chain.merkle's EVM leaves (all of them, in Python) and in the contract's own
# verifier on a real anvil (a sample), and no proof verifies for a wrong amount or account.
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from chain_worlds import anvil_with_settlement, settlement_client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chain.evm.client import EvmClient
from chain.merkle import (
    EVM_LEAVES,
    distribution_proofs,
    distribution_root,
    evm_leaf,
    verify_claim,
)

SAMPLE_ON_CHAIN = 4


@pytest.fixture(scope="module")
def contract() -> Iterator[EvmClient]:
    with anvil_with_settlement() as (anvil, address):
        client = settlement_client(anvil, address, 0)
        try:
            yield client
        finally:
            client.close()


def _account(rng: random.Random) -> str:
    return "0x" + rng.randbytes(20).hex()


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(size=st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 3, 1_000, 10_000]),
                      st.integers(41, 10_000)),
       seed=st.integers(0, 2**32))
def test_every_proof_verifies_and_no_wrong_one_does(contract: Any, size: int, seed: int) -> None:
    rng = random.Random(seed)
    entries = {_account(rng): rng.randint(1, 10**12) for _ in range(size)}
    root = distribution_root(entries, EVM_LEAVES)
    proofs = distribution_proofs(entries, EVM_LEAVES)
    accounts = list(entries)
    for i, (account, amount) in enumerate(entries.items()):
        proof = proofs[account]
        assert len(proof) <= (size - 1).bit_length() + 1
        assert verify_claim(EVM_LEAVES, account, amount, proof, root)
        assert not verify_claim(EVM_LEAVES, account, amount + 1, proof, root)
        if size > 1:
            other = accounts[(i + 1) % size]
            assert not verify_claim(EVM_LEAVES, other, amount, proof, root)
    stranger = _account(rng)
    assert not verify_claim(EVM_LEAVES, stranger, 1, proofs[accounts[0]], root)
    # the contract's own verifier agrees, for a sample of the entries
    for account in rng.sample(accounts, min(SAMPLE_ON_CHAIN, size)):
        amount = entries[account]
        leaf = evm_leaf(account, amount)
        assert contract.call("leafOf", account, amount) == leaf
        assert contract.call("verifyProof", proofs[account], root, leaf)
        assert not contract.call("verifyProof", proofs[account], root,
                                 evm_leaf(account, amount + 1))
        assert not contract.call("verifyProof", proofs[account], root,
                                 evm_leaf(stranger, amount))
