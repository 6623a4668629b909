"""b-bit symmetric quantization with one fp32 scale per group, and bit packing.

Values are split into groups (consecutive runs of a 1-D array: fixed-size groups, or
one group per DCT block). Each group's scale is ``absmax / qmax`` with
``qmax = 2**(b-1) - 1``; a value v becomes the integer ``q = round(v / scale)`` in
[-qmax, qmax] (nearest: |error| <= scale/2; stochastic: ``floor(v/scale + u)``,
u ~ U[0, 1), unbiased, |error| < scale), stored as ``q + qmax`` in b bits.
Everything is plain ``xp`` (numpy or cupy) array code.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from hpcfed.errors import HpcfedError

BITS = (2, 4, 8, 16)


def qmax(bits: int) -> int:
    """Largest quantized magnitude for ``bits`` (2 -> 1, 4 -> 7, 8 -> 127, 16 -> 32767)."""
    if bits not in BITS:
        raise HpcfedError(f"compression.bits={bits} is not allowed; use one of {list(BITS)}")
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class Groups:
    """How ``count`` values form ``n_groups`` groups.

    ``group_of[i]`` is the group of value i; ``table`` (n_groups x widest group) lists
    each group's value indices, padded with ``count`` (which points at an appended zero).
    """

    count: int
    n_groups: int
    group_of: Any
    table: Any


def fixed_groups(count: int, size: int, xp: ModuleType) -> Groups:
    """Consecutive groups of ``size`` values (the last one may be shorter)."""
    n_groups = -(-count // size)
    flat = xp.arange(n_groups * size, dtype=xp.int64)
    table = xp.where(flat < count, flat, count).reshape(n_groups, size)
    return Groups(count, n_groups, xp.arange(count, dtype=xp.int64) // size, table)


def groups_by_label(labels: Any, xp: ModuleType) -> Groups:
    """One group per run of equal labels in the non-decreasing array ``labels`` (e.g. block ids)."""
    count = int(labels.size)
    if count == 0:
        return Groups(0, 0, xp.zeros(0, dtype=xp.int64), xp.zeros((0, 1), dtype=xp.int64))
    new = xp.concatenate([xp.ones(1, dtype=bool), labels[1:] != labels[:-1]])
    group_of = xp.cumsum(new) - 1
    starts = xp.flatnonzero(new)
    slot = xp.arange(count, dtype=xp.int64) - starts[group_of]
    n_groups = int(starts.size)
    table = xp.full((n_groups, int(slot.max()) + 1), count, dtype=xp.int64)
    table[group_of, slot] = xp.arange(count, dtype=xp.int64)
    return Groups(count, n_groups, group_of, table)


def quantize(values: Any, groups: Groups, bits: int, xp: ModuleType, rng: Any = None) -> tuple[Any, Any]:
    """(codes in [0, 2*qmax] as uint16, fp32 scales per group); stochastic when ``rng`` is given."""
    top = qmax(bits)
    padded = xp.concatenate([xp.abs(values), xp.zeros(1, dtype=xp.float32)])
    absmax = padded[groups.table].max(axis=1) if groups.n_groups else xp.zeros(0, dtype=xp.float32)
    scales = (absmax / top).astype(xp.float32)
    inverse = (top / xp.where(absmax > 0, absmax, 1)).astype(xp.float32)
    scaled = values * inverse[groups.group_of]
    if rng is None:
        rounded = xp.rint(scaled)
    else:
        rounded = xp.floor(scaled + rng.random(values.size, dtype=xp.float32))
    codes = (xp.clip(rounded, -top, top) + top).astype(xp.uint16)
    return codes, scales


def dequantize(codes: Any, scales: Any, groups: Groups, bits: int, xp: ModuleType) -> Any:
    """fp32 values from codes and per-group scales (inverse of :func:`quantize`)."""
    return (codes.astype(xp.float32) - qmax(bits)) * scales[groups.group_of]


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy when packed."""
    return -(-count * bits // 8)


def pack(codes: Any, bits: int, xp: ModuleType) -> Any:
    """Codes (< 2**bits) -> little-endian packed uint8 bytes, ``8 // bits`` codes per byte below 8 bits."""
    if bits == 16:
        return codes.astype(xp.uint16).view(xp.uint8)
    if bits == 8:
        return codes.astype(xp.uint8)
    per = 8 // bits
    padded = xp.zeros(packed_nbytes(codes.size, bits) * per, dtype=xp.uint8)
    padded[: codes.size] = codes
    lanes = padded.reshape(-1, per)
    out = lanes[:, 0].copy()
    for lane in range(1, per):
        out |= (lanes[:, lane] << (bits * lane)).astype(xp.uint8)
    return out


def unpack(data: Any, bits: int, count: int, xp: ModuleType) -> Any:
    """Inverse of :func:`pack`: the first ``count`` codes as uint16."""
    if bits == 16:
        return data[: 2 * count].view(xp.uint16)
    if bits == 8:
        return data[:count].astype(xp.uint16)
    mask = (1 << bits) - 1
    lanes = [(data >> (bits * lane)) & mask for lane in range(8 // bits)]
    return xp.stack(lanes, axis=1).reshape(-1)[:count].astype(xp.uint16)
