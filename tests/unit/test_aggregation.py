"""Aggregation: static weights, weighted sum, robust rules, actor-critic weighter (no MPI, no torch)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hpcfed.aggregation import (ActorCriticSettings, ActorCriticWeighter, aggregate, coordinate_median,
                                inner_products, node_features, sample_weights, static_weights, trimmed_mean,
                                uniform_weights)
from hpcfed.errors import HpcfedError

FAST = ActorCriticSettings(warmup=2, patience=5, fallback_rounds=3)


def _updates(seed: int, n: int, size: int = 64, scale_exp: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, size)) * 10.0 ** scale_exp).astype(np.float32)


def _drive(weighter: ActorCriticWeighter, rounds: int, seed: int, n: int = 5,
           reference: bool = False) -> list[np.ndarray]:
    """Rounds of weights + a reward that punishes weight on node 0 (a sign-flipped node); the
    reference (when given) is the true direction plus noise, else the median stands in."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rounds):
        updates = rng.standard_normal((n, 32)).astype(np.float32) + 1.0
        updates[0] *= -5
        ref = (rng.standard_normal(32) + 1.0).astype(np.float32) if reference else None
        probs = weighter.weights(range(n), updates, ref)
        weighter.reward(float(-probs[0] + 0.01 * rng.standard_normal()))
        out.append(probs)
    return out


# --- static weights and the weighted sum -------------------------------------------------------

def test_static_weights() -> None:
    assert np.allclose(uniform_weights(4), 0.25)
    assert np.allclose(sample_weights([1, 3]), [0.25, 0.75])
    assert np.allclose(static_weights("samples", [2, 2, 4]), [0.25, 0.25, 0.5])
    assert np.allclose(static_weights("uniform", [5, 1]), [0.5, 0.5])
    with pytest.raises(HpcfedError, match="aggregation.weighting"):
        static_weights("median", [1])
    with pytest.raises(HpcfedError, match="sample counts"):
        sample_weights([0, 0])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), size=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_aggregate_matches_weighted_sum_and_is_row_ordered(n, size, seed) -> None:
    updates = _updates(seed, n, size)
    w = np.random.default_rng(seed + 1).dirichlet(np.ones(n))
    out = aggregate(updates, w)
    assert out.dtype == np.float32 and out.shape == (size,)
    expected = np.zeros(size, np.float32)
    for row, weight in zip(updates, w.astype(np.float32)):
        expected += row * weight
    assert np.array_equal(out, expected)
    assert np.array_equal(aggregate(list(updates), w), out)
    assert np.allclose(out, w @ updates.astype(np.float64), atol=1e-5)


def test_aggregate_rejects_mismatched_weights() -> None:
    with pytest.raises(HpcfedError, match="one weight per update"):
        aggregate(_updates(0, 3), [0.5, 0.5])


# --- robust rules ------------------------------------------------------------------------------

def test_robust_rules_on_known_inputs() -> None:
    u = np.array([[1, 10], [2, -20], [3, 30], [100, 40], [-100, 50]], dtype=np.float32)
    assert np.array_equal(coordinate_median(u), [2, 30])
    assert np.array_equal(coordinate_median(u[:4]), [2.5, 20])
    assert np.allclose(trimmed_mean(u, 1), [2, 80 / 3])
    assert np.array_equal(trimmed_mean(u, 0), u.mean(0))
    with pytest.raises(HpcfedError, match="trim=3"):
        trimmed_mean(u, 3)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_median_matches_numpy(n, seed) -> None:
    u = _updates(seed, n, 50)
    assert np.array_equal(coordinate_median(u), np.median(u, axis=0).astype(np.float32))
    assert np.array_equal(coordinate_median(list(u)), coordinate_median(u))


# --- actor-critic ------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 8), scale_exp=st.integers(-30, 37),
       zero_rows=st.integers(0, 8), huge=st.booleans(), reward_exp=st.integers(-12, 6))
def test_probabilities_sum_to_one_and_stay_finite(seed, n, scale_exp, zero_rows, huge, reward_exp) -> None:
    weighter = ActorCriticWeighter(8, FAST, seed)
    rng = np.random.default_rng(seed)
    for round_ in range(6):
        updates = _updates(seed + round_, n, 40, scale_exp)
        updates[:zero_rows] = 0.0
        if huge:
            updates[-1] = np.finfo(np.float32).max * rng.choice([-1, 1], size=40)
        nodes = rng.choice(8, size=n, replace=False)
        reference = None if round_ % 2 else _updates(seed + 99, 1, 40, scale_exp)[0]
        probs = weighter.weights(nodes, updates, reference)
        assert probs.shape == (n,) and np.all(np.isfinite(probs)) and np.all(probs >= 0)
        assert abs(probs.sum() - 1) < 1e-12
        sq, dots, ref_sq = inner_products(updates, updates[0] if reference is None else reference)
        feats = node_features(sq, dots, ref_sq, rng.uniform(-1, 1, n), np.ones(n))
        assert np.all(np.isfinite(feats)) and np.all(np.isfinite(sq)) and np.all(np.isfinite(dots))
        weighter.reward(float(rng.standard_normal() * 10.0 ** reward_exp))


def test_varying_number_of_nodes() -> None:
    weighter = ActorCriticWeighter(10, FAST, 3)
    for round_, nodes in enumerate([[0, 1, 2], [4, 5, 6, 7, 8, 9], [1], [9, 0], list(range(10))]):
        probs = weighter.weights(nodes, _updates(round_, len(nodes)))
        assert probs.shape == (len(nodes),) and abs(probs.sum() - 1) < 1e-12
        last = weighter.probabilities()
        assert np.array_equal(last[nodes], probs) and np.isnan(np.delete(last, nodes)).all()
        weighter.reward(0.1)


@pytest.mark.parametrize("reference", [False, True])
def test_same_seed_same_probabilities_other_seed_differs(reference) -> None:
    runs = [_drive(ActorCriticWeighter(5, FAST, seed), 15, 0, reference=reference) for seed in (7, 7, 8)]
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not np.array_equal(runs[0][-1], runs[2][-1])


def test_no_global_rng_is_touched() -> None:
    np.random.seed(0)
    expected = np.random.rand(3)
    np.random.seed(0)
    _drive(ActorCriticWeighter(5, FAST, 1), 5, 0, reference=True)
    assert np.array_equal(np.random.rand(3), expected)


@pytest.mark.parametrize("update_every", [1, 3])
def test_state_dict_round_trip_continues_identically(update_every) -> None:
    s = ActorCriticSettings(warmup=2, update_every=update_every)
    original = ActorCriticWeighter(5, s, 11)
    _drive(original, 7, 1, reference=True)
    rng = np.random.default_rng(5)
    original.weights(range(5), rng.standard_normal((5, 32)).astype(np.float32))  # a round awaiting its reward
    state = original.state_dict()
    assert all(isinstance(v, (np.ndarray, int, float)) for v in state.values())
    restored = ActorCriticWeighter(5, s, 999)
    restored.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()})
    for weighter in (original, restored):
        weighter.reward(0.5)
    assert all(np.array_equal(a, b) for a, b in zip(_drive(original, 8, 2, reference=True),
                                                    _drive(restored, 8, 2, reference=True)))
    assert all(np.array_equal(original.state_dict()[k], restored.state_dict()[k]) for k in state)
    with pytest.raises(HpcfedError, match="checkpoint is for 5 nodes"):
        ActorCriticWeighter(4, s, 0).load_state_dict(state)


def test_starts_uniform_without_prior_and_learns_from_the_reward() -> None:
    weighter = ActorCriticWeighter(5, ActorCriticSettings(warmup=5, prior=0.0, lr=0.02, sigma=0.5, entropy=0.01), 0)
    probs = _drive(weighter, 200, 0)
    assert abs(np.mean([p[0] for p in probs[:5]]) - 0.2) < 0.1
    assert np.mean([p[0] for p in probs[-50:]]) < 0.5 / 5


@pytest.mark.parametrize("reference", [False, True])
def test_prior_down_weights_a_node_that_disagrees_from_round_one(reference) -> None:
    updates = np.tile(np.linspace(1, 2, 32, dtype=np.float32), (5, 1))
    updates[0] = -updates[0]
    ref = np.ones(32, np.float32) if reference else None   # None: the median stands in
    first = np.mean([ActorCriticWeighter(5, ActorCriticSettings(), seed).weights(range(5), updates, ref)[0]
                     for seed in range(20)])
    assert first < 0.5 / 5


def test_guard_falls_back_on_a_collapsed_policy() -> None:
    s = ActorCriticSettings(collapse_threshold=0.6, patience=4, fallback_rounds=3, warmup=0)
    weighter = ActorCriticWeighter(3, s, 0)
    params = weighter._nets.views(weighter._params)   # a policy that puts nearly all weight on the largest node
    params["actor_w1"][...] = 0.0
    params["actor_w1"][:, 3] = 1.0                     # feature 3: log norm over the median norm
    params["actor_w2"][...] = 10.0
    updates = np.array([[1.0, 0], [2.0, 0], [4.0, 0]], dtype=np.float32)
    for round_ in range(4):
        assert not weighter.in_fallback
        assert weighter.weights(range(3), updates).max() > 0.6
        weighter.reward(-1.0)                          # the loss gets worse every round
    assert weighter.in_fallback and weighter.fallbacks == 1
    for _ in range(3):
        assert np.array_equal(weighter.weights(range(3), updates), np.full(3, 1 / 3))
        weighter.reward(-1.0)
    assert not weighter.in_fallback                    # the policy acts again, from fresh networks
    assert not np.array_equal(weighter.weights(range(3), updates), np.full(3, 1 / 3))


def test_guard_falls_back_on_useless_rewards() -> None:
    weighter = ActorCriticWeighter(4, FAST, 0)
    weighter.weights(range(4), _updates(0, 4))
    weighter.reward(float("nan"))
    assert weighter.in_fallback and weighter.fallbacks == 1
    flat = ActorCriticWeighter(4, FAST, 0)
    for round_ in range(FAST.patience + 1):
        flat.weights(range(4), _updates(round_, 4))
        flat.reward(0.25)
    assert flat.in_fallback


def test_bad_inputs_name_the_problem() -> None:
    weighter = ActorCriticWeighter(4, FAST, 0)
    with pytest.raises(HpcfedError, match="distinct ids"):
        weighter.weights([0, 0], _updates(0, 2))
    with pytest.raises(HpcfedError, match="one row per node"):
        weighter.weights([0, 1], _updates(0, 3))
    with pytest.raises(HpcfedError, match="reference of shape"):
        weighter.weights([0, 1], _updates(0, 2), np.zeros(3, np.float32))
    with pytest.raises(HpcfedError, match="without a weights"):
        weighter.reward(1.0)
    with pytest.raises(HpcfedError, match="actor_critic.lr"):
        ActorCriticSettings(lr=0)
    with pytest.raises(HpcfedError, match="actor_critic.trust_decay"):
        ActorCriticSettings(trust_decay=1.0)
    with pytest.raises(HpcfedError, match="networks of another shape"):
        ActorCriticWeighter(4, ActorCriticSettings(hidden=8), 0).load_state_dict(weighter.state_dict())
    with pytest.raises(HpcfedError, match="an older format"):
        weighter.load_state_dict({"n_nodes": 4, "net.actor_w1": np.zeros((32, 8))})   # the torch-era layout

