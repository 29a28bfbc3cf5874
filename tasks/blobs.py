# Content ids for task data: CIDv1, codec `raw`, multihash sha2-256, multibase base32 (the
# `bafkrei...` form IPFS prints), built with py-cid / py-multihash (ipld and multiformats
# projects; already installed as dependencies of libp2p).
# Lives here: computing a blob's cid and checking a blob against one.
# Must not live here: where blobs are stored or fetched (the node's TaskContext does that).
from __future__ import annotations

import hashlib

import cid as _cid  # py-cid
import multihash as _multihash  # py-multihash

CODEC = "raw"
HASH = "sha2-256"
ENCODING = "base32"


class CidMismatch(ValueError):
    """A blob does not hash to the content id it was fetched by (or the cid is malformed)."""


def cid_of(data: bytes) -> str:
    """The CIDv1 (raw, sha2-256, base32 text) of `data`."""
    built = _cid.CIDv1(CODEC, _multihash.encode(hashlib.sha256(data).digest(), HASH))
    return built.encode(ENCODING).decode("ascii")


def verify_cid(cid: str, data: bytes) -> None:
    """Raise CidMismatch unless `data` is the content `cid` names.

    Any CIDv1 with a sha2-256 multihash is accepted (whatever its codec or multibase), so a
    cid made elsewhere for the same bytes still verifies; other hash functions are refused.
    """
    try:
        parsed = _cid.from_string(cid)
        decoded = _multihash.decode(parsed.multihash)
    except Exception as e:  # the libraries raise several unrelated types on bad input
        raise CidMismatch(f"malformed cid {cid!r}: {e}") from None
    if parsed.version != 1 or decoded.name != HASH:
        raise CidMismatch(f"cid {cid!r} is not a CIDv1 with a {HASH} multihash")
    if decoded.digest != hashlib.sha256(data).digest():
        raise CidMismatch(f"data does not match cid {cid!r}")


def cid_matches(cid: str, data: bytes) -> bool:
    """True when `data` is the content `cid` names (verify_cid without the exception)."""
    try:
        verify_cid(cid, data)
    except CidMismatch:
        return False
    return True
