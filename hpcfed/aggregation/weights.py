"""Static weighting strategies and the weighted aggregate of node updates.

``uniform`` gives every present node the same weight; ``samples`` weights nodes by
how many samples their update was computed on (FedAvg's rule). The actor-critic
weighting lives in :mod:`hpcfed.aggregation.actor_critic` and returns weights of
the same form, which :func:`aggregate` combines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hpcfed.errors import HpcfedError
from hpcfed.xp import array_module

STATIC = ("uniform", "samples")


def uniform_weights(n: int) -> np.ndarray:
    """Equal weights over ``n`` nodes (float64, sum 1)."""
    if n < 1:
        raise HpcfedError(f"aggregation: cannot weight {n} nodes; need at least 1")
    return np.full(n, 1.0 / n)


def sample_weights(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Weights proportional to each node's sample count (float64, sum 1)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or not counts.sum() > 0:
        raise HpcfedError(f"aggregation: sample counts {counts.tolist()} must be non-negative with a positive sum")
    return counts / counts.sum()


def static_weights(strategy: str, counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Weights of a static strategy ('uniform' or 'samples') for nodes holding ``counts`` samples."""
    if strategy == "uniform":
        return uniform_weights(len(counts))
    if strategy == "samples":
        return sample_weights(counts)
    raise HpcfedError(f"aggregation.weighting: '{strategy}' is not a static strategy (allowed: {', '.join(STATIC)})")


def aggregate(updates: Any, weights: Sequence[float] | np.ndarray) -> Any:
    """sum_i weights[i] * updates[i], accumulated in row order (bit-reproducible).

    ``updates`` is an (n, P) array or a list of n 1-D arrays of length P (numpy or cupy);
    the result has the updates' dtype and array module.
    """
    rows = list(updates)
    weights = np.asarray(weights, dtype=np.float64)
    if len(rows) == 0 or weights.shape != (len(rows),):
        raise HpcfedError(f"aggregation: {weights.size} weights for {len(rows)} updates; need one weight per update")
    xp = array_module(rows[0])
    size, dtype = rows[0].shape, rows[0].dtype
    if any(row.shape != size or row.ndim != 1 for row in rows):
        raise HpcfedError(f"aggregation: updates must be 1-D of equal length (got shapes {[r.shape for r in rows]})")
    out = xp.zeros(size, dtype=dtype)
    scratch = xp.empty(size, dtype=dtype)
    for row, weight in zip(rows, weights.astype(dtype)):
        xp.multiply(row, weight, out=scratch)
        out += scratch
    return out
