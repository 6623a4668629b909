"""Orthonormal 2-D DCT-II over n x n blocks of a flat vector, and its exact inverse.

A flat vector of length L is cut into ``L // n**2`` consecutive blocks of n*n values
(each read row-major as an n x n matrix); the last ``L % n**2`` values (the tail) are
not transformed. Coefficients are stored row-major per block, so ``coef[b, k*n + l]``
is ``scipy.fft.dctn(block_b, norm="ortho")[k, l]``.

The dense transform is plain matrix algebra on ``xp`` (numpy or cupy): for n <= 8 one
GEMM with the n^2 x n^2 Kronecker matrix C (x) C; for larger n two passes, a GEMM along
rows and a broadcast matmul ``C @ Z`` per block. Measured on one CPU core (EPYC, OpenBLAS),
the Kronecker GEMM (about 1.2-1.6 GB/s) beat separable n x n passes (the column pass
needs a per-block transpose or a batched 8 x 8 matmul: 0.4-1.4 GB/s), even/odd
butterflies on strided views (0.3-0.6 GB/s) and ``scipy.fft.dctn`` over the blocks
(0.4 GB/s); the caller runs it on cache-sized chunks (see ``codec.py``).

The CPU encode at block 8 runs :func:`forward_fused` instead when the compiled ``_blockdct`` extension is
built (``setup.py``; optional): separable passes in registers with the residual add, the energy update, the
sum of squares and the kernel gather in the same pass; the encode is 3-4x the GEMM path's on one core
(``benchmarks/codec_speed.py``).

:class:`KernelInverse` inverts a coefficient vector that is zero outside the kernel
without the zeros: on NumPy a CSR product (each kept value times one row of C (x) C,
k * n^2 multiply-adds instead of n_coef * n^2; about 4-5x the dense GEMM at 2 % kept),
elsewhere (CuPy) a scatter into a zero scratch vector and the dense inverse.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

try:   # BLAS sgemm with beta (C += A @ B in place) and SciPy's compiled CSR x dense kernel (Y += A @ X)
    from scipy.linalg.blas import sgemm as _sgemm
except ImportError:   # pragma: no cover - SciPy is a dependency; without these the plain paths run
    _sgemm = None
try:
    from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except (ImportError, AttributeError):   # pragma: no cover - a private module of SciPy that might move
    _csr_matvecs = None

try:   # the fused 8 x 8 pass in C (setup.py builds it where a C compiler is; without it the GEMM path runs)
    from hpcfed.codec._blockdct import forward_fused as _forward_fused, isa as _isa
except ImportError:   # pragma: no cover - exercised only on an install without a C compiler
    _forward_fused = _isa = None

_KRONECKER_MAX_N = 8
_SPARSE_MAX_NN = 1024          # C (x) C up to 1024 x 1024 (4 MiB) for the CSR path
_SPARSE_MAX_DENSITY = 16       # CSR while k * n*n <= 16 * n_coef multiply-adds (measured: faster below, slower above)
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


def _fortran_operator(n: int) -> np.ndarray:
    """C (x) C in column-major order on the host (sgemm's A without a copy)."""
    key = (n, "fortran", True)
    if key not in _cache:
        _cache[key] = np.asfortranarray(_operator(n, np, True))
    return _cache[key]


def fused(n: int, xp: ModuleType) -> bool:
    """Whether :func:`forward_fused` serves blocks of n x n on ``xp``: NumPy, n = 8, extension built."""
    return _forward_fused is not None and n == 8 and xp is np


def fused_kind() -> str:
    """What the CPU encode's block DCT runs: the compiled pass and its instruction set, or the GEMM."""
    return f"compiled 8x8 pass ({_isa()})" if _isa is not None else "NumPy GEMM (extension not built)"


def forward_fused(blocks: np.ndarray, out: np.ndarray, energy: np.ndarray | None, add: bool,
                  positions: np.ndarray | None = None, values: np.ndarray | None = None) -> float:
    """8 x 8 blocks only (see :func:`fused`): ``out`` (+)= DCT(blocks) as laid out by :func:`forward`,
    ``energy += out**2`` when given, ``values[:] = out[positions]`` when given (int64); returns the sum of
    ``out**2`` (flat fp32, one length, C-contiguous)."""
    return _forward_fused(blocks, out, energy, add, positions, values)


def forward(blocks: Any, n: int, xp: ModuleType, out: Any = None, work: Any = None, add: bool = False) -> Any:
    """2-D DCT of every block: ``blocks`` holds n_blocks*n*n fp32 values; returns (n_blocks, n*n).

    ``out`` (optional, contiguous, n_blocks*n*n fp32) receives the result without a new allocation;
    ``work`` (same size) is scratch for the row pass when n > 8. With ``add`` the result is accumulated
    instead, ``out += DCT(blocks)``: inside the GEMM (beta = 1) on NumPy for n <= 8, else through
    ``work`` (then the row pass of n > 8 takes a temporary).
    """
    nb = blocks.size // (n * n)
    if add:
        if n <= _KRONECKER_MAX_N and xp is np and _sgemm is not None and nb and out.flags.c_contiguous:
            _sgemm(1.0, _fortran_operator(n), blocks.reshape(nb, n * n).T, beta=1.0,
                   c=out.reshape(nb, n * n).T, overwrite_c=True)        # column-major view: out^T += K @ x^T
            return out.reshape(nb, n * n)
        coef = forward(blocks, n, xp, out=work)
        return xp.add(out.reshape(nb, n * n), coef.reshape(nb, n * n), out=out.reshape(nb, n * n))
    out = None if out is None else out.reshape(nb, n * n)
    if n <= _KRONECKER_MAX_N:
        return xp.matmul(blocks.reshape(nb, n * n), _operator(n, xp, True).T, out=out)
    c = _operator(n, xp, False)
    rows = xp.matmul(blocks.reshape(nb * n, n), c.T, out=None if work is None else work.reshape(nb * n, n))
    return xp.matmul(c, rows.reshape(nb, n, n), out=None if out is None else out.reshape(nb, n, n)).reshape(nb, n * n)


def inverse(coef: Any, n: int, xp: ModuleType, out: Any = None, work: Any = None) -> Any:
    """Exact inverse of :func:`forward`: (n_blocks, n*n) coefficients -> flat fp32 values (into ``out`` if given).

    ``work`` as in :func:`forward`.
    """
    nb = coef.size // (n * n)
    if n <= _KRONECKER_MAX_N:
        target = None if out is None else out.reshape(nb, n * n)
        return xp.matmul(coef.reshape(nb, n * n), _operator(n, xp, True), out=target).reshape(-1)
    c = _operator(n, xp, False)
    rows = xp.matmul(coef.reshape(nb * n, n), c, out=None if work is None else work.reshape(nb * n, n))
    return xp.matmul(c.T, rows.reshape(nb, n, n), out=None if out is None else out.reshape(nb, n, n)).reshape(-1)


class KernelInverse:
    """``inverse`` of a coefficient vector given only its values at sorted ``indices`` (zero elsewhere).

    One instance per codec: :meth:`set_indices` at each kernel install (O(k + n_blocks), no O(n)
    allocation); calls write into ``out`` and allocate nothing of size O(n).
    """

    def __init__(self, n_blocks: int, n: int, xp: ModuleType) -> None:
        self.n_blocks, self.n, self.xp = n_blocks, n, xp
        self.indices: Any = None
        self._indptr = np.zeros(n_blocks + 1, dtype=np.int64) if xp is np else None
        self._positions: Any = None
        self._zeros: Any = None          # dense path: all-zero between calls (allocated on first use)
        self._work: Any = None

    def set_indices(self, indices: Any) -> None:
        """Adopt a new sorted index set (a kernel)."""
        xp, nn = self.xp, self.n * self.n
        self.indices = indices
        self._positions = None
        if self._indptr is not None and _csr_matvecs is not None and nn <= _SPARSE_MAX_NN \
                and indices.size <= _SPARSE_MAX_DENSITY * self.n_blocks:     # k * n*n <= 16 * n_coef
            blocks = indices // nn                                  # sorted: one run per block
            starts = np.flatnonzero(np.concatenate([[True], blocks[1:] != blocks[:-1]])) if blocks.size else blocks
            self._indptr[:] = 0
            self._indptr[blocks[starts] + 1] = np.diff(np.append(starts, blocks.size))
            np.cumsum(self._indptr, out=self._indptr)
            self._positions = np.ascontiguousarray(indices % nn, dtype=np.int64)
        elif self._zeros is None:
            self._zeros = xp.zeros(self.n_blocks * nn, dtype=xp.float32)
            self._work = xp.empty(self.n_blocks * nn, dtype=xp.float32) if self.n > _KRONECKER_MAX_N else None

    @property
    def sparse(self) -> bool:
        """Whether calls take the CSR path."""
        return self._positions is not None

    def __call__(self, values: Any, out: Any) -> Any:
        """``out`` (contiguous fp32, n_blocks*n*n) = inverse DCT of the coefficients ``values`` at the indices."""
        nn = self.n * self.n
        if self._positions is not None:
            out[:] = 0
            if not self.n_blocks:
                return out
            _csr_matvecs(self.n_blocks, nn, nn, self._indptr, self._positions,
                         np.ascontiguousarray(values, dtype=np.float32), _operator(self.n, np, True).reshape(-1), out)
            return out
        self._zeros[self.indices] = values
        inverse(self._zeros, self.n, self.xp, out=out, work=self._work)
        self._zeros[self.indices] = 0
        return out
