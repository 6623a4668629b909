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
  low-frequency order. The global kernel travels as (version, FULL, gap-coded indices).
* Delta refreshes (``compression.swap`` > 0, every refresh after the first): workers propose
  only m positions OUTSIDE the current kernel (same tiered format); rank 0 ranks the current
  kernel itself by the energy of the aggregate values it encoded since the last install, and
  swaps its m weakest positions (ties by the same hash) for the m best-voted proposals
  (:func:`merge_delta`). The kernel size stays k; the update travels as
  (version, DELTA, removed kernel-order slots gap-coded, added indices gap-coded).

Coding runs on the host (numpy): kernels are small and exchanged rarely. A worker's top-k
selection (:func:`top_k`) is one compare pass over its scores; rank 0's merge is one weighted
``bincount`` of the W*k voted positions into an n_coef score vector; the varint coders work on
the values, one pass per byte position.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from hpcfed.errors import HpcfedError
from hpcfed.xp import to_numpy

_MAX_VARINT_BYTES = 10
_SAMPLED_TOP_K_MIN = 1 << 16    # top_k samples a threshold from this many scores up
_TOP_K_SAMPLE = 1 << 16         # about this many sampled scores


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Non-negative integers -> LEB128 bytes (7 bits a byte, high bit = more follows).

    One pass over every value for its first byte; later bytes only for the values that need them.
    """
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    length = np.ones(v.size, dtype=np.int64)
    for j in range(1, _MAX_VARINT_BYTES):
        more = v >= (np.uint64(1) << np.uint64(7 * j))
        if not more.any():
            break
        length += more
    ends = np.cumsum(length)
    starts = ends - length
    out = np.empty(int(ends[-1]) if v.size else 0, dtype=np.uint8)
    seven, low = np.uint64(7), np.uint64(127)
    for j in range(int(length.max()) if v.size else 0):
        which = slice(None) if j == 0 else np.flatnonzero(length > j)
        digit = ((v[which] >> (seven * np.uint64(j))) & low).astype(np.uint8)
        out[starts[which] + j] = digit | ((length[which] > j + 1) * 128).astype(np.uint8)
    return out


def varint_decode(data: np.ndarray) -> np.ndarray:
    """Inverse of :func:`varint_encode`: the first byte of every value in one pass, then byte j only for
    the values longer than j (like the encoder; no per-byte shifts)."""
    d = np.asarray(data, dtype=np.uint8).reshape(-1)
    if d.size == 0:
        return np.zeros(0, dtype=np.int64)
    last = d < 128
    if not last[-1]:
        raise HpcfedError("kernel payload is truncated (last varint has no final byte)")
    if last.all():                                    # every value below 128: one byte each
        return d.astype(np.int64)
    ends = np.flatnonzero(last)
    starts = np.concatenate([[0], ends[:-1] + 1])
    length = ends - starts + 1
    out = (d[starts] & 127).astype(np.int64)
    for j in range(1, int(length.max())):
        which = np.flatnonzero(length > j)
        out[which] |= (d[starts[which] + j] & 127).astype(np.int64) << (7 * j)
    return out


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


def top_k(score: Any, k: int, xp: ModuleType) -> Any:
    """Indices of the ``k`` largest entries of ``score`` (any order; a deterministic choice among ties).

    Large inputs: a strided sample gives a threshold a little below the k-th largest value, and
    only the entries at or above it (a few more than k) are partitioned, which costs one compare
    pass instead of a selection over all n (about 4x faster here); falls back to the full
    partition when the sample misjudges.
    """
    n = int(score.size)
    if k >= n:
        return xp.arange(n)
    if n >= _SAMPLED_TOP_K_MIN:
        stride = max(1, n // _TOP_K_SAMPLE)
        sample = score[::stride]
        rank = min(int(sample.size), int(1.05 * k / stride) + 64)
        threshold = xp.partition(sample, sample.size - rank)[sample.size - rank]
        candidates = xp.flatnonzero(score >= threshold)
        if candidates.size >= k:
            picked = xp.argpartition(score[candidates], candidates.size - k)[candidates.size - k:]
            return candidates[picked]
    return xp.argpartition(score, n - k)[n - k:]


def local_kernel(energy: Any, k: int, tiers: int, xp: ModuleType) -> np.ndarray:
    """A worker's top-k positions of ``energy`` as ``tiers`` gap-coded lists (uint8, host)."""
    if k == 0:
        return varint_encode(np.zeros(1))
    top = top_k(energy, k, xp)
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


def _best(candidates: np.ndarray, scores: np.ndarray, tiebreak: np.ndarray, k: int) -> np.ndarray:
    """The first k candidates by (score descending, tiebreak, position) without a full sort: O(len)."""
    if k >= candidates.size:
        return candidates
    cut = np.partition(scores, scores.size - k)[scores.size - k]          # the k-th best score
    above = scores > cut
    need = k - int(above.sum())                                            # >= 1 taken among the ties
    tied = np.flatnonzero(scores == cut)
    keys = tiebreak[tied]
    edge = np.partition(keys, need - 1)[need - 1]
    below = tied[keys < edge]
    equal = tied[keys == edge][: need - below.size]                        # ascending positions
    return np.concatenate([candidates[above], candidates[below], candidates[equal]])


def _votes(local_payloads: list[np.ndarray], n_coef: int) -> tuple[np.ndarray, np.ndarray]:
    """(voted positions, ascending; their summed votes): tier t of T scores T - t. One weighted
    ``bincount`` over the W*k voted positions into an n_coef score vector (faster than sorting the
    W*k positions once W*k is a sizeable part of n_coef, as at W >= 16)."""
    lists = [(len(tiers) - t, idx) for tiers in (read_local_kernel(p, n_coef) for p in local_payloads)
             for t, idx in enumerate(tiers)]
    if not lists:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    votes = np.repeat(np.array([v for v, _ in lists], dtype=np.float64), [idx.size for _, idx in lists])
    score = np.bincount(np.concatenate([idx for _, idx in lists]), weights=votes, minlength=n_coef)
    positions = np.flatnonzero(score)
    return positions, score[positions].astype(np.int64)


def merge(local_payloads: list[np.ndarray], n_blocks: int, n: int, k: int, version: int) -> np.ndarray:
    """Global kernel (sorted indices, exactly k) from local kernel payloads by weighted votes (:func:`_votes`)."""
    n_coef = n_blocks * n * n
    candidates, scores = _votes(local_payloads, n_coef)
    chosen = _best(candidates, scores, _tiebreak(candidates, version), k)
    if chosen.size < k:
        fill = lowfreq_order(n_blocks, n, k + chosen.size)
        chosen = np.concatenate([chosen, fill[~np.isin(fill, chosen)][: k - chosen.size]])
    return np.sort(chosen)


FULL, DELTA = 0, 1       # kinds of a global kernel payload


def global_payload(version: int, kernel: np.ndarray) -> np.ndarray:
    """Wire form of a global kernel: varints [version, FULL, count, gaps...]."""
    return varint_encode(np.concatenate([[version, FULL], _gap_fields(np.asarray(kernel, dtype=np.int64))]))


def delta_payload(version: int, removed: np.ndarray, added: np.ndarray) -> np.ndarray:
    """Wire form of a kernel update: varints [version, DELTA, removed slots (kernel order), added indices]."""
    return varint_encode(np.concatenate([[version, DELTA], _gap_fields(np.sort(np.asarray(removed, dtype=np.int64))),
                                         _gap_fields(np.sort(np.asarray(added, dtype=np.int64)))]))


def read_global_payload(payload: np.ndarray, n_coef: int, k: int,
                        current: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """(version, sorted kernel) from :func:`global_payload` or, given the ``current`` kernel, from
    :func:`delta_payload`; checked against the codec's shape."""
    fields = varint_decode(payload)
    if fields.size < 2:
        raise HpcfedError("global kernel payload is empty")
    kind = int(fields[1])
    if kind == FULL:
        kernel, _ = _read_sorted(fields, 2)
    elif kind == DELTA:
        if current is None:
            raise HpcfedError("a kernel delta needs the current kernel (a rejoining rank takes a full kernel)")
        removed, at = _read_sorted(fields, 2)
        added, _ = _read_sorted(fields, at)
        if removed.size != added.size or (removed.size and removed[-1] >= current.size):
            raise HpcfedError(f"kernel delta removes {removed.size} slots (max {int(removed[-1]) if removed.size else -1}) "
                              f"and adds {added.size}; the kernel has {current.size}")
        kernel = np.sort(np.concatenate([np.delete(np.asarray(current, dtype=np.int64), removed), added]))
        if kernel.size and np.any(np.diff(kernel) == 0):
            raise HpcfedError("kernel delta adds a position the kernel already holds")
    else:
        raise HpcfedError(f"global kernel payload of unknown kind {kind}")
    if kernel.size != k or (k and kernel[-1] >= n_coef):
        raise HpcfedError(f"global kernel has {kernel.size} indices (max {int(kernel[-1]) if k else -1}); "
                          f"this codec expects {k} below {n_coef}")
    return int(fields[0]), kernel


def merge_delta(local_payloads: list[np.ndarray], kernel: np.ndarray, strength: np.ndarray, m: int,
                n_coef: int, version: int) -> tuple[np.ndarray, np.ndarray]:
    """(removed kernel-order slots, added positions) of a delta refresh, at most ``m`` each, equally many.

    ``kernel``: the current kernel (sorted); ``strength``: rank 0's energy per kernel slot. Proposals
    inside the kernel are ignored. The added positions are the best by weighted votes (as :func:`merge`);
    the removed slots are those of least ``strength`` (ties by the position hash of ``version``).
    """
    kernel = np.asarray(kernel, dtype=np.int64)
    candidates, scores = _votes(local_payloads, n_coef)
    outside = ~np.isin(candidates, kernel, assume_unique=True)
    candidates, scores = candidates[outside], scores[outside]
    added = _best(candidates, scores, _tiebreak(candidates, version), min(m, kernel.size))
    slots = np.arange(kernel.size)
    weak = -np.asarray(strength, dtype=np.float64)
    removed = _best(slots, weak, _tiebreak(kernel, version), added.size) if added.size else slots[:0]
    return np.sort(removed), np.sort(added)
