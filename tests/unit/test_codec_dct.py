"""Block DCT: agreement with scipy's orthonormal DCT-II and an exact inverse."""

import numpy as np
import scipy.fft
from hypothesis import given, settings, strategies as st

from hpcfed.codec import dct


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([2, 3, 4, 8, 16, 32]), blocks=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_forward_matches_scipy_and_inverts(n: int, blocks: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal(blocks * n * n).astype(np.float32) * 10.0 ** (seed % 7 - 3)
    coef = dct.forward(x, n, np)
    ref = scipy.fft.dctn(x.reshape(blocks, n, n).astype(np.float64), axes=(1, 2), norm="ortho")
    scale = np.abs(x).max()
    assert coef.shape == (blocks, n * n)
    assert np.abs(coef.reshape(blocks, n, n) - ref).max() <= 1e-5 * scale * n
    back = dct.inverse(coef, n, np)
    assert np.linalg.norm(back - x) <= 1e-5 * np.linalg.norm(x)


@given(length=st.integers(0, 10_000), n=st.integers(2, 40))
def test_block_layout_covers_the_vector(length: int, n: int) -> None:
    blocks, tail = dct.block_layout(length, n)
    assert blocks * n * n + tail == length and 0 <= tail < n * n


def test_dct_matrix_is_orthonormal() -> None:
    for n in (2, 8, 16):
        c = dct.dct_matrix(n)
        assert np.allclose(c @ c.T, np.eye(n), atol=1e-12)


def _kernel_case(n: int, blocks: int, frac: float, seed: int):
    rng = np.random.default_rng(seed)
    n_coef = blocks * n * n
    k = max(1, round(frac * n_coef))
    indices = np.sort(rng.choice(n_coef, k, replace=False))
    return indices, rng.standard_normal(k).astype(np.float32), n_coef


@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([2, 3, 4, 8, 16]), blocks=st.integers(1, 40), frac=st.floats(0.001, 1.0),
       seed=st.integers(0, 2**31))
def test_kernel_inverse_equals_scatter_and_inverse(n: int, blocks: int, frac: float, seed: int) -> None:
    indices, values, n_coef = _kernel_case(n, blocks, frac, seed)
    dense = np.zeros(n_coef, np.float32)
    dense[indices] = values
    expected = dct.inverse(dense, n, np)
    inv = dct.KernelInverse(blocks, n, np)
    inv.set_indices(indices)
    out = np.full(n_coef, np.nan, np.float32)
    assert inv(values, out) is out
    assert np.abs(out - expected).max() <= 1e-5 * (np.abs(values).sum() + 1e-30)
    assert inv.sparse == (indices.size <= 16 * blocks)


def test_kernel_inverse_dense_fallback_and_reinstall(monkeypatch) -> None:
    """Without SciPy's CSR kernel (or off NumPy) the scatter + dense inverse runs; kernels can change."""
    indices, values, n_coef = _kernel_case(8, 30, 0.05, 1)
    fast = dct.KernelInverse(30, 8, np)
    fast.set_indices(indices)
    a = fast(values, np.empty(n_coef, np.float32))
    monkeypatch.setattr(dct, "_csr_matvecs", None)
    slow = dct.KernelInverse(30, 8, np)
    slow.set_indices(indices)
    assert fast.sparse and not slow.sparse
    assert np.allclose(a, slow(values, np.empty(n_coef, np.float32)), atol=1e-6)
    other, values2, _ = _kernel_case(8, 30, 0.05, 2)
    slow.set_indices(other)
    dense = np.zeros(n_coef, np.float32)
    dense[other] = values2
    assert np.allclose(slow(values2, np.empty(n_coef, np.float32)), dct.inverse(dense, 8, np), atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(n=st.sampled_from([2, 4, 8, 16]), blocks=st.integers(1, 50), seed=st.integers(0, 2**31))
def test_forward_add_accumulates(n: int, blocks: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(blocks * n * n).astype(np.float32)
    acc = rng.standard_normal(blocks * n * n).astype(np.float32)
    expected = acc + dct.forward(x, n, np).reshape(-1)
    dct.forward(x, n, np, out=acc, work=np.empty_like(acc), add=True)
    assert np.allclose(acc, expected, atol=1e-5)
    out, work = np.empty_like(x), np.empty_like(x)
    dct.forward(x, n, np, out=out, work=work)
    assert np.array_equal(out, dct.forward(x, n, np).reshape(-1))
