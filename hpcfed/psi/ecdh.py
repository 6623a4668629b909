"""Pure PSI math: hash identifiers into curve25519, blind them with X25519, and set operations.

Group and why the blinding is sound (semi-honest DH-PSI, Meadows 1986 / Huberman et al. 1999):

* Hash to the curve with the RFC 9380 suite ``curve25519_XMD:SHA-512_ELL2_NU_``:
  ``expand_message_xmd`` (SHA-512) gives a field element ``u``, Elligator 2 maps it to a
  point ``Q`` on curve25519 whose discrete log nobody knows (needed: with a known log,
  one blinded value would reveal the key's action on every id). We keep ``Q``'s
  Montgomery u-coordinate (32 bytes, little-endian).
* Blind with X25519 (``crypto_scalarmult``, libsodium via PyNaCl): ``x(Q) -> x([k]Q)``
  with the clamped scalar ``k``. Clamped scalars are multiples of the cofactor 8, so
  the first blinding also clears the cofactor: every value that leaves a party lies in
  the prime-order subgroup (order l = 2^252 + ...), where DDH is assumed hard. This is
  RFC 9380's ``clear_cofactor`` folded into the first scalar.
* Scalar multiplications commute (``[a][b]Q = [b][a]Q``), and the x-only ladder is
  well defined for a u-coordinate (x(Q) = x(-Q)), so blinding in any order gives the
  same bytes: ``x25519(a, x25519(b, h)) == x25519(b, x25519(a, h))``.
* Distinct ids collide only if their hashed points agree up to sign and a small-order
  component, probability about 2^-250 per pair.
* The NU ("encode") suite, like libsodium's ``from_uniform``, uses one Elligator map, so
  its outputs are not uniform over the group (about half the points are reachable). The
  RO suite (two maps + a point addition, ~10 us more per id) is what a proof modelling
  H as a random oracle asks for; NU keeps what the protocol relies on: unknown discrete
  logs and distinct points for distinct ids.

Speed (one core here): X25519 ~25k/s in libsodium and the same through OpenSSL
(``cryptography``), so PyNaCl, already a dependency, does it; ed25519 ``noclamp``
multiply ~9k/s. The Elligator 2 map with gmpy2's Legendre symbol ~120k/s, against
~39k/s for ``crypto_core_ed25519_from_uniform`` before any Montgomery conversion.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable, Sequence
from itertools import islice

import gmpy2
import numpy as np
from nacl.bindings import crypto_scalarmult

POINT_BYTES = 32
FIELD_P = 2**255 - 19
MONT_A = 486662
SUITE = "curve25519_XMD:SHA-512_ELL2_NU_"
DST = b"HPCFED-PSI-V01-with-" + SUITE.encode()
PROTOCOL = f"ecdh-psi: {SUITE} hash, x25519 blinding (libsodium), joint shuffle by blake2b keyed with H(shares)"

_P = gmpy2.mpz(FIELD_P)
_A = gmpy2.mpz(MONT_A)
_NEG_A = _P - _A
_XMD_LEN = 48  # L = ceil((ceil(log2 p) + k) / 8) with k = 128
_Z_PAD = hashlib.sha512(bytes(128))  # expand_message_xmd's zero block, hashed once and copied
_BLOCK = 1 << 14  # values joined per step: bounds the Python objects alive at once


def expand_message_xmd(msg: bytes, dst: bytes = DST, length: int = _XMD_LEN) -> bytes:
    """RFC 9380 section 5.3.1 with SHA-512 (only lengths up to 64 bytes are needed here)."""
    dst_prime = dst + bytes([len(dst)])
    first = _Z_PAD.copy()
    first.update(msg + length.to_bytes(2, "big") + b"\x00" + dst_prime)
    b0 = first.digest()
    return hashlib.sha512(b0 + b"\x01" + dst_prime).digest()[:length]


def hash_to_field(msg: bytes, dst: bytes = DST) -> int:
    """RFC 9380 hash_to_field for GF(2^255 - 19), one element."""
    return int.from_bytes(expand_message_xmd(msg, dst), "big") % FIELD_P


def map_to_curve(u: int) -> int:
    """RFC 9380 Elligator 2 map to curve25519 (Z = 2): the Montgomery u-coordinate of the point.

    ``1 + 2u^2`` is never 0 mod p (-1/2 is not a square), so the inverse always exists.
    """
    u = gmpy2.mpz(u)
    x1 = _NEG_A * gmpy2.invert(1 + 2 * u * u, _P) % _P
    gx1 = x1 * (x1 * x1 + _A * x1 + 1) % _P
    return int(x1 if gmpy2.legendre(gx1, _P) >= 0 else _NEG_A - x1)


def point_bytes(msg: bytes, dst: bytes = DST) -> bytes:
    """One id's curve point: the 32-byte little-endian u-coordinate (never sent unblinded)."""
    return map_to_curve(hash_to_field(msg, dst)).to_bytes(POINT_BYTES, "little")


def _stack(values: Iterable[bytes], width: int = POINT_BYTES) -> np.ndarray:
    """Fixed-width byte strings as an (n, width) uint8 array, joined a block at a time."""
    values, blocks = iter(values), []
    while block := b"".join(islice(values, _BLOCK)):
        blocks.append(np.frombuffer(block, dtype=np.uint8))
    return np.concatenate(blocks).reshape(-1, width) if blocks else np.zeros((0, width), dtype=np.uint8)


def hash_to_group(ids: Iterable[bytes], dst: bytes = DST) -> np.ndarray:
    """Each id's curve point as an (n, 32) uint8 array of little-endian u-coordinates."""
    return _stack(point_bytes(x, dst) for x in ids)


def new_key() -> bytes:
    """A fresh secret scalar (X25519 clamps it: a multiple of 8 below 2^255)."""
    return secrets.token_bytes(POINT_BYTES)


def blind(points: np.ndarray, key: bytes) -> np.ndarray:
    """X25519-multiply every row of an (n, 32) uint8 array by ``key``; same shape back."""
    raw = np.ascontiguousarray(points, dtype=np.uint8).tobytes()
    return _stack(crypto_scalarmult(key, raw[i:i + POINT_BYTES]) for i in range(0, len(raw), POINT_BYTES))


def hash_and_blind(ids: Iterable[bytes], key: bytes, dst: bytes = DST) -> np.ndarray:
    """``blind(hash_to_group(ids), key)`` in one pass, without the unblinded array."""
    return _stack(crypto_scalarmult(key, point_bytes(x, dst)) for x in ids)


def _keys(points: np.ndarray) -> np.ndarray:
    """A 1-D fixed-width bytes view (``S32``) that numpy can sort and compare."""
    return np.ascontiguousarray(points, dtype=np.uint8).view(f"S{POINT_BYTES}").reshape(-1)


def first_occurrences(points: np.ndarray) -> np.ndarray:
    """Indices of the first row of each distinct point, ordered by point value.

    Ordering by a blinded value is a permutation nobody else can compute, so a set sent
    in this order reveals nothing about the sender's row order.
    """
    return np.unique(_keys(points), return_index=True)[1].astype(np.int64)


def sort_points(points: np.ndarray) -> np.ndarray:
    """Rows sorted by value (hides which position came from which input row)."""
    return np.asarray(points)[np.argsort(_keys(points), kind="stable")]


def intersect(point_sets: Sequence[np.ndarray]) -> np.ndarray:
    """The points present in every set (each set without repeats), sorted by value."""
    common = np.unique(_keys(point_sets[0]))
    for other in point_sets[1:]:
        common = np.intersect1d(common, _keys(other), assume_unique=True)
    return common.view(np.uint8).reshape(-1, POINT_BYTES)


def positions(points: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """For each row of ``wanted``, its row index in ``points`` (rows unique; all present)."""
    _, in_points, in_wanted = np.intersect1d(_keys(points), _keys(wanted), assume_unique=True,
                                             return_indices=True)
    if len(in_wanted) != len(wanted):
        raise ValueError(f"{len(wanted) - len(in_wanted)} wanted points are missing")
    out = np.empty(len(wanted), dtype=np.int64)
    out[in_wanted] = in_points
    return out


def commitment(party: int, share: bytes) -> bytes:
    """Hash commitment to a party's shuffle share (sent before any share is revealed)."""
    return hashlib.sha256(b"hpcfed-psi-commit-v1" + party.to_bytes(4, "little") + share).digest()


def joint_seed(shares: Sequence[bytes]) -> bytes:
    """The shuffle seed from every party's share, in party order: no one party fixes it."""
    return hashlib.sha256(b"hpcfed-psi-seed-v1" + b"".join(shares)).digest()


def shuffle_order(items: Iterable[bytes], seed: bytes) -> np.ndarray:
    """A permutation of ``items``: sort by BLAKE2b keyed with ``seed`` (platform-independent).

    Applied to the common ids themselves, which every party holds in the same normalised
    form, it depends only on the joint seed and the intersection, not on anyone's key.
    """
    tags = _stack((hashlib.blake2b(item, key=seed, digest_size=16).digest() for item in items), 16)
    return np.argsort(tags.view("S16").reshape(-1), kind="stable").astype(np.int64)


def order_digest(points: np.ndarray) -> bytes:
    """SHA-256 of the rows in order; parties compare it to confirm they hold the same order."""
    return hashlib.sha256(np.ascontiguousarray(points, dtype=np.uint8).tobytes()).digest()
