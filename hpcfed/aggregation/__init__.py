"""Aggregation at rank 0: static weights (uniform, samples), actor-critic weights, robust reference rules."""

from hpcfed.aggregation.actor_critic import ActorCriticSettings, ActorCriticWeighter, node_features
from hpcfed.aggregation.robust import coordinate_median, trimmed_mean
from hpcfed.aggregation.weights import STATIC, aggregate, sample_weights, static_weights, uniform_weights

__all__ = ["ActorCriticSettings", "ActorCriticWeighter", "STATIC", "aggregate", "coordinate_median",
           "node_features", "sample_weights", "static_weights", "trimmed_mean", "uniform_weights"]
