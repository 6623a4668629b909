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
