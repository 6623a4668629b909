"""Coded sample-set blocks: assignments, the any-k property, batches, completion, exact gradients."""

from __future__ import annotations

import itertools
import random
from math import comb

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from hpcfed.coding import (
    Assignment,
    CompletionTracker,
    block_batch,
    block_indices,
    combine_block_gradients,
    make_assignment,
    verify_any_k,
)
from hpcfed.errors import HpcfedError

BATCH = 8
SEED = 3


# ---------------------------------------------------------------- a real model on real rows


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


def gradient(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], rows: np.ndarray) -> np.ndarray:
    """Flat fp32 gradient of the mean cross-entropy over ``rows``."""
    x, y = data
    idx = torch.as_tensor(rows)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()


def arrival_orders(a: Assignment, subset: tuple[int, ...], rng: random.Random) -> list[list[tuple[int, int]]]:
    """Worker-by-worker orders (all for k <= 3, else three) plus two block-level interleavings."""
    if len(subset) <= 3:
        perms = list(itertools.permutations(subset))
    else:
        perms = [rng.sample(subset, len(subset)) for _ in range(3)]
    orders = [[(w, b) for w in perm for b in a.blocks_of(w)] for perm in perms]
    for _ in range(2):
        events = [(w, b) for w in subset for b in a.blocks_of(w)]
        rng.shuffle(events)
        orders.append(events)
    return orders


CASES = [
    (1, 1, "cyclic"), (2, 1, "fractional"), (2, 1, "cyclic"), (3, 2, "cyclic"), (3, 3, "fractional"),
    (4, 3, "fractional"), (4, 2, "cyclic"), (4, 3, "cyclic"), (4, 4, "cyclic"), (5, 3, "cyclic"),
    (6, 4, "fractional"), (6, 3, "cyclic"), (6, 5, "fractional"),
]


@pytest.mark.parametrize("n_workers,target,scheme", CASES)
@pytest.mark.parametrize("step", [0, 40])
def test_coded_gradient_equals_full_set_gradient(digits, model, n_workers, target, scheme, step):
    a = make_assignment(n_workers, target, scheme)
    blocks = block_indices(len(digits[1]), a.n_blocks, seed=SEED, min_size=BATCH)
    rows = {b: blk[block_batch(len(blk), BATCH, SEED, b, step)] for b, blk in enumerate(blocks)}
    # every holder computes its own copy; holders of one block must agree bit for bit
    copies = {(w, b): gradient(model, digits, rows[b]) for w in range(n_workers) for b in a.blocks_of(w)}
    for b in range(a.n_blocks):
        first = copies[(a.holders_of(b)[0], b)]
        assert all(np.array_equal(copies[(w, b)], first) for w in a.holders_of(b))
    full = gradient(model, digits, np.concatenate([rows[b] for b in range(a.n_blocks)]))
    weights = {b: len(r) for b, r in rows.items()}

    rng = random.Random(0)
    tracker = CompletionTracker(a)
    results = []
    for subset in itertools.combinations(range(n_workers), target):
        for events in arrival_orders(a, subset, rng):
            tracker.reset(step)
            for w, b in events:
                tracker.add(w, b)
                if tracker.complete():
                    break
            assert tracker.complete(), f"k-subset {subset} did not complete a sample set"
            assert set(tracker.used_workers()) <= set(subset)
            coded = combine_block_gradients({b: copies[(w, b)] for b, w in tracker.chosen().items()}, weights)
            np.testing.assert_allclose(coded, full, rtol=1e-5, atol=1e-6)
            results.append(coded)
    # fixed summation order: the result is the same bytes whatever arrived first
    assert all(r.tobytes() == results[0].tobytes() for r in results)


def test_weights_by_batch_size_give_the_full_data_gradient(digits, model):
    """Unequal blocks, each used whole: the weighted combination is the gradient of all 103 rows."""
    blocks = block_indices(103, 4)
    assert sorted({len(b) for b in blocks}) == [25, 26]
    grads = {b: gradient(model, digits, blk[block_batch(len(blk), 1000, 0, b, 0)]) for b, blk in enumerate(blocks)}
    coded = combine_block_gradients(grads, [len(b) for b in blocks])
    np.testing.assert_allclose(coded, gradient(model, digits, np.arange(103)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- assignments and the verifier


def test_schemes_shape():
    f = make_assignment(6, 4, "fractional")
    assert f.n_blocks == 2 and f.holders == ((0, 1, 2), (3, 4, 5)) and f.blocks_of(4) == (1,)
    c = make_assignment(5, 3, "cyclic")
    assert c.n_blocks == 5 and c.blocks_of(4) == (0, 1, 4) and c.holders_of(0) == (0, 3, 4)
    assert c.stragglers == 2
    for scheme in ("fractional", "cyclic"):  # uncoded: one block per worker
        plain = make_assignment(4, 4, scheme)
        assert plain.blocks == ((0,), (1,), (2,), (3,)) and verify_any_k(plain) == 1


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_k_workers_hold_a_complete_set(data):
    w = data.draw(st.integers(1, 12), label="W")
    k = data.draw(st.integers(1, w), label="k")
    scheme = data.draw(st.sampled_from(["fractional", "cyclic"]), label="scheme")
    if scheme == "fractional" and w % (w - k + 1):
        with pytest.raises(HpcfedError, match="cyclic"):
            make_assignment(w, k, scheme)
        return
    a = make_assignment(w, k, scheme)
    assert verify_any_k(a) == comb(w, k)
    assert all(len(a.holders_of(b)) == w - k + 1 for b in range(a.n_blocks))
    subset = data.draw(st.lists(st.integers(0, w - 1), min_size=k, max_size=k, unique=True), label="subset")
    assert set().union(*(a.blocks_of(i) for i in subset)) == set(range(a.n_blocks))


def test_verifier_rejects_a_broken_assignment():
    broken = Assignment(4, 3, "hand", ((0, 1), (1, 2), (2, 3), (3,)))  # block 3 has one holder, s = 1
    with pytest.raises(HpcfedError, match=r"miss block 3, held only by \[3\]"):
        verify_any_k(broken)


def test_verifier_above_the_exhaustive_limit():
    a = make_assignment(20, 15, "cyclic")
    assert verify_any_k(a, samples=300) == 300  # no adversarial subset exists: each block has s+1 holders
    holders = list(a.holders)
    holders[7] = (7,)  # under-replicated; the adversarial subset finds it even with no random samples
    with pytest.raises(HpcfedError, match="miss block 7"):
        verify_any_k(Assignment(20, 15, "hand", tuple(holders)), samples=0)


@pytest.mark.parametrize(
    "args,match",
    [
        ((3, 4, "cyclic"), r"coding.target=4: allowed 1..3"),
        ((3, 0, "cyclic"), r"coding.target=0: allowed 1..3"),
        ((4, 2, "mds"), r"coding.scheme='mds': allowed cyclic, fractional"),
        ((5, 3, "fractional"), r"= 3 to divide workers = 5; use scheme=cyclic"),
        ((0, 1, "cyclic"), r"0 workers"),
    ],
)
def test_assignment_errors(args, match):
    with pytest.raises(HpcfedError, match=match):
        make_assignment(*args)


def test_block_indices():
    blocks = block_indices(50, 4, seed=1)
    assert np.array_equal(np.sort(np.concatenate(blocks)), np.arange(50))
    assert [len(b) for b in blocks] == [13, 13, 12, 12]
    assert all(np.array_equal(x, y) for x, y in zip(blocks, block_indices(50, 4, seed=1)))
    assert np.array_equal(block_indices(10, 2)[1], np.arange(5, 10))  # no seed: order kept
    with pytest.raises(HpcfedError, match="30 samples is too small for 4 blocks of at least 8 samples"):
        block_indices(30, 4, min_size=8)


def test_block_batch_is_shared_and_samples_without_replacement():
    size, batch = 30, 7  # 4 batches per epoch, 2 tail samples skipped per epoch
    epoch0 = np.concatenate([block_batch(size, batch, 5, 2, t) for t in range(4)])
    assert len(np.unique(epoch0)) == 28 and epoch0.max() < size
    assert np.array_equal(block_batch(size, batch, 5, 2, 3), block_batch(size, batch, 5, 2, 3))
    assert not np.array_equal(block_batch(size, batch, 5, 2, 0), block_batch(size, batch, 5, 3, 0))
    assert not np.array_equal(block_batch(size, batch, 5, 2, 0), block_batch(size, batch, 5, 2, 4))
    assert len(block_batch(3, batch, 5, 2, 0)) == 3  # batch larger than the block: the whole block


def test_combine_is_independent_of_arrival_order():
    rng = np.random.default_rng(0)
    grads = {b: rng.standard_normal(1000).astype(np.float32) for b in range(5)}
    weights = [8, 8, 7, 8, 3]
    ref = combine_block_gradients(grads, weights)
    shuffled = dict(reversed(list(grads.items())))
    assert combine_block_gradients(shuffled, weights).tobytes() == ref.tobytes()
    expected = sum(w * grads[b].astype(np.float64) for b, w in enumerate(weights)) / sum(weights)
    np.testing.assert_allclose(ref, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the completion tracker


def test_tracker():
    a = make_assignment(4, 2, "cyclic")  # worker i holds i, i+1, i+2 (mod 4)
    t = CompletionTracker(a)
    t.reset(7)
    assert t.add(1, 2) and not t.add(2, 2) and not t.add(1, 2)  # second copy and repeat ignored
    assert t.chosen() == {2: 1} and not t.complete() and t.missing() == [0, 1, 3]
    assert t.add_worker(3) == [0, 1, 3]
    assert t.complete() and t.chosen() == {0: 3, 1: 3, 2: 1, 3: 3} and t.used_workers() == (1, 3)
    with pytest.raises(ValueError, match="worker 0 does not hold block 3"):
        t.add(0, 3)
    t.reset(8)
    assert t.step == 8 and t.chosen() == {} and not t.complete()
