"""How a model's buffers (BatchNorm running statistics) travel with each step's packet.

Every rank holds the same synchronised buffers; a worker's report differs from them only by one
batch's contribution. :class:`BufferCoding` sends either the buffers themselves as fp32 (exact:
compression off) or, with compression on, their change against the synchronised buffers as fp16
codes under one power-of-two scale (``4 + 2 n`` bytes instead of ``4 n``): the scale keeps every
code below 2**14, so nothing overflows fp16, and each change keeps fp16's 11 significant bits.
Rank 0 averages the decoded reports and encodes the mean the same way; every rank decodes those
bytes against the same synchronised buffers, so replicas agree bit for bit.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

CODE_LIMIT_EXPONENT = 14   # codes stay below 2**14 (fp16 holds up to 65504)


class BufferCoding:
    """Encode and decode a flat fp32 buffer vector of ``size`` elements: exact, or as fp16 deltas."""

    def __init__(self, size: int, lossy: bool, xp: ModuleType) -> None:
        self.size, self.lossy, self.xp = size, lossy and size > 0, xp
        self.nbytes = 4 + 2 * size if self.lossy else 4 * size   # lossy: an int32 exponent, then the codes

    def encode(self, buffers: Any, synced: Any) -> Any:
        """The bytes (uint8) that carry ``buffers``, given the ``synced`` buffers both sides hold."""
        xp = self.xp
        if not self.lossy:
            return buffers.astype(xp.float32, copy=False).view(xp.uint8)
        delta = buffers - synced
        largest = float(xp.max(xp.abs(delta)))
        exponent = math.frexp(largest)[1] - CODE_LIMIT_EXPONENT if math.isfinite(largest) and largest > 0 else 0
        codes = xp.ldexp(delta, -exponent).astype(xp.float16)   # exact power-of-two scaling, then one rounding
        return xp.concatenate([xp.asarray([exponent], dtype=xp.int32).view(xp.uint8), codes.view(xp.uint8)])

    def decode(self, raw: Any, synced: Any) -> Any:
        """The fp32 buffers that :meth:`encode`'s bytes ``raw`` carry."""
        xp = self.xp
        if not self.lossy:
            return raw.view(xp.float32)
        exponent = int(raw[:4].view(xp.int32)[0])
        return synced + xp.ldexp(raw[4:].view(xp.float16).astype(xp.float32), exponent)

    def mean(self, reports: list, synced: Any) -> Any:
        """Rank 0: the bytes of the mean of the decoded ``reports``, summed in the order given."""
        xp = self.xp
        total = xp.zeros(self.size, xp.float32)
        for raw in reports:
            total += self.decode(raw, synced)
        return self.encode(total / xp.float32(max(len(reports), 1)), synced)
