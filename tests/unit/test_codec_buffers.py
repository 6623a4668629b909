"""Buffer coding: exact fp32, or fp16 changes under one power-of-two scale that never overflow."""

import numpy as np
from hypothesis import given, settings, strategies as st

from hpcfed.codec.buffers import BufferCoding


def _encoded(size: int, seed: int, lossy: bool) -> tuple[np.ndarray, np.ndarray, BufferCoding, np.ndarray]:
    """(synced, buffers, coding, encoded bytes) for random buffers and changes over many magnitudes."""
    rng = np.random.default_rng(seed)
    synced = (rng.standard_normal(size) * 10.0 ** rng.integers(-3, 6)).astype(np.float32)
    buffers = synced + (rng.standard_normal(size) * 10.0 ** rng.integers(-8, 8)).astype(np.float32)
    coding = BufferCoding(size, lossy=lossy, xp=np)
    return synced, buffers, coding, coding.encode(buffers, synced)


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 500), seed=st.integers(0, 2**31))
def test_exact_coding_round_trips_bit_for_bit(size, seed) -> None:
    synced, buffers, coding, raw = _encoded(size, seed, lossy=False)
    assert raw.dtype == np.uint8 and raw.size == coding.nbytes == 4 * size
    assert np.array_equal(coding.decode(raw, synced), buffers)


@settings(max_examples=80, deadline=None)
@given(size=st.integers(1, 500), seed=st.integers(0, 2**31))
def test_lossy_coding_keeps_fp16_precision_of_the_largest_change_and_half_the_bytes(size, seed) -> None:
    synced, buffers, coding, raw = _encoded(size, seed, lossy=True)
    assert raw.size == coding.nbytes == 4 + 2 * size
    back = coding.decode(raw, synced)
    assert np.isfinite(back).all()
    change = np.abs(buffers.astype(np.float64) - synced)
    # one fp16 rounding of each change (relative 2**-11, or the subnormal step 2**-24 of the largest
    # code 2**14) plus the fp32 rounding of the subtraction and of the sum
    bound = (change * 2.0 ** -11 + change.max() * 2.0 ** -38
             + 2 * np.spacing(np.abs(buffers)) + np.spacing(np.abs(synced)))
    assert (np.abs(back.astype(np.float64) - buffers) <= bound).all()


def test_lossy_coding_is_exact_for_unchanged_values_and_integer_counts() -> None:
    synced = np.array([3.0, 7.0, 0.25, 12.0], np.float32)   # the last: a num_batches_tracked count
    buffers = np.array([3.0, 7.0 + 1234.0, 0.25, 13.0], np.float32)
    coding = BufferCoding(4, lossy=True, xp=np)
    back = coding.decode(coding.encode(buffers, synced), synced)
    assert back[0] == 3.0 and back[2] == 0.25 and back[3] == 13.0
    assert back[1] == buffers[1]   # 1234 has 11 significant bits: fp16 holds it


def test_huge_changes_do_not_overflow_fp16() -> None:
    synced = np.zeros(3, np.float32)
    buffers = np.array([1e30, -3e29, 1.0], np.float32)
    coding = BufferCoding(3, lossy=True, xp=np)
    back = coding.decode(coding.encode(buffers, synced), synced)
    assert np.isfinite(back).all() and np.allclose(back[:2], buffers[:2], rtol=2 ** -11)


def test_the_mean_is_the_mean_of_what_was_reported_in_order() -> None:
    rng = np.random.default_rng(0)
    synced = rng.standard_normal(50).astype(np.float32)
    reports = [synced + 0.01 * rng.standard_normal(50).astype(np.float32) for _ in range(4)]
    for lossy in (False, True):
        coding = BufferCoding(50, lossy=lossy, xp=np)
        raws = [coding.encode(r, synced) for r in reports]
        mean = coding.decode(coding.mean(raws, synced), synced)
        expected = np.mean([coding.decode(raw, synced) for raw in raws], axis=0)
        assert np.allclose(mean, expected, rtol=0, atol=0 if not lossy else 1e-5)
        assert np.array_equal(coding.mean(raws, synced), coding.mean(raws, synced))


def test_a_model_without_buffers_sends_nothing() -> None:
    for lossy in (False, True):
        coding = BufferCoding(0, lossy=lossy, xp=np)
        empty = np.zeros(0, np.float32)
        assert coding.nbytes == 0 and coding.mean([coding.encode(empty, empty)], empty).size == 0
