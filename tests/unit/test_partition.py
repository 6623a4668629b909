"""Partitioners: every sample once, size guards, label mix, determinism, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from hpcfed.data.partition import dirichlet, iid, partition, quantity_skew, shards
from hpcfed.errors import HpcfedError

PROPS = settings(max_examples=40, deadline=None)


@st.composite
def labelled(draw, max_samples: int = 300) -> tuple[np.ndarray, int, int]:
    """(labels, n_parts, seed) with 1..10 classes."""
    n = draw(st.integers(4, max_samples))
    classes = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31))
    labels = np.random.default_rng(seed).integers(0, classes, size=n)
    return labels, draw(st.integers(1, min(20, n))), seed


def assert_exactly_once(parts: list[np.ndarray], n: int) -> None:
    assert all(np.array_equal(p, np.sort(p)) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each part's label mix and the global one."""
    classes = np.unique(labels)
    overall = np.array([np.mean(labels == c) for c in classes])
    return float(np.mean([0.5 * np.abs(np.array([np.mean(labels[p] == c) for c in classes]) - overall).sum() for p in parts]))


@PROPS
@given(labelled())
def test_iid(case):
    labels, n_parts, seed = case
    parts = iid(len(labels), n_parts, seed)
    assert_exactly_once(parts, len(labels))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert_same(parts, partition("iid", labels, n_parts, seed))


@PROPS
@given(labelled(), st.sampled_from([1e-4, 0.01, 0.3, 1.0, 100.0]), st.integers(1, 5))
def test_dirichlet(case, alpha, min_size):
    labels, n_parts, seed = case
    assume(len(labels) >= n_parts * min_size)
    parts = dirichlet(labels, n_parts, alpha, seed, min_size=min_size)
    assert_exactly_once(parts, len(labels))
    assert min(map(len, parts)) >= min_size
    assert_same(parts, partition("dirichlet", labels, n_parts, seed, alpha=alpha, min_size=min_size))


def test_dirichlet_tiny_alpha_with_a_large_minimum_terminates():
    labels = np.repeat([0, 1], 100)
    parts = dirichlet(labels, 40, 1e-4, seed=0, min_size=5)  # 40 x 5 = all 200 samples
    assert_exactly_once(parts, 200)
    assert all(len(p) == 5 for p in parts)


def test_dirichlet_label_mix_follows_alpha():
    labels = load_digits().target
    skewed = label_skew(labels, dirichlet(labels, 10, 0.01, seed=0))
    mild = label_skew(labels, dirichlet(labels, 10, 1000.0, seed=0))
    near_iid = label_skew(labels, iid(len(labels), 10, seed=0))
    assert skewed > 0.6, skewed
    assert mild < 0.1 and mild < 2 * near_iid + 0.02, (mild, near_iid)


@PROPS
@given(labelled(), st.integers(1, 4))
def test_shards(case, per_part):
    labels, n_parts, seed = case
    n_classes = len(np.unique(labels))
    try:
        parts = shards(labels, n_parts, per_part, seed)
    except HpcfedError as err:  # only the documented impossible requests
        assert per_part > n_classes or n_parts * per_part < n_classes or "empty" in str(err)
        return
    assert_exactly_once(parts, len(labels))
    assert all(len(np.unique(labels[p])) <= per_part for p in parts)
    assert_same(parts, partition("shards", labels, n_parts, seed, classes_per_part=per_part))


def test_shards_on_digits_have_exactly_the_classes_asked():
    labels = load_digits().target
    parts = shards(labels, 20, 2, seed=1)
    assert [len(np.unique(labels[p])) for p in parts] == [2] * 20
    assert sorted(set(np.concatenate([np.unique(labels[p]) for p in parts]))) == list(range(10))


@PROPS
@given(labelled(), st.sampled_from([0.05, 0.5, 5.0]), st.integers(1, 5))
def test_quantity_skew(case, alpha, min_size):
    labels, n_parts, seed = case
    assume(len(labels) >= n_parts * min_size)
    parts = quantity_skew(len(labels), n_parts, alpha, seed, min_size=min_size)
    assert_exactly_once(parts, len(labels))
    assert min(map(len, parts)) >= min_size
    assert_same(parts, partition("quantity", labels, n_parts, seed, alpha=alpha, min_size=min_size))


def test_quantity_skew_small_alpha_is_unequal():
    sizes = sorted(map(len, quantity_skew(1000, 10, 0.1, seed=0)))
    assert sizes[-1] > 5 * sizes[0] + 100


def test_seed_changes_the_split():
    labels = load_digits().target
    for scheme, params in [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("shards", {}), ("quantity", {"alpha": 1.0})]:
        a = partition(scheme, labels, 5, 0, **params)
        assert_same(a, partition(scheme, labels, 5, 0, **params))
        assert not all(np.array_equal(x, y) for x, y in zip(a, partition(scheme, labels, 5, 1, **params)))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda y: partition("pathological", y, 2, 0), r"data.partition='pathological': allowed iid, dirichlet, shards, quantity"),
        (lambda y: partition("iid", y, 2, 0, alpha=0.5), r"unknown parameter 'alpha' \(allowed: none\)"),
        (lambda y: partition("iid", y, 11, 0), r"10 samples cannot fill 11 parts"),
        (lambda y: partition("iid", y, 0, 0), r"n_parts=0"),
        (lambda y: partition("dirichlet", y, 4, 0, min_size=3), r"10 samples cannot fill 4 parts of at least 3"),
        (lambda y: partition("dirichlet", y, 2, 0, alpha=0.0), r"alpha=0.0; need alpha > 0"),
        (lambda y: partition("shards", y, 2, 0, classes_per_part=3), r"classes_per_part=3; allowed 1..2"),
        (lambda y: partition("shards", np.arange(10) % 5, 2, 0, classes_per_part=2), r"raise classes_per_part to 3"),
    ],
)
def test_errors_are_one_line(call, match):
    with pytest.raises(HpcfedError, match=match) as err:
        call(np.arange(10) % 2)
    assert "\n" not in str(err.value)
