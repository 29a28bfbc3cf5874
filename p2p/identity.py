# Node identity: the Ed25519 key a node signs with and derives its libp2p peer id from.
# Lives here: creating, loading and validating the key file (mode 0600) in the data dir.
# Must not live here: networking, or any silent replacement of a key that fails to load.
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

KEY_FILE_NAME = "node.key"
_KEY_FILE_MAGIC = "tasknet-ed25519-seed-v1"


class IdentityError(Exception):
    """The key file exists but cannot be used (corrupt, foreign or unreadable)."""


@dataclass(frozen=True)
class Identity:
    signing_key: SigningKey

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def peer_id(self) -> ID:
        return peer_id_from_public_key(self.public_key)

    def key_pair(self) -> KeyPair:
        private = Ed25519PrivateKey(self.signing_key)
        return KeyPair(private, private.get_public_key())

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data).signature

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())


@lru_cache(maxsize=4096)
def peer_id_from_public_key(public_key: bytes) -> ID:
    """The libp2p peer id that belongs to a raw 32-byte Ed25519 public key."""
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key))


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(public_key).verify(data, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def load_or_create_identity(data_dir: Path) -> Identity:
    """Load the node key from `data_dir`, creating it (mode 0600) on first start."""
    path = data_dir / KEY_FILE_NAME
    if path.exists():
        return _load(path)
    identity = Identity.generate()
    data_dir.mkdir(parents=True, exist_ok=True)
    text = f"{_KEY_FILE_MAGIC}\n{bytes(identity.signing_key).hex()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return identity


def read_key_file(path: Path, magic: str, what: str, error: type[Exception]) -> bytes:
    """The hex key of a `magic`-headed key file that only its owner may read (mode 0600):
    `error` with one line when it cannot be read, is readable by others, or is not such a
    file. Used for node.key and for other secret keys kept the same way (wallet.key)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} file {path}: {exc}") from exc
    if mode & 0o077:
        raise error(
            f"{what} file {path} has mode {mode:o}; it must not be readable by others (chmod 600)"
        )
    lines = text.split()
    if len(lines) != 2 or lines[0] != magic:
        raise error(f"{what} file {path} is not a tasknet {magic.split('-')[1]} key file")
    try:
        return bytes.fromhex(lines[1])
    except ValueError as exc:
        raise error(f"{what} file {path} is corrupt: the key is not hex") from exc


def _load(path: Path) -> Identity:
    seed = read_key_file(path, _KEY_FILE_MAGIC, "key", IdentityError)
    if len(seed) != 32:
        raise IdentityError(f"key file {path} is corrupt: seed has {len(seed)} bytes, not 32")
    return Identity(SigningKey(seed))
