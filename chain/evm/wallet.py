# The node's EVM wallet: the secp256k1 key (`wallet.key`, mode 0600, in the data dir) the node
# signs its EVM transactions with, and the binding of that wallet's address to the node's
# libp2p peer id (an Ed25519 signature by the node key over a domain-separated message), so
# peers can tell which EVM account belongs to which node.
# Lives here: creating (atomically, never replacing), loading and validating the key file,
# signing transactions locally, the binding message and its signature check.
# Must not live here: any RPC or network use (client.py), the node key itself
# (p2p/identity.py), or any silent replacement of a key file that fails to load.
from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from libp2p.peer.id import ID

from p2p.identity import Identity, read_key_file, verify_signature

WALLET_FILE_NAME = "wallet.key"
_WALLET_FILE_MAGIC = "tasknet-secp256k1-key-v1"
BINDING_DOMAIN = b"tasknet-evm-binding-v1\x00"
# the order of the secp256k1 group: a private key is an integer in [1, N)
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
MAX_CHAIN_ID = 2**64 - 1
_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")


class WalletError(Exception):
    """The wallet key file exists but cannot be used (corrupt, foreign or unreadable)."""


@dataclass(frozen=True)
class EvmWallet:
    """One secp256k1 key: its account address and local transaction signing."""

    key_bytes: bytes
    _account: LocalAccount = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not valid_private_key(self.key_bytes):
            raise ValueError("not a secp256k1 private key (32 bytes, 1 <= k < n)")
        object.__setattr__(self, "_account", Account.from_key(self.key_bytes))

    def __repr__(self) -> str:  # never print the key
        return f"EvmWallet({self.address})"

    @property
    def address(self) -> str:
        """'0x' followed by 40 lowercase hex digits."""
        return str(self._account.address).lower()

    @property
    def address_bytes(self) -> bytes:
        return bytes.fromhex(self.address[2:])

    def sign_transaction(self, tx: dict[str, Any]) -> bytes:
        """The raw signed transaction (EIP-2718 bytes for typed transactions). `to` must be
        20 bytes or a checksummed address; the transaction hash is keccak256 of the result."""
        return bytes(self._account.sign_transaction(tx).raw_transaction)

    @classmethod
    def generate(cls) -> EvmWallet:
        while True:
            key = secrets.token_bytes(32)
            if valid_private_key(key):
                return cls(key)


def valid_private_key(key: bytes) -> bool:
    return len(key) == 32 and 0 < int.from_bytes(key, "big") < SECP256K1_N


def load_or_create_wallet(data_dir: Path) -> EvmWallet:
    """Load the wallet key from `data_dir`, creating it (mode 0600) on first use. An existing
    file is never replaced: one that cannot be used raises WalletError."""
    path = data_dir / WALLET_FILE_NAME
    if os.path.lexists(path):
        return _load(path)
    wallet = EvmWallet.generate()
    data_dir.mkdir(parents=True, exist_ok=True)
    text = f"{_WALLET_FILE_MAGIC}\n{wallet.key_bytes.hex()}\n"
    # write a private temporary file, then link it into place: the key file appears whole or
    # not at all, and link() fails rather than replace a file created meanwhile
    tmp = data_dir / f".{WALLET_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _load(path)  # another process created it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(data_dir)
    return wallet


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load(path: Path) -> EvmWallet:
    key = read_key_file(path, _WALLET_FILE_MAGIC, "wallet key", WalletError)
    if not valid_private_key(key):
        raise WalletError(
            f"wallet key file {path} is corrupt: not a secp256k1 private key ({len(key)} bytes)"
        )
    return EvmWallet(key)


def address_bytes(address: str) -> bytes:
    """The 20 bytes of an '0x' + 40 hex digit address (either case; no checksum check)."""
    if not isinstance(address, str) or not _ADDRESS_RE.fullmatch(address):
        raise ValueError(f"not an EVM address: {address!r}")
    return bytes.fromhex(address[2:])


def binding_message(chain_id: int, contract: str, address: str, peer_id: str) -> bytes:
    """What a node signs to bind its EVM `address` to its `peer_id` (base58) for one contract
    on one chain: BINDING_DOMAIN || u64be(chain_id) || contract (20 bytes) || address (20 bytes)
    || the peer id's multihash bytes."""
    if not 0 <= chain_id <= MAX_CHAIN_ID:
        raise ValueError(f"chain id {chain_id} is not a u64")
    return (
        BINDING_DOMAIN
        + chain_id.to_bytes(8, "big")
        + address_bytes(contract)
        + address_bytes(address)
        + ID.from_base58(peer_id).to_bytes()
    )


def sign_binding(identity: Identity, chain_id: int, contract: str, address: str) -> bytes:
    """The node key's Ed25519 signature binding `address` to this node's peer id."""
    peer_id = identity.peer_id.to_base58()
    return identity.sign(binding_message(chain_id, contract, address, peer_id))


def verify_binding(
    peer_id: str, signature: bytes, chain_id: int, contract: str, address: str
) -> bool:
    """Whether `signature` is `peer_id`'s binding of `address` (on `chain_id`, `contract`).
    Malformed input of any kind is False, never an exception."""
    try:
        message = binding_message(chain_id, contract, address, peer_id)
        public_key = ID.from_base58(peer_id).extract_public_key()
    except Exception:
        return False
    if public_key is None:
        return False
    return verify_signature(public_key.to_bytes(), message, bytes(signature))
