"""b-bit symmetric quantization with one fp32 scale per group, and bit packing.

Values are split into groups (consecutive runs of a 1-D array: fixed-size groups, or
one group per DCT block). Each group's scale is ``absmax / qmax`` with
``qmax = 2**(b-1) - 1``; a value v becomes the integer ``q = round(v / scale)`` in
[-qmax, qmax] (nearest: |error| <= scale/2; stochastic: ``floor(v/scale + u)``,
u ~ U[0, 1), unbiased, |error| < scale), stored as ``q + qmax`` in b bits.

Everything is plain ``xp`` (numpy or cupy) array code, O(count) per call: fixed-size
groups work on a (groups x size) reshape (no index gathers); groups by label use
``maximum.reduceat`` on NumPy (a sort of (group, |value|) keys elsewhere). Packing below
8 bits ORs strided lanes into the output; :func:`unpack_values` turns packed bytes
straight into fp32 levels through a 256-entry lookup table (one ``take``, no shifts).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from hpcfed.errors import HpcfedError

BITS = (2, 4, 8, 16)
_luts: dict[tuple[int, str], Any] = {}


def qmax(bits: int) -> int:
    """Largest quantized magnitude for ``bits`` (2 -> 1, 4 -> 7, 8 -> 127, 16 -> 32767)."""
    if bits not in BITS:
        raise HpcfedError(f"compression.bits={bits} is not allowed; use one of {list(BITS)}")
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class Groups:
    """How ``count`` values form ``n_groups`` groups.

    ``group_of[i]`` is the group of value i. Fixed groups have ``size`` > 0 (group g holds values
    ``[g*size, (g+1)*size)``); groups by label have ``size == 0`` and ``starts`` (first value of
    each group).
    """

    count: int
    n_groups: int
    group_of: Any
    size: int = 0
    starts: Any = None


def fixed_groups(count: int, size: int, xp: ModuleType) -> Groups:
    """Consecutive groups of ``size`` values (the last one may be shorter)."""
    return Groups(count, -(-count // size), xp.arange(count, dtype=xp.int64) // size, size=size)


def groups_by_label(labels: Any, xp: ModuleType) -> Groups:
    """One group per run of equal labels in the non-decreasing array ``labels`` (e.g. block ids)."""
    count = int(labels.size)
    if count == 0:
        return Groups(0, 0, xp.zeros(0, dtype=xp.int64), starts=xp.zeros(0, dtype=xp.int64))
    new = xp.concatenate([xp.ones(1, dtype=bool), labels[1:] != labels[:-1]])
    starts = xp.flatnonzero(new)
    return Groups(count, int(starts.size), xp.cumsum(new) - 1, starts=starts)


def _absmax(values: Any, groups: Groups, xp: ModuleType) -> Any:
    """fp32 max |value| per group."""
    if groups.n_groups == 0:
        return xp.zeros(0, dtype=xp.float32)
    if groups.size:
        full = groups.count // groups.size * groups.size
        out = xp.empty(groups.n_groups, dtype=xp.float32)
        if full:
            rows = values[:full].reshape(-1, groups.size)
            xp.maximum(rows.max(axis=1), -rows.min(axis=1), out=out[: full // groups.size])
        if full < groups.count:
            out[-1] = xp.abs(values[full:]).max()
        return out
    if xp is np:
        return np.maximum.reduceat(np.abs(values), groups.starts).astype(np.float32, copy=False)
    return _absmax_sorted(values, groups, xp)


def _absmax_sorted(values: Any, groups: Groups, xp: ModuleType) -> Any:
    """Label groups without ``reduceat`` (CuPy): sort (group, |v| bits) keys, read each group's last key.

    |v| >= 0, so its fp32 bit pattern orders like the value; O(k log k) time, O(k) memory.
    """
    bits = xp.abs(values).astype(xp.float32, copy=False).view(xp.int32).astype(xp.int64)
    keys = xp.sort((groups.group_of << 32) | bits)
    last = xp.concatenate([groups.starts[1:], xp.asarray([groups.count], dtype=groups.starts.dtype)]) - 1
    return (keys[last] & 0xFFFFFFFF).astype(xp.int32).view(xp.float32)


def _times(values: Any, per_group: Any, groups: Groups, xp: ModuleType, out: Any) -> Any:
    """``out = values * per_group[group_of]`` (in place when ``out`` is ``values``)."""
    if groups.size:
        full = groups.count // groups.size * groups.size
        rows = full // groups.size
        xp.multiply(values[:full].reshape(rows, groups.size), per_group[:rows, None],
                    out=out[:full].reshape(rows, groups.size))
        xp.multiply(values[full:], per_group[rows:], out=out[full:])
        return out
    return xp.multiply(values, per_group[groups.group_of], out=out)


def quantize(values: Any, groups: Groups, bits: int, xp: ModuleType, rng: Any = None) -> tuple[Any, Any]:
    """(codes in [0, 2*qmax], uint8 below 16 bits else uint16; fp32 scales per group); stochastic with ``rng``."""
    top = qmax(bits)
    absmax = _absmax(values, groups, xp)
    scales = (absmax / xp.float32(top)).astype(xp.float32, copy=False)
    inverse = (xp.float32(top) / xp.where(absmax > 0, absmax, xp.float32(1))).astype(xp.float32, copy=False)
    scaled = _times(values, inverse, groups, xp, xp.empty(values.size, dtype=xp.float32))
    if rng is None:
        xp.rint(scaled, out=scaled)
    else:
        scaled += rng.random(values.size, dtype=xp.float32)
        xp.floor(scaled, out=scaled)
    xp.clip(scaled, -top, top, out=scaled)
    scaled += top
    return scaled.astype(xp.uint8 if bits < 16 else xp.uint16), scales


def dequantize(codes: Any, scales: Any, groups: Groups, bits: int, xp: ModuleType, out: Any = None) -> Any:
    """fp32 values from codes and per-group scales (inverse of :func:`quantize`), into ``out`` if given."""
    out = xp.empty(codes.size, dtype=xp.float32) if out is None else out
    out[...] = codes
    out -= qmax(bits)
    return _times(out, scales, groups, xp, out)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy when packed."""
    return -(-count * bits // 8)


def pack(codes: Any, bits: int, xp: ModuleType, out: Any = None) -> Any:
    """Codes (< 2**bits) -> little-endian packed uint8 bytes, ``8 // bits`` codes per byte below 8 bits.

    ``out`` (optional, uint8, :func:`packed_nbytes`) receives them without a new allocation.
    """
    size = packed_nbytes(codes.size, bits)
    out = xp.empty(size, dtype=xp.uint8) if out is None else out
    if bits == 16:
        out[...] = codes.astype(xp.uint16, copy=False).view(xp.uint8)
        return out
    codes = codes.astype(xp.uint8, copy=False)
    if bits == 8:
        out[...] = codes
        return out
    per = 8 // bits
    out[...] = codes[0::per]
    for lane in range(1, per):
        part = codes[lane::per]
        out[: part.size] |= (part << (bits * lane)).astype(xp.uint8, copy=False)
    return out


def unpack(data: Any, bits: int, count: int, xp: ModuleType) -> Any:
    """Inverse of :func:`pack`: the first ``count`` codes (uint8 below 16 bits, else uint16)."""
    if bits == 16:
        return data[: 2 * count].view(xp.uint16)
    if bits == 8:
        return data[:count]
    per, mask = 8 // bits, (1 << bits) - 1
    out = xp.empty((data.size, per), dtype=xp.uint8)
    for lane in range(per):
        out[:, lane] = (data >> (bits * lane)) & mask
    return out.reshape(-1)[:count]


def _levels(bits: int, xp: ModuleType) -> Any:
    """(256, 8 // bits) fp32 table: the signed levels ``code - qmax`` packed into each byte value."""
    key = (bits, xp.__name__)
    if key not in _luts:
        per, byte = 8 // bits, np.arange(256)[:, None]
        codes = (byte >> (bits * np.arange(per))[None, :]) & ((1 << bits) - 1)
        _luts[key] = xp.asarray(codes - qmax(bits), dtype=xp.float32)
    return _luts[key]


def unpack_values(data: Any, scales: Any, groups: Groups, bits: int, xp: ModuleType, out: Any = None) -> Any:
    """fp32 values (``groups.count`` of them) from packed codes and scales: ``dequantize(unpack(data))``."""
    count = groups.count
    out = xp.empty(count, dtype=xp.float32) if out is None else out
    if bits == 16:
        out[...] = data[: 2 * count].view(xp.uint16)
        out -= qmax(bits)
    else:
        out[...] = xp.take(_levels(bits, xp), data, axis=0).reshape(-1)[:count]   # take: 10x fancy indexing
    return _times(out, scales, groups, xp, out)
