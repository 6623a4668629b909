"""Block DCT: agreement with scipy's orthonormal DCT-II and an exact inverse."""

import numpy as np
import pytest
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


def test_the_compiled_pass_is_built_where_a_c_compiler_is() -> None:
    """setup.py builds ``_blockdct`` optionally; on a machine with a compiler a silent fallback would be a
    5x slower encode, so its absence here is a failure."""
    import shutil

    if shutil.which("cc") or shutil.which("gcc"):
        assert dct.fused(8, np), dct.fused_kind()
        assert dct.fused_kind().startswith("compiled 8x8 pass (")
    assert not dct.fused(16, np)


@settings(max_examples=30, deadline=None)
@given(blocks=st.integers(1, 300), add=st.booleans(), energy=st.booleans(), seed=st.integers(0, 2**31))
def test_fused_pass_matches_the_gemm_residual_energy_and_sum(blocks: int, add: bool, energy: bool, seed: int) -> None:
    if not dct.fused(8, np):
        pytest.skip(dct.fused_kind())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(blocks * 64).astype(np.float32) * 10.0 ** (seed % 5 - 2)
    out = rng.standard_normal(blocks * 64).astype(np.float32)
    acc = rng.random(blocks * 64).astype(np.float32)
    before = acc.copy()
    positions = np.sort(rng.choice(x.size, rng.integers(0, x.size // 4 + 1), replace=False)).astype(np.int64)
    values = np.full(positions.size, np.nan, np.float32)
    expected = dct.forward(x, 8, np).reshape(-1) + (out if add else 0)
    total = dct.forward_fused(x, out, acc if energy else None, add, positions, values)
    scale = float(np.abs(expected).max())
    assert np.abs(out - expected).max() <= 1e-5 * scale
    assert np.array_equal(values, out[positions])
    assert np.isclose(total, float(np.dot(expected.astype(np.float64), expected)), rtol=1e-4)
    if energy:
        assert np.allclose(acc, before + expected * expected, rtol=1e-4, atol=1e-5 * scale**2)
    else:
        assert np.array_equal(acc, before)


def test_fused_pass_rejects_what_it_cannot_read() -> None:
    if not dct.fused(8, np):
        pytest.skip(dct.fused_kind())
    x = np.zeros(128, np.float32)
    with pytest.raises(ValueError, match="multiple of 64"):
        dct.forward_fused(x[:100], np.zeros(100, np.float32), None, False)
    with pytest.raises(ValueError, match="same length"):
        dct.forward_fused(x, np.zeros(64, np.float32), None, False)
    with pytest.raises(TypeError, match="float32"):
        dct.forward_fused(x.astype(np.float64), np.zeros(128, np.float64), None, False)
    with pytest.raises(ValueError, match="outside the 128 values"):
        dct.forward_fused(x, np.zeros(128, np.float32), None, False, np.array([3, 128]), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="go together"):
        dct.forward_fused(x, np.zeros(128, np.float32), None, False, np.array([3]), None)
    with pytest.raises(TypeError, match="positions must be int64"):
        dct.forward_fused(x, np.zeros(128, np.float32), None, False, np.array([3], np.int32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        dct.forward_fused(x[::2], np.zeros(64, np.float32), None, False)
