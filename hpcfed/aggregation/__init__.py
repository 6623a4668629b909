"""Aggregation at rank 0: static weights (uniform, samples), robust rules (median, trimmed mean,
FLTrust) and actor-critic weights, behind :class:`Combiner`. Imports neither torch nor MPI."""

from hpcfed.aggregation.actor_critic import ActorCriticSettings, ActorCriticWeighter, node_features
from hpcfed.aggregation.combiner import REFERENCE_RULES, Combiner
from hpcfed.aggregation.geometry import cosines, inner_products
from hpcfed.aggregation.robust import coordinate_median, fltrust, trimmed_mean
from hpcfed.aggregation.weights import STATIC, aggregate, sample_weights, static_weights, uniform_weights

__all__ = ["ActorCriticSettings", "ActorCriticWeighter", "Combiner", "REFERENCE_RULES", "STATIC", "aggregate",
           "coordinate_median", "cosines", "fltrust", "inner_products", "node_features", "sample_weights",
           "static_weights", "trimmed_mean", "uniform_weights"]
