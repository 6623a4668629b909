"""The shared compression kernel: which DCT coefficients travel, agreed by all ranks.

A kernel is a sorted array of global coefficient indices (block * n*n + position).
Packets then carry only the values at those indices, in kernel order, with no indices.

* Version 0 needs no exchange: every rank derives the same low-frequency kernel
  (positions ordered by i + j, spread evenly over blocks).
* A local kernel is a worker's top coefficient positions by accumulated energy, split
  into ``tiers`` equal slices (strongest first), each sent as a sorted index list coded
  as variable-length gaps (LEB128 varints: about 1 byte per index at a few percent
  density, versus 4 for raw int32 or n/8 for a bitmap).
* Rank 0 merges by weighted votes (tier t of T scores T - t), keeps the k best, ties
  broken by a hash of (position, version); votes add, so the merge does not depend
  on the order of the local kernels. Too few candidates are filled from the
  low-frequency order. The global kernel travels as (version, gap-coded indices).

Coding runs on the host (numpy): kernels are small and exchanged rarely.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from hpcfed.errors import HpcfedError
from hpcfed.xp import to_numpy

_MAX_VARINT_BYTES = 10


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Non-negative integers -> LEB128 bytes (7 bits a byte, high bit = more follows)."""
    v = np.asarray(values, dtype=np.uint64)
    lane = np.arange(_MAX_VARINT_BYTES, dtype=np.uint64)
    length = 1 + (v[:, None] >= (np.uint64(1) << (7 * lane[1:]))).sum(axis=1)
    digits = ((v[:, None] >> (np.uint64(7) * lane)) & np.uint64(127)).astype(np.uint8)
    digits |= ((lane[None, :] < (length[:, None] - 1)) * 128).astype(np.uint8)
    return digits[lane[None, :] < length[:, None]]


def varint_decode(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`varint_encode`."""
    d = np.asarray(data, dtype=np.uint64)
    if d.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = d < 128
    if not last[-1]:
        raise HpcfedError("kernel payload is truncated (last varint has no final byte)")
    which = np.concatenate([[0], np.cumsum(last)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    shift = np.uint64(7) * (np.arange(d.size, dtype=np.uint64) - starts[which].astype(np.uint64))
    out = np.zeros(int(last.sum()), dtype=np.uint64)
    np.bitwise_or.at(out, which, (d & np.uint64(127)) << shift)
    return out.astype(np.int64)


def _gap_fields(sorted_idx: np.ndarray) -> np.ndarray:
    """[count, first, gap-1, gap-1, ...] for a strictly increasing index array."""
    gaps = np.diff(sorted_idx, prepend=-1) - 1
    return np.concatenate([[sorted_idx.size], gaps])


def _read_sorted(fields: np.ndarray, at: int) -> tuple[np.ndarray, int]:
    """Read one list written by :func:`_gap_fields` at ``at``; returns it and the next offset."""
    if at >= fields.size:
        raise HpcfedError("kernel payload is truncated (missing index list)")
    count = int(fields[at])
    gaps = fields[at + 1: at + 1 + count]
    if gaps.size != count:
        raise HpcfedError(f"kernel payload is truncated ({gaps.size} of {count} indices)")
    return np.cumsum(gaps + 1) - 1, at + 1 + count


def lowfreq_order(n_blocks: int, n: int, count: int) -> np.ndarray:
    """The first ``count`` coefficient indices in low-frequency-first order (i + j, then i; block by block)."""
    i, j = np.divmod(np.arange(n * n), n)
    by_frequency = np.lexsort((i, i + j))
    keys = np.arange(min(count, n_blocks * n * n))
    return (keys % n_blocks) * (n * n) + by_frequency[keys // n_blocks]


def lowfreq_kernel(n_blocks: int, n: int, k: int) -> np.ndarray:
    """Version 0: the k lowest-frequency coefficients, sorted; every rank derives it alone."""
    return np.sort(lowfreq_order(n_blocks, n, k))


def local_kernel(energy: Any, k: int, tiers: int, xp: ModuleType) -> np.ndarray:
    """A worker's top-k positions of ``energy`` as ``tiers`` gap-coded lists (uint8, host)."""
    if k == 0:
        return varint_encode(np.zeros(1))
    top = xp.argpartition(-energy, k - 1)[:k] if k < energy.size else xp.arange(energy.size)
    ranked = to_numpy(top[xp.argsort(-energy[top])]).astype(np.int64)
    parts = [np.sort(part) for part in np.array_split(ranked, tiers)]
    return varint_encode(np.concatenate([[tiers], *(_gap_fields(p) for p in parts)]))


def read_local_kernel(payload: np.ndarray, n_coef: int) -> list[np.ndarray]:
    """The tiers of a local kernel payload, strongest first; checks every index is in range."""
    fields = varint_decode(payload)
    if fields.size == 0:
        raise HpcfedError("local kernel payload is empty")
    tiers, at = [], 1
    for _ in range(int(fields[0])):
        idx, at = _read_sorted(fields, at)
        if idx.size and (idx[-1] >= n_coef):
            raise HpcfedError(f"local kernel index {int(idx[-1])} out of range (coefficients: {n_coef})")
        tiers.append(idx)
    return tiers


def _tiebreak(positions: np.ndarray, version: int) -> np.ndarray:
    """A deterministic pseudo-random key per position, different for every version."""
    mixed = (positions.astype(np.uint64) * np.uint64(0x9E3779B1)) ^ np.uint64((version * 0x85EBCA6B) & 0xFFFFFFFF)
    return (mixed * np.uint64(0xC2B2AE35)) >> np.uint64(16) & np.uint64(0xFFFFFFFF)


def merge(local_payloads: list[np.ndarray], n_blocks: int, n: int, k: int, version: int) -> np.ndarray:
    """Global kernel (sorted indices, exactly k) from local kernel payloads by weighted votes."""
    n_coef = n_blocks * n * n
    scores = np.zeros(n_coef, dtype=np.int64)
    for payload in local_payloads:
        tiers = read_local_kernel(payload, n_coef)
        for t, idx in enumerate(tiers):
            scores[idx] += len(tiers) - t
    candidates = np.flatnonzero(scores)
    order = np.lexsort((_tiebreak(candidates, version), -scores[candidates]))
    chosen = candidates[order[:k]]
    if chosen.size < k:
        fill = lowfreq_order(n_blocks, n, k + chosen.size)
        chosen = np.concatenate([chosen, fill[~np.isin(fill, chosen)][: k - chosen.size]])
    return np.sort(chosen)


def global_payload(version: int, kernel: np.ndarray) -> np.ndarray:
    """Wire form of a global kernel: varints [version, count, gaps...]."""
    return varint_encode(np.concatenate([[version], _gap_fields(np.asarray(kernel, dtype=np.int64))]))


def read_global_payload(payload: np.ndarray, n_coef: int, k: int) -> tuple[int, np.ndarray]:
    """(version, sorted kernel) from :func:`global_payload`, checked against the codec's shape."""
    fields = varint_decode(payload)
    if fields.size == 0:
        raise HpcfedError("global kernel payload is empty")
    kernel, _ = _read_sorted(fields, 1)
    if kernel.size != k or (k and kernel[-1] >= n_coef):
        raise HpcfedError(f"global kernel has {kernel.size} indices (max {int(kernel[-1]) if k else -1}); "
                          f"this codec expects {k} below {n_coef}")
    return int(fields[0]), kernel
