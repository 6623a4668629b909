"""Rank 0's aggregation rule, chosen by ``aggregation.weighting``.

``samples``/``uniform`` weight each update by its sample count or equally (the exact coded
combination when the updates are block gradients); ``actor_critic`` asks
:class:`ActorCriticWeighter` for this round's probabilities and learns from the validation-loss
improvement fed back by :meth:`Combiner.feedback`; ``median`` and ``trimmed_mean`` are robust
reference rules (no weights).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hpcfed.aggregation.actor_critic import ActorCriticWeighter
from hpcfed.aggregation.robust import coordinate_median, trimmed_mean
from hpcfed.aggregation.weights import aggregate
from hpcfed.coding import combine_block_gradients
from hpcfed.xp import to_numpy


class Combiner:
    """Combine the updates of one step or round; remembers the last weights for traces."""

    def __init__(self, cfg, n_nodes: int, seed: int) -> None:
        self.cfg = cfg
        self.learner = ActorCriticWeighter(n_nodes, cfg.actor_critic, seed) if cfg.weighting == "actor_critic" else None

    @property
    def learns(self) -> bool:
        """Whether :meth:`feedback` must be called after each update (actor-critic)."""
        return self.learner is not None

    def combine(self, nodes: Sequence[int], updates: Sequence[np.ndarray], counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(aggregate, weights per node; NaN for rules without weights). ``nodes`` must be distinct for
        the node-level rules; for static weights they may repeat (one holder, several blocks)."""
        rule = self.cfg.weighting
        if rule in ("samples", "uniform"):
            weights = np.asarray(counts, dtype=np.float64) if rule == "samples" else np.ones(len(updates))
            keyed = dict(enumerate(updates))
            return combine_block_gradients(keyed, weights), weights / weights.sum()
        if rule == "median":
            return coordinate_median(updates), np.full(len(updates), np.nan)
        if rule == "trimmed_mean":
            return trimmed_mean(updates, self.cfg.trim), np.full(len(updates), np.nan)
        weights = self.learner.weights(list(nodes), np.stack([to_numpy(u) for u in updates]))   # features on the host
        return aggregate(updates, weights), weights

    def feedback(self, reward: float) -> None:
        """Actor-critic: the validation-loss improvement the last aggregate brought."""
        self.learner.reward(reward)

    def state_dict(self) -> dict:
        return {} if self.learner is None else self.learner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.learner is not None:
            self.learner.load_state_dict(state)
