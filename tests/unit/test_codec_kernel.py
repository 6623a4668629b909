"""Kernel coding and merging: compact, exact, deterministic, order-independent."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hpcfed.codec import kernel as kern
from hpcfed.errors import HpcfedError


@given(st.lists(st.integers(0, 2**62), max_size=200))
def test_varint_round_trip(values: list[int]) -> None:
    data = kern.varint_encode(np.array(values, dtype=np.uint64))
    assert data.dtype == np.uint8
    assert kern.varint_decode(data).tolist() == values


def test_truncated_varint_is_an_error() -> None:
    with pytest.raises(HpcfedError, match="truncated"):
        kern.varint_decode(np.array([0x81], dtype=np.uint8))


@given(blocks=st.integers(1, 50), n=st.sampled_from([2, 4, 8]), frac=st.floats(0.01, 1.0))
def test_lowfreq_kernel_spreads_over_blocks(blocks: int, n: int, frac: float) -> None:
    k = max(1, round(frac * blocks * n * n))
    ker = kern.lowfreq_kernel(blocks, n, k)
    assert ker.size == k and np.all(np.diff(ker) > 0)
    if k >= blocks:                                      # every block carries its DC coefficient first
        assert set(range(0, blocks * n * n, n * n)) <= set(ker.tolist())


@settings(max_examples=30, deadline=None)
@given(n_coef=st.integers(20, 3000), frac=st.floats(0.005, 0.5), tiers=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_local_kernel_carries_the_top_positions(n_coef: int, frac: float, tiers: int, seed: int) -> None:
    energy = np.random.default_rng(seed).permutation(n_coef).astype(np.float32)   # distinct energies
    k = max(1, round(frac * n_coef))
    read = kern.read_local_kernel(kern.local_kernel(energy, k, tiers, np), n_coef)
    assert len(read) == tiers
    assert sorted(np.concatenate(read).tolist()) == sorted(np.argsort(-energy)[:k].tolist())
    if tiers > 1 and read[1].size:                       # strongest tier first
        assert energy[read[0]].min() > energy[read[1]].max()


def _locals(workers: int, n_coef: int, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [kern.local_kernel(rng.random(n_coef).astype(np.float32) ** 4, k, 2, np) for _ in range(workers)]


@settings(max_examples=20, deadline=None)
@given(workers=st.integers(1, 4), blocks=st.integers(1, 30), k_frac=st.floats(0.01, 0.3), seed=st.integers(0, 2**31))
def test_merge_is_deterministic_and_order_independent(workers, blocks, k_frac, seed) -> None:
    n = 4
    k = max(1, round(k_frac * blocks * n * n))
    local = _locals(workers, blocks * n * n, k, seed)
    results = {tuple(kern.merge(list(p), blocks, n, k, version=3)) for p in itertools.permutations(local)}
    assert len(results) == 1
    merged = np.array(results.pop())
    assert merged.size == k and np.all(np.diff(merged) > 0) and merged[-1] < blocks * n * n


def test_merge_prefers_votes_and_fills_from_low_frequencies() -> None:
    n_blocks, n, k = 4, 4, 6
    energy = np.zeros(64, dtype=np.float32)
    energy[[40, 41]] = [2.0, 1.0]
    local = kern.local_kernel(energy, 2, 1, np)
    merged = kern.merge([local, local], n_blocks, n, k, version=1)
    assert {40, 41} <= set(merged.tolist())
    assert set(merged.tolist()) - {40, 41} <= set(kern.lowfreq_order(n_blocks, n, k + 2).tolist())


def test_global_payload_round_trip_and_checks() -> None:
    ker = np.array([0, 5, 6, 300, 1023])
    payload = kern.global_payload(7, ker)
    assert payload.size < 4 * ker.size
    version, back = kern.read_global_payload(payload, 1024, 5)
    assert version == 7 and back.tolist() == ker.tolist()
    with pytest.raises(HpcfedError, match="expects 4 below 1024"):
        kern.read_global_payload(payload, 1024, 4)


def test_kernel_payloads_are_compact() -> None:
    """About one byte per index at 2 % density (a bitmap would take n/8, int32 indices 4 k)."""
    n_coef, k = 151_296, 3026
    payload = _locals(1, n_coef, k, 0)[0]
    assert payload.size < 1.3 * k


def _reference_merge(local_payloads, n_blocks, n, k, version):
    """The dense-vote definition: a score per coefficient, lexsort by (-score, tiebreak, position)."""
    n_coef = n_blocks * n * n
    scores = np.zeros(n_coef, dtype=np.int64)
    for payload in local_payloads:
        tiers = kern.read_local_kernel(payload, n_coef)
        for t, idx in enumerate(tiers):
            scores[idx] += len(tiers) - t
    candidates = np.flatnonzero(scores)
    order = np.lexsort((kern._tiebreak(candidates, version), -scores[candidates]))
    chosen = candidates[order[:k]]
    if chosen.size < k:
        fill = kern.lowfreq_order(n_blocks, n, k + chosen.size)
        chosen = np.concatenate([chosen, fill[~np.isin(fill, chosen)][: k - chosen.size]])
    return np.sort(chosen)


@settings(max_examples=40, deadline=None)
@given(workers=st.integers(0, 5), blocks=st.integers(1, 40), k_frac=st.floats(0.01, 0.6), tiers=st.integers(1, 3),
       coarse=st.booleans(), seed=st.integers(0, 2**31), version=st.integers(0, 50))
def test_merge_equals_the_dense_vote_definition(workers, blocks, k_frac, tiers, coarse, seed, version) -> None:
    """Sort-based merge (O(W k log)) picks exactly what dense votes + lexsort pick, ties included."""
    n = 4
    n_coef = blocks * n * n
    k = max(1, round(k_frac * n_coef))
    rng = np.random.default_rng(seed)
    energies = [rng.integers(0, 3, n_coef).astype(np.float32) if coarse else rng.random(n_coef).astype(np.float32)
                for _ in range(workers)]
    local = [kern.local_kernel(e, max(1, k // 2), tiers, np) for e in energies]
    assert np.array_equal(kern.merge(local, blocks, n, k, version), _reference_merge(local, blocks, n, k, version))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300_000), frac=st.floats(0.0001, 1.0), ties=st.booleans(), seed=st.integers(0, 2**31))
def test_top_k_selects_the_largest(n: int, frac: float, ties: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    score = (rng.integers(0, 4, n) if ties else rng.standard_normal(n) ** 2).astype(np.float32)
    k = max(1, round(frac * n))
    top = kern.top_k(score, k, np)
    assert top.size == k and np.unique(top).size == k
    assert np.array_equal(np.sort(score[top]), np.sort(score)[n - k:])       # the k largest values
    assert np.array_equal(top, kern.top_k(score, k, np))                       # deterministic


@given(st.lists(st.integers(0, 2**62), max_size=200), st.integers(0, 3))
def test_varint_matches_the_bytewise_definition(values: list[int], shift: int) -> None:
    values = [v >> (14 * shift) for v in values]
    expected = []
    for v in values:
        while True:
            byte, v = v & 127, v >> 7
            expected.append(byte | (128 if v else 0))
            if not v:
                break
    assert kern.varint_encode(np.array(values, dtype=np.uint64)).tolist() == expected


@settings(max_examples=25, deadline=None)
@given(workers=st.integers(0, 4), blocks=st.integers(2, 30), k_frac=st.floats(0.02, 0.4), m_frac=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**31), version=st.integers(1, 50))
def test_merge_delta_swaps_weakest_for_best_voted(workers, blocks, k_frac, m_frac, seed, version) -> None:
    n = 4
    n_coef = blocks * n * n
    k = max(1, round(k_frac * n_coef))
    m = max(1, round(m_frac * k))
    rng = np.random.default_rng(seed)
    kernel = np.sort(rng.choice(n_coef, k, replace=False))
    strength = rng.integers(0, 3, k).astype(np.float32)                 # ties included
    local = [kern.local_kernel(rng.random(n_coef).astype(np.float32), m, 2, np) for _ in range(workers)]
    results = {tuple(map(tuple, kern.merge_delta(list(p), kernel, strength, m, n_coef, version)))
               for p in itertools.permutations(local)}
    assert len(results) == 1
    removed, added = (np.array(x, dtype=np.int64) for x in results.pop())
    assert removed.size == added.size <= m and not np.isin(added, kernel).any()
    if removed.size:
        assert strength[removed].max() <= np.delete(strength, removed).min(initial=np.inf)
    payload = kern.delta_payload(version, removed, added)
    back_version, back = kern.read_global_payload(payload, n_coef, k, kernel)
    assert back_version == version and back.size == k and np.all(np.diff(back) > 0)
    assert set(back.tolist()) == (set(kernel.tolist()) - set(kernel[removed].tolist())) | set(added.tolist())


def test_bad_deltas_are_one_line_errors() -> None:
    kernel = np.array([1, 5, 9])
    with pytest.raises(HpcfedError, match="already holds"):
        kern.read_global_payload(kern.delta_payload(2, [0], [5]), 64, 3, kernel)
    with pytest.raises(HpcfedError, match="removes 1 slots"):
        kern.read_global_payload(kern.delta_payload(2, [0], []), 64, 3, kernel)
    with pytest.raises(HpcfedError, match="unknown kind"):
        kern.read_global_payload(kern.varint_encode(np.array([2, 7, 0])), 64, 3, kernel)
