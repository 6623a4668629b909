"""Rank 0's aggregation rule, chosen by ``aggregation.weighting``.

``samples``/``uniform`` weight each update by its sample count or equally (the exact coded
combination when the updates are block gradients). ``median`` and ``trimmed_mean`` are
coordinate-wise robust reference rules (no weights), coordinate-wise in whatever domain the
updates come in: the codec's coefficient domain at compressed steps. ``fltrust`` (Cao et al.
2021) trusts each update by its positive cosine to rank 0's own update (``reference``) and
rescales it to the reference's norm. ``actor_critic`` asks :class:`ActorCriticWeighter` for this
round's probabilities (features from cosines and norms against the reference) and learns from
the validation-loss improvement fed back by :meth:`Combiner.feedback`.

The updates are 1-D fp32 vectors of one length, numpy or cupy; the rules that read the
reference only need inner products, so they mean the same in the coefficient domain (an
orthonormal transform on a shared support) as on the decoded gradients.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from hpcfed.aggregation.actor_critic import ActorCriticWeighter
from hpcfed.aggregation.robust import coordinate_median, fltrust, trimmed_mean
from hpcfed.aggregation.weights import aggregate
from hpcfed.coding import combine_block_gradients
from hpcfed.errors import HpcfedError

REFERENCE_RULES = ("fltrust", "actor_critic")


class Combiner:
    """Combine the updates of one step or round; ``Combiner(cfg.aggregation, n_nodes, seed)``."""

    def __init__(self, cfg: Any, n_nodes: int, seed: int) -> None:
        self.cfg = cfg
        self.learner = ActorCriticWeighter(n_nodes, cfg.actor_critic, seed) if cfg.weighting == "actor_critic" else None

    @property
    def wants_reference(self) -> bool:
        """Whether :meth:`combine` needs rank 0's own update (``reference``): fltrust, actor_critic."""
        return self.cfg.weighting in REFERENCE_RULES

    @property
    def learns(self) -> bool:
        """Whether :meth:`feedback` must be called after each combine (actor-critic)."""
        return self.learner is not None

    def combine(self, nodes: Sequence[int], updates: Sequence[Any], counts: Sequence[int],
                reference: Any = None) -> tuple[Any, np.ndarray]:
        """(aggregate, weights per update; NaN for rules without weights).

        ``updates``: 1-D fp32 vectors of one length (numpy or cupy); ``reference``: rank 0's update on
        its validation set in the same domain (needed when :attr:`wants_reference`; the actor-critic
        falls back on the coordinate-wise median without it). ``nodes`` must be distinct for
        actor_critic; for the other rules they may repeat (one holder, several blocks).
        """
        rule = self.cfg.weighting
        if rule in ("samples", "uniform"):
            weights = np.asarray(counts, dtype=np.float64) if rule == "samples" else np.ones(len(updates))
            keyed = dict(enumerate(updates))
            return combine_block_gradients(keyed, weights), weights / weights.sum()
        if rule == "median":
            return coordinate_median(updates), np.full(len(updates), np.nan)
        if rule == "trimmed_mean":
            return trimmed_mean(updates, self.cfg.trim), np.full(len(updates), np.nan)
        if rule == "fltrust":
            if reference is None:
                raise HpcfedError("aggregation.weighting 'fltrust': combine() needs rank 0's reference update")
            return fltrust(updates, reference)
        weights = self.learner.weights(list(nodes), updates, reference)
        return aggregate(updates, weights), weights

    def feedback(self, reward: float) -> None:
        """Actor-critic: the validation-loss improvement the last aggregate brought (once per combine)."""
        if self.learner is not None:
            self.learner.reward(reward)

    def state_dict(self) -> dict[str, np.ndarray | int | float]:
        return {} if self.learner is None else self.learner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.learner is not None:
            self.learner.load_state_dict(state)
