"""Quantization: error bounds per bit width, unbiased stochastic rounding, bit packing."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hpcfed.codec import quant
from hpcfed.errors import HpcfedError

BITS = st.sampled_from(quant.BITS)


def _groups(count: int, size: int, by_label: bool):
    if by_label:
        labels = np.sort(np.random.default_rng(count).integers(0, max(1, count // size + 1), count))
        return quant.groups_by_label(labels, np)
    return quant.fixed_groups(count, size, np)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, count=st.integers(1, 600), size=st.integers(1, 300), by_label=st.booleans(),
       stochastic=st.booleans(), seed=st.integers(0, 2**31))
def test_error_is_bounded_by_the_step(bits, count, size, by_label, stochastic, seed) -> None:
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(count) * 10.0 ** rng.integers(-6, 4)).astype(np.float32)
    groups = _groups(count, size, by_label)
    codes, scales = quant.quantize(values, groups, bits, np, rng if stochastic else None)
    assert codes.max() <= 2 * quant.qmax(bits) and scales.size == groups.n_groups
    back = quant.dequantize(codes, scales, groups, bits, np)
    step = scales[groups.group_of]
    bound = (1.0 if stochastic else 0.5) * step * (1 + 1e-5) + 1e-6 * np.abs(values)
    assert np.all(np.abs(back - values) <= bound)


def test_zeros_quantize_to_zeros() -> None:
    groups = quant.fixed_groups(10, 4, np)
    codes, scales = quant.quantize(np.zeros(10, np.float32), groups, 4, np)
    assert np.all(quant.dequantize(codes, scales, groups, 4, np) == 0) and np.all(scales == 0)


@pytest.mark.parametrize("bits", [2, 4])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    """Mean of 200k stochastically rounded copies lies within 5 standard errors; nearest rounding does not."""
    count, x = 200_000, 0.3
    values = np.full(count, x, dtype=np.float32)
    values[0] = 1.0                                   # absmax 1: x sits between two levels
    groups = quant.fixed_groups(count, count, np)
    rng = np.random.default_rng(7)
    codes, scales = quant.quantize(values, groups, bits, np, rng)
    back = quant.dequantize(codes, scales, groups, bits, np)[1:].astype(np.float64)
    stderr = float(scales[0]) / 2 / np.sqrt(count - 1)
    assert abs(back.mean() - x) < 5 * stderr
    nearest = quant.dequantize(*quant.quantize(values, groups, bits, np), groups, bits, np)[1:]
    assert abs(nearest.mean() - x) > 50 * stderr


@given(bits=BITS, count=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_pack_round_trip(bits: int, count: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 2 * quant.qmax(bits) + 1, count).astype(np.uint16)
    packed = quant.pack(codes, bits, np)
    assert packed.dtype == np.uint8 and packed.size == quant.packed_nbytes(count, bits)
    assert np.array_equal(quant.unpack(packed, bits, count, np), codes)


def test_bad_bit_width_is_a_one_line_error() -> None:
    with pytest.raises(HpcfedError, match="compression.bits=3"):
        quant.qmax(3)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, count=st.integers(0, 600), size=st.integers(1, 300), by_label=st.booleans(),
       seed=st.integers(0, 2**31))
def test_unpack_values_is_dequantize_of_unpack_bit_for_bit(bits, count, size, by_label, seed) -> None:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(count).astype(np.float32)
    groups = _groups(count, size, by_label) if count else quant.fixed_groups(0, size, np)
    codes, scales = quant.quantize(values, groups, bits, np)
    assert codes.dtype == (np.uint16 if bits == 16 else np.uint8)
    packed = quant.pack(codes, bits, np)
    reference = quant.dequantize(quant.unpack(packed, bits, count, np), scales, groups, bits, np)
    out = np.full(count, np.nan, np.float32)
    assert quant.unpack_values(packed, scales, groups, bits, np, out=out) is out
    assert np.array_equal(out, reference) and np.array_equal(quant.unpack_values(packed, scales, groups, bits, np), out)


@given(bits=BITS, count=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_pack_into_a_given_buffer(bits: int, count: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 2 * quant.qmax(bits) + 1, count).astype(np.uint16)
    buffer = np.full(quant.packed_nbytes(count, bits) + 3, 0xAB, np.uint8)
    size = quant.packed_nbytes(count, bits)
    result = quant.pack(codes, bits, np, out=buffer[:size])
    assert result.size == size and np.array_equal(buffer[:size], quant.pack(codes, bits, np))
    assert np.all(buffer[size:] == 0xAB)


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 500), size=st.integers(1, 60), seed=st.integers(0, 2**31))
def test_label_group_absmax_by_sort_equals_reduceat(count: int, size: int, seed: int) -> None:
    """The sort path (array modules without ``reduceat``) finds exactly NumPy's per-group absmax."""
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, max(1, count // size + 1), count))
    values = (rng.standard_normal(count) * 10.0 ** rng.integers(-3, 3, count)).astype(np.float32)
    values[rng.random(count) < 0.1] = 0.0
    groups = quant.groups_by_label(labels, np)
    assert np.array_equal(quant._absmax_sorted(values, groups, np), quant._absmax(values, groups, np))


def test_fixed_groups_match_the_per_value_definition() -> None:
    """absmax per group and value * scale[group_of] via reshapes equal the gather-based definition."""
    rng = np.random.default_rng(3)
    for count, size in [(1000, 256), (256, 256), (255, 256), (7, 3)]:
        values = rng.standard_normal(count).astype(np.float32)
        groups = quant.fixed_groups(count, size, np)
        codes, scales = quant.quantize(values, groups, 8, np)
        absmax = np.array([np.abs(values[groups.group_of == g]).max() for g in range(groups.n_groups)], np.float32)
        assert np.array_equal(scales, absmax / np.float32(127))
        back = quant.dequantize(codes, scales, groups, 8, np)
        assert np.array_equal(back, (codes.astype(np.float32) - 127) * scales[groups.group_of])
