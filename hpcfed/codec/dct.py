"""Orthonormal 2-D DCT-II over n x n blocks of a flat vector, and its exact inverse.

A flat vector of length L is cut into ``L // n**2`` consecutive blocks of n*n values
(each read row-major as an n x n matrix); the last ``L % n**2`` values (the tail) are
not transformed. Coefficients are stored row-major per block, so ``coef[b, k*n + l]``
is ``scipy.fft.dctn(block_b, norm="ortho")[k, l]``.

The transform is plain matrix algebra on ``xp`` (numpy or cupy): for n <= 8 one GEMM
with the n^2 x n^2 Kronecker matrix C (x) C; for larger n two passes, a GEMM along
rows and a broadcast matmul ``C @ Z`` per block. These were the fastest on one CPU
core here (faster than scipy.fft.dctn over blocks) and need nothing beyond matmul.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

_KRONECKER_MAX_N = 8
_cache: dict[tuple[int, str, bool], Any] = {}


def block_layout(length: int, n: int) -> tuple[int, int]:
    """(number of full n x n blocks, tail length) for a flat vector of ``length`` values."""
    return length // (n * n), length % (n * n)


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix C (float64, n x n): y = C @ x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    c[0] /= np.sqrt(2.0)
    return c


def _operator(n: int, xp: ModuleType, kronecker: bool) -> Any:
    """The cached fp32 operator on ``xp``: C (x) C for the one-GEMM path, else C."""
    key = (n, xp.__name__, kronecker)
    if key not in _cache:
        c = dct_matrix(n)
        _cache[key] = xp.asarray(np.kron(c, c) if kronecker else c, dtype=xp.float32)
    return _cache[key]


def forward(blocks: Any, n: int, xp: ModuleType, out: Any = None) -> Any:
    """2-D DCT of every block: ``blocks`` holds n_blocks*n*n fp32 values; returns (n_blocks, n*n).

    ``out`` (optional, contiguous, n_blocks*n*n fp32) receives the result without a new allocation.
    """
    nb = blocks.size // (n * n)
    out = None if out is None else out.reshape(nb, n * n)
    if n <= _KRONECKER_MAX_N:
        return xp.matmul(blocks.reshape(nb, n * n), _operator(n, xp, True).T, out=out)
    c = _operator(n, xp, False)
    rows = blocks.reshape(nb * n, n) @ c.T           # transform along each row, then along columns
    return xp.matmul(c, rows.reshape(nb, n, n), out=None if out is None else out.reshape(nb, n, n)).reshape(nb, n * n)


def inverse(coef: Any, n: int, xp: ModuleType, out: Any = None) -> Any:
    """Exact inverse of :func:`forward`: (n_blocks, n*n) coefficients -> flat fp32 values (into ``out`` if given)."""
    nb = coef.size // (n * n)
    if n <= _KRONECKER_MAX_N:
        target = None if out is None else out.reshape(nb, n * n)
        return xp.matmul(coef.reshape(nb, n * n), _operator(n, xp, True), out=target).reshape(-1)
    c = _operator(n, xp, False)
    rows = coef.reshape(nb * n, n) @ c
    return xp.matmul(c.T, rows.reshape(nb, n, n), out=None if out is None else out.reshape(nb, n, n)).reshape(-1)
