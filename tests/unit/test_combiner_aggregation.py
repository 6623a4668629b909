"""Combiner API, FLTrust, inner products and the reference-driven actor-critic (numpy; no torch, no MPI)."""

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from hpcfed.aggregation import (ActorCriticSettings, Combiner, REFERENCE_RULES, coordinate_median, fltrust,
                                inner_products, trimmed_mean)
from hpcfed.coding import combine_block_gradients
from hpcfed.errors import HpcfedError

RULES = ("samples", "uniform", "median", "trimmed_mean", "fltrust", "actor_critic")


def _cfg(rule: str, **settings: float) -> SimpleNamespace:
    return SimpleNamespace(weighting=rule, trim=1, actor_critic=ActorCriticSettings(**settings))


def _problem(seed: int, n: int = 6, size: int = 500, faulty: int = 2, fault: str = "scale"):
    """Honest updates = truth + noise; the last ``faulty`` are scaled by -5, pure noise, or share a wrong direction."""
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(size)
    updates = [truth + 1.5 * rng.standard_normal(size) for _ in range(n)]
    wrong = rng.standard_normal(size)
    for i in range(n - faulty, n):
        if fault == "scale":
            updates[i] = -5.0 * updates[i]
        elif fault == "noise":
            noise = rng.standard_normal(size)
            updates[i] = noise * np.linalg.norm(updates[i]) / np.linalg.norm(noise)
        else:   # "label": a consistent wrong direction plus noise
            updates[i] = wrong + 1.5 * rng.standard_normal(size)
    reference = truth + 0.7 * rng.standard_normal(size)
    return [u.astype(np.float32) for u in updates], reference.astype(np.float32), truth


def test_import_needs_neither_torch_nor_mpi() -> None:
    code = ("import sys; import hpcfed.aggregation, hpcfed.aggregation.combiner; "
            "bad = [m for m in ('torch', 'mpi4py') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_inner_products_match_float64_and_survive_overflow() -> None:
    updates, reference, _ = _problem(0)
    sq, dots, ref_sq = inner_products(updates, reference)
    u64, r64 = np.stack(updates).astype(np.float64), reference.astype(np.float64)
    assert np.allclose(sq, (u64 * u64).sum(1), rtol=1e-5) and np.allclose(dots, u64 @ r64, rtol=1e-4, atol=1e-3)
    assert np.isclose(ref_sq, r64 @ r64, rtol=1e-5)
    huge = [np.full(10, np.finfo(np.float32).max, np.float32), np.array([np.nan] + [1.0] * 9, np.float32)]
    sq, dots, ref_sq = inner_products(huge, np.ones(10, np.float32))
    assert np.isfinite(sq).all() and np.isfinite(dots).all() and np.isfinite(ref_sq)
    assert np.isclose(dots[0] / np.sqrt(sq[0] * ref_sq), 1.0) and np.isclose(sq[1], 9.0)


# --- FLTrust -----------------------------------------------------------------------------------

def test_fltrust_math() -> None:
    rng = np.random.default_rng(1)
    reference = rng.standard_normal(50).astype(np.float32)
    good = reference + 0.5 * rng.standard_normal(50).astype(np.float32)
    updates = [good, 100.0 * good, -good]                      # same direction at 100x, and a flipped one
    out, weights = fltrust(updates, reference)
    assert weights[2] == 0.0 and np.isclose(weights[0], weights[1]) and np.isclose(weights.sum(), 1.0)
    scaled = good * (np.linalg.norm(reference) / np.linalg.norm(good))   # magnitudes normalised to ||r||
    assert np.allclose(out, scaled, rtol=1e-5, atol=1e-6)
    cos = float(good @ reference / np.linalg.norm(good) / np.linalg.norm(reference))
    other = rng.standard_normal(50).astype(np.float32)
    cos2 = max(float(other @ reference / np.linalg.norm(other) / np.linalg.norm(reference)), 0.0)
    out, weights = fltrust([good, other], reference)
    expected = (cos * scaled + cos2 * other * np.linalg.norm(reference) / np.linalg.norm(other)) / (cos + cos2)
    assert np.allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert np.allclose(weights, np.array([cos, cos2]) / (cos + cos2))


def test_fltrust_without_trust_returns_the_reference() -> None:
    reference = np.arange(1, 6, dtype=np.float32)
    out, weights = fltrust([-reference, np.zeros(5, np.float32)], reference)
    assert np.array_equal(out, reference) and out is not reference and np.array_equal(weights, [0.0, 0.0])
    out, weights = fltrust([reference], np.zeros(5, np.float32))
    assert np.array_equal(out, np.zeros(5)) and np.array_equal(weights, [0.0])


# --- the Combiner API --------------------------------------------------------------------------

@pytest.mark.parametrize("rule", RULES)
def test_combine_with_reference_in_numpy(rule: str) -> None:
    combiner = Combiner(_cfg(rule), 6, 0)
    assert combiner.wants_reference == (rule in REFERENCE_RULES) and combiner.learns == (rule == "actor_critic")
    updates, reference, _ = _problem(2)
    counts = [3, 1, 2, 2, 1, 1]
    out, weights = combiner.combine(range(6), updates, counts, reference if combiner.wants_reference else None)
    assert out.dtype == np.float32 and out.shape == updates[0].shape and weights.shape == (6,)
    if rule in ("samples", "uniform"):   # values exactly as before the reference existed
        w = np.asarray(counts, np.float64) if rule == "samples" else np.ones(6)
        assert np.array_equal(out, combine_block_gradients(dict(enumerate(updates)), w))
        assert np.allclose(weights, w / w.sum())
    elif rule == "median":
        assert np.array_equal(out, coordinate_median(updates)) and np.isnan(weights).all()
    elif rule == "trimmed_mean":
        assert np.array_equal(out, trimmed_mean(updates, 1)) and np.isnan(weights).all()
    else:
        assert np.isclose(weights.sum(), 1.0) and weights[4:].max() < 1 / 12
        if rule == "fltrust":
            assert np.array_equal(out, fltrust(updates, reference)[0])
    combiner.feedback(0.1)          # a no-op for rules that do not learn
    assert isinstance(combiner.state_dict(), dict)


def test_fltrust_needs_its_reference() -> None:
    updates, _, _ = _problem(0)
    with pytest.raises(HpcfedError, match="fltrust"):
        Combiner(_cfg("fltrust"), 6, 0).combine(range(6), updates, [1] * 6)


def _run(combiner: Combiner, rounds: int, seed: int, fault: str = "scale") -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Rounds of combine + feedback; the reward is the drop of the distance to the truth."""
    outs, weights = [], []
    for round_ in range(rounds):
        updates, reference, truth = _problem(1000 * seed + round_, fault=fault)
        out, w = combiner.combine(range(6), updates, [1] * 6, reference)
        combiner.feedback(float(np.linalg.norm(truth) - np.linalg.norm(truth - out)))
        outs.append(out)
        weights.append(w)
    return outs, weights


def test_actor_critic_is_deterministic_and_round_trips_bit_identically() -> None:
    cfg = _cfg("actor_critic", warmup=2)
    first, second = Combiner(cfg, 6, 5), Combiner(cfg, 6, 5)
    a, b = _run(first, 12, 0), _run(second, 12, 0)
    assert all(np.array_equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    other = _run(Combiner(cfg, 6, 6), 12, 0)
    assert not np.array_equal(other[1][-1], a[1][-1])
    state = first.state_dict()
    assert all(isinstance(v, (np.ndarray, int, float)) for v in state.values())
    restored = Combiner(cfg, 6, 123)
    restored.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()})
    a, b = _run(first, 15, 1), _run(restored, 15, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


@pytest.mark.parametrize("fault", ["scale", "noise", "label"])
def test_actor_critic_gives_faulty_nodes_low_weight(fault: str) -> None:
    _, weights = _run(Combiner(_cfg("actor_critic"), 6, 0), 60, 3, fault)
    late = np.array(weights[20:])
    assert late[:, 4:].mean() < 1 / 12               # half of uniform, after a warm-up
    assert late[:, :4].mean() > 0.2                  # the honest ones share the rest


def test_fallback_keeps_the_informed_prior() -> None:
    combiner = Combiner(_cfg("actor_critic", fallback_rounds=5), 6, 0)
    updates, reference, _ = _problem(7)
    combiner.combine(range(6), updates, [1] * 6, reference)
    combiner.feedback(float("nan"))                       # a useless reward: the guard falls back at once
    assert combiner.learner.in_fallback
    first, w1 = combiner.combine(range(6), updates, [1] * 6, reference)
    second, w2 = combiner.combine(range(6), updates, [1] * 6, reference)   # no noise: the same weights
    assert np.array_equal(w1, w2) and w1[4:].max() < 0.01 and np.allclose(w1[:4], 0.25, atol=0.02)
