"""Partitioners: split sample indices over workers or clients, deterministically by seed."""

from __future__ import annotations

import numpy as np


def iid(n_samples: int, n_parts: int, seed: int) -> list[np.ndarray]:
    """Shuffle all indices once and deal them into ``n_parts`` near-equal parts."""
    order = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(part) for part in np.array_split(order, n_parts)]
