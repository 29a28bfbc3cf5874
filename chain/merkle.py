# Merkle trees with sorted-pair hashing, in OpenZeppelin's layout (StandardMerkleTree with
# sorted leaves; MerkleProof.verify): an internal node is H(min(a, b) || max(a, b)), so a
# proof is a plain list of sibling hashes with no left/right flags; leaves are sorted by their
# hash and laid out as a complete binary tree in one array (a lone leaf is its own root).
# Parameterised by the hash (sha256 on the ledger, keccak256 on EVM). Also the leaf formats of
# distribution lists (account -> amount) on the ledger and on EVM chains.
# Must not live here: which accounts may be listed or claim (chain/rules.py), any I/O.
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

Hash = Callable[[bytes], bytes]

EMPTY_ROOT = bytes(32)  # the root of an empty distribution list: no leaf verifies against it
MAX_AMOUNT = 2**256 - 1


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hash_pair(a: bytes, b: bytes, h: Hash) -> bytes:
    return h(a + b) if a <= b else h(b + a)


class MerkleTree:
    """A tree over `leaves` (already hashed), built once. Leaves are sorted by value, placed
    at the end of the node array in that order, reversed (OpenZeppelin's layout); node i has
    children 2i+1 and 2i+2."""

    __slots__ = ("nodes", "sorted_leaves", "_leaf_slot", "_h")

    def __init__(self, leaves: Sequence[bytes], h: Hash = sha256) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        self._h = h
        self.sorted_leaves = sorted(leaves)
        count = len(self.sorted_leaves)
        nodes: list[bytes] = [b""] * (2 * count - 1)
        last = len(nodes) - 1
        for i, leaf in enumerate(self.sorted_leaves):
            nodes[last - i] = leaf
        for i in range(last - count, -1, -1):
            nodes[i] = hash_pair(nodes[2 * i + 1], nodes[2 * i + 2], h)
        self.nodes = nodes
        # leaf value -> its node index (for duplicate leaves, the first in sorted order)
        self._leaf_slot: dict[bytes, int] = {}
        for i, leaf in enumerate(self.sorted_leaves):
            self._leaf_slot.setdefault(leaf, last - i)

    @property
    def root(self) -> bytes:
        return self.nodes[0]

    def _proof_at(self, node: int) -> list[bytes]:
        nodes = self.nodes
        proof: list[bytes] = []
        while node > 0:
            proof.append(nodes[node + 1] if node % 2 == 1 else nodes[node - 1])
            node = (node - 1) // 2
        return proof

    def proof(self, leaf: bytes) -> list[bytes]:
        """The proof of `leaf`; KeyError when it is not a leaf of this tree."""
        return self._proof_at(self._leaf_slot[leaf])

    def has_leaf(self, leaf: bytes) -> bool:
        return leaf in self._leaf_slot


def merkle_root(leaves: list[bytes], h: Hash = sha256) -> bytes:
    return MerkleTree(leaves, h).root


def merkle_proof(leaves: list[bytes], index: int, h: Hash = sha256) -> list[bytes]:
    """The proof of `leaves[index]` (index into the list as given, not the sorted order)."""
    return MerkleTree(leaves, h).proof(leaves[index])


def merkle_proofs(leaves: list[bytes], h: Hash = sha256) -> list[list[bytes]]:
    """The proofs of all leaves, in the order given; the tree is built once."""
    tree = MerkleTree(leaves, h)
    return [tree.proof(leaf) for leaf in leaves]


def verify_proof(leaf: bytes, proof: Sequence[bytes], root: bytes, h: Hash = sha256) -> bool:
    node = leaf
    for sibling in proof:
        node = hash_pair(node, sibling, h)
    return node == root


# --- the ledger's distribution lists: sha256, leaf = H(H(len-prefixed account || amount)) ---


def encode_account(account: str) -> bytes:
    """An account as UTF-8 with a 4-byte big-endian length prefix (the encoding used wherever
    the settlement rules hash an account)."""
    raw = account.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def ledger_leaf(account: str, amount: int) -> bytes:
    if type(amount) is not int or not 0 <= amount <= MAX_AMOUNT:
        raise ValueError(f"amount must be an int in [0, 2**256), got {amount!r}")
    return sha256(sha256(encode_account(account) + amount.to_bytes(32, "big")))


# how a chain hashes the entries of a distribution list: leaf function and pair hash
LEDGER_LEAVES = "ledger"  # sha256 over the length-prefixed account and a u256 amount
EVM_LEAVES = "evm"  # OpenZeppelin's standard leaf of abi.encode(address, uint256), keccak256


def _leaf_format(leaf_format: str) -> tuple[Callable[[str, int], bytes], Hash]:
    if leaf_format == LEDGER_LEAVES:
        return ledger_leaf, sha256
    if leaf_format == EVM_LEAVES:
        return evm_leaf, keccak256
    raise ValueError(f"unknown leaf format {leaf_format!r}")


def distribution_tree(entries: Mapping[str, int],
                      leaf_format: str = LEDGER_LEAVES) -> MerkleTree | None:
    """The tree of a distribution list (None for an empty list)."""
    if not entries:
        return None
    leaf, h = _leaf_format(leaf_format)
    return MerkleTree([leaf(account, amount) for account, amount in entries.items()], h)


def distribution_root(entries: Mapping[str, int], leaf_format: str = LEDGER_LEAVES) -> bytes:
    tree = distribution_tree(entries, leaf_format)
    return EMPTY_ROOT if tree is None else tree.root


def distribution_proof(entries: Mapping[str, int], account: str,
                       leaf_format: str = LEDGER_LEAVES) -> list[bytes]:
    """The proof that `account` is listed with `entries[account]`; KeyError if not listed."""
    amount = entries[account]
    tree = distribution_tree(entries, leaf_format)
    assert tree is not None
    return tree.proof(_leaf_format(leaf_format)[0](account, amount))


def distribution_proofs(entries: Mapping[str, int],
                        leaf_format: str = LEDGER_LEAVES) -> dict[str, list[bytes]]:
    """Every listed account's proof, the tree built once."""
    tree = distribution_tree(entries, leaf_format)
    if tree is None:
        return {}
    leaf = _leaf_format(leaf_format)[0]
    return {account: tree.proof(leaf(account, amount)) for account, amount in entries.items()}


def verify_claim(leaf_format: str, account: str, amount: int, proof: Sequence[bytes],
                 root: bytes) -> bool:
    """Whether (account, amount) is in the list with this root, per the chain's leaf format."""
    leaf_fn, h = _leaf_format(leaf_format)
    try:
        leaf = leaf_fn(account, amount)
    except ValueError:
        return False
    return verify_proof(leaf, proof, root, h)


def verify_ledger_claim(account: str, amount: int, proof: Sequence[bytes], root: bytes) -> bool:
    return verify_proof(ledger_leaf(account, amount), proof, root, sha256)


# --- EVM distribution lists: OpenZeppelin's standard leaf, keccak256 -------------------------


def keccak256(data: bytes) -> bytes:
    """keccak256 (Ethereum's hash; not NIST SHA3-256). Needs eth-hash, installed with web3."""
    from eth_hash.auto import keccak

    return bytes(keccak(data))


def evm_leaf(account: str, amount: int) -> bytes:
    """keccak256(keccak256(abi.encode(address, uint256))) for an account "0x" + 40 hex."""
    if type(amount) is not int or not 0 <= amount <= MAX_AMOUNT:
        raise ValueError(f"amount must be an int in [0, 2**256), got {amount!r}")
    raw = account[2:] if account[:2] in ("0x", "0X") else ""
    if len(raw) != 40:
        raise ValueError(f"not an EVM account: {account!r}")
    encoded = bytes(12) + bytes.fromhex(raw) + amount.to_bytes(32, "big")
    return keccak256(keccak256(encoded))

