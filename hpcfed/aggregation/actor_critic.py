"""Actor-critic weighting of node updates at rank 0 (advantage actor-critic, trained online; numpy only).

Each round the weighter turns the updates of the nodes present into one probability per
node; the caller aggregates with them, applies the step, and reports the validation-loss
improvement as the reward (one reward per round, before the next round).

Reference: rank 0's own update on its validation set, in the same domain as the nodes' updates
(at compressed steps the codec's coefficient domain, where inner products are those of the
decoded gradients). Without one, the coordinate-wise median of the updates stands in (one sort
over all coordinates: slower, and blind to a faulty minority that agrees with itself).

State of a node, from 2W + 1 dot products (no pass over the coordinates beyond them):
  relative previous probability (p_prev * n_prev; 1 = uniform; 1 for a node new this round);
  trust: the node's running mean cosine to the reference (decay ``trust_decay``, per node id)
    over half the median of the present nodes' running means, clipped to [-1, 1] (1: agrees at
    least half as well as the typical node; <= 0: no better than noise, or opposed);
  this round's cosine to the reference;
  log of its norm over the median norm and over the reference's norm (both clipped).
Actor: one small network shared by all nodes scores each node from its own features and the
  mean features of the present set, so any number of nodes works; a linear term on the node's
  own features is added, its trust weight starting at ``prior`` (an informed initial policy:
  from round one a node with trust <= 0 gets about e^-prior of a trusted node's weight; 0 starts
  uniform, and the reward can unlearn it either way).
Action: a logistic-normal draw, logits z_i ~ N(score_i, sigma^2) (sigma learned, bounded),
  probabilities = softmax of z over the present nodes; the sampled probabilities are the weights.
Critic: a small network on set-level summaries (mean and std of the node features) predicts
  the normalised reward; it is the baseline of the advantage A = r - V(s). The reward is the
  immediate effect of this round's aggregate, so the target is r itself (no bootstrapping).
Objective per update (every ``update_every`` rewards, on the rewards since the last one):
  -A * log pi(z | s)  -  entropy * H(pi)  +  (V(s) - r)^2 / 2, Adam; during the first
  ``warmup`` rewards only the critic learns. Gradients are written out by hand (two tanh layers).
Rewards are divided by their running RMS (and clipped), since loss improvements shrink by
orders of magnitude over training.

Guard (falls back to the informed prior alone, softmax(prior * trust) without noise, uniform
when ``prior`` is 0, for ``fallback_rounds`` rounds, then restarts learning from freshly
initialised networks; ``fallbacks`` counts how often):
  - a non-finite reward: at once (the reward is useless and is not learned from);
  - a flat reward (equal to the previous one within ``flat_tolerance``) for ``patience`` rounds;
  - a collapsed policy: the largest probability above ``collapse_threshold`` for ``patience``
    rounds in a row while the running mean reward is not positive (the loss is not improving).

Determinism: initial weights and exploration noise come from numpy generators keyed by
(seed, purpose, counter) (:mod:`hpcfed.seeding`); no global RNG is touched. ``state_dict`` holds
arrays and scalars only, and a restored weighter continues bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from hpcfed.aggregation.geometry import as_rows, cosines, inner_products
from hpcfed.aggregation.robust import coordinate_median
from hpcfed.errors import HpcfedError
from hpcfed.seeding import rng

N_FEATURES = 5          # relative previous probability, trust, cosine, log norm / median, log norm / reference
TRUST = 1               # index of the trust feature (the informed prior's)
LOG_RATIO_CLIP = 4.0    # |log norm ratio| beyond this carries no more information
PREV_CLIP = 4.0         # relative previous probability is clipped to [0, PREV_CLIP]
REWARD_CLIP = 5.0       # normalised rewards are clipped to [-REWARD_CLIP, REWARD_CLIP]
TRUST_SCALE = 0.5       # a running cosine of half the median's (or more) earns full trust
TRUST_FLOOR = 1e-3      # the trust scale is at least this (an uninformative reference)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ActorCriticSettings:
    """Hyper-parameters of :class:`ActorCriticWeighter` (defaults tuned on the MNIST-1D simulation)."""

    lr: float = 0.002                 # actor learning rate (Adam; larger lets the policy drift on a noisy reward)
    critic_lr: float = 0.02           # critic learning rate (Adam)
    entropy: float = 0.0              # weight of the entropy bonus (per node)
    hidden: int = 32                  # hidden units of the actor and the critic
    update_every: int = 1             # one gradient step every this many rewards
    warmup: int = 10                  # first rewards on which only the critic learns
    sigma: float = 0.2                # initial std of the logit noise (exploration)
    prior: float = 5.0                # initial weight of the trust feature in the actor's linear term (0: uniform)
    trust_decay: float = 0.9          # running mean of each node's cosine to the reference (0: this round only)
    min_sigma: float = 0.05
    max_sigma: float = 2.0
    reward_decay: float = 0.95        # running RMS / mean of the reward
    collapse_threshold: float = 0.95  # max probability counted as collapsed
    patience: int = 30                # rounds of collapse (or flat reward) before falling back
    flat_tolerance: float = 1e-12     # |r - r_prev| at most this counts as flat
    fallback_rounds: int = 50         # rounds of prior-only weights after the guard triggers

    def __post_init__(self) -> None:
        positive = ("lr", "critic_lr", "hidden", "update_every", "sigma", "min_sigma", "patience", "fallback_rounds")
        for name in positive:
            if not getattr(self, name) > 0:
                raise HpcfedError(f"aggregation.actor_critic.{name}: {getattr(self, name)}; must be > 0")
        for name in ("entropy", "warmup", "flat_tolerance"):
            if not getattr(self, name) >= 0:
                raise HpcfedError(f"aggregation.actor_critic.{name}: {getattr(self, name)}; must be >= 0")
        if not self.min_sigma <= self.sigma <= self.max_sigma:
            raise HpcfedError(f"aggregation.actor_critic.sigma: {self.sigma}; must lie in "
                              f"[min_sigma, max_sigma] = [{self.min_sigma}, {self.max_sigma}]")
        if not 0 < self.reward_decay < 1:
            raise HpcfedError(f"aggregation.actor_critic.reward_decay: {self.reward_decay}; must lie in (0, 1)")
        if not 0 <= self.trust_decay < 1:
            raise HpcfedError(f"aggregation.actor_critic.trust_decay: {self.trust_decay}; must lie in [0, 1)")
        if not 0 < self.collapse_threshold <= 1:
            raise HpcfedError(f"aggregation.actor_critic.collapse_threshold: {self.collapse_threshold}; "
                              "must lie in (0, 1]")


def node_features(sq: np.ndarray, dots: np.ndarray, ref_sq: float, trust_mean: np.ndarray,
                  rel_prev: np.ndarray) -> np.ndarray:
    """Per-node state features (n, N_FEATURES), float64, always finite.

    ``sq, dots, ref_sq`` come from :func:`~hpcfed.aggregation.geometry.inner_products`;
    ``trust_mean`` is each node's running mean cosine to the reference (this round included).
    """
    cos = cosines(sq, dots, ref_sq)
    scale = max(TRUST_SCALE * float(np.median(trust_mean)), TRUST_FLOOR)
    trust = np.clip(trust_mean / scale, -1.0, 1.0)
    tiny = np.finfo(np.float64).tiny
    log_norm = 0.5 * np.log(sq + tiny)
    by_median = log_norm - float(np.median(log_norm))
    by_reference = log_norm - 0.5 * math.log(ref_sq + tiny)
    return np.stack([np.clip(rel_prev, 0.0, PREV_CLIP), trust, cos,
                     np.clip(by_median, -LOG_RATIO_CLIP, LOG_RATIO_CLIP),
                     np.clip(by_reference, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)], axis=1)


class _Nets:
    """Actor (per-node scorer), critic (set-level value) and the log-std of the logit noise.

    All parameters live in one flat float64 vector (views by name), so Adam and checkpoints
    handle a single array.
    """

    def __init__(self, hidden: int) -> None:
        f2 = 2 * N_FEATURES
        shapes = {"actor_w1": (hidden, f2), "actor_b1": (hidden,), "actor_w2": (hidden,), "actor_lin": (N_FEATURES,),
                  "log_sigma": (1,), "critic_w1": (hidden, f2), "critic_b1": (hidden,), "critic_w2": (hidden,),
                  "critic_b2": (1,)}
        self.slices: dict[str, tuple[slice, tuple[int, ...]]] = {}
        offset = 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            self.slices[name] = (slice(offset, offset + size), shape)
            offset += size
        self.size = offset
        self.n_actor = self.slices["log_sigma"][0].stop   # actor parameters come first

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {name: flat[sl].reshape(shape) for name, (sl, shape) in self.slices.items()}

    def init(self, sigma: float, prior: float, gen: np.random.Generator) -> np.ndarray:
        flat = np.zeros(self.size)
        p = self.views(flat)
        bound = 1.0 / math.sqrt(2 * N_FEATURES)
        p["actor_w1"][...] = gen.uniform(-bound, bound, p["actor_w1"].shape)
        p["critic_w1"][...] = gen.uniform(-bound, bound, p["critic_w1"].shape)
        p["actor_lin"][TRUST] = prior
        p["log_sigma"][0] = math.log(sigma)
        return flat

    @staticmethod
    def inputs(feats: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-node actor inputs (B, N, 2F) and set-level critic inputs (B, 2F) for a (B, N) mask."""
        m = mask.astype(np.float64)[..., None]
        count = np.maximum(m.sum(1), 1.0)
        mean = (feats * m).sum(1) / count
        std = np.sqrt((((feats - mean[:, None]) ** 2) * m).sum(1) / count)
        node_in = np.concatenate([feats, np.broadcast_to(mean[:, None], feats.shape)], axis=-1)
        return node_in, np.concatenate([mean, std], axis=-1)

    def forward(self, flat: np.ndarray, feats: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """Scores (B, N), values (B,) and the activations :meth:`backward` needs."""
        p = self.views(flat)
        node_in, set_in = self.inputs(feats, mask)
        h_actor = np.tanh(node_in @ p["actor_w1"].T + p["actor_b1"])
        scores = h_actor @ p["actor_w2"] + feats @ p["actor_lin"]
        h_critic = np.tanh(set_in @ p["critic_w1"].T + p["critic_b1"])
        values = h_critic @ p["critic_w2"] + p["critic_b2"][0]
        return scores, values, {"feats": feats, "node_in": node_in, "set_in": set_in,
                                "h_actor": h_actor, "h_critic": h_critic}

    def backward(self, flat: np.ndarray, cache: dict, d_scores: np.ndarray, d_values: np.ndarray,
                 d_log_sigma: float) -> np.ndarray:
        """The gradient (flat) of a loss with the given derivatives by scores, values and log-sigma."""
        p = self.views(flat)
        grad = np.zeros(self.size)
        g = self.views(grad)
        g["actor_lin"][...] = np.einsum("bn,bnf->f", d_scores, cache["feats"])
        g["actor_w2"][...] = np.einsum("bn,bnh->h", d_scores, cache["h_actor"])
        d_pre = d_scores[..., None] * p["actor_w2"] * (1.0 - cache["h_actor"] ** 2)
        g["actor_w1"][...] = np.einsum("bnh,bni->hi", d_pre, cache["node_in"])
        g["actor_b1"][...] = d_pre.sum((0, 1))
        g["log_sigma"][0] = d_log_sigma
        g["critic_w2"][...] = d_values @ cache["h_critic"]
        g["critic_b2"][0] = d_values.sum()
        d_pre = d_values[:, None] * p["critic_w2"] * (1.0 - cache["h_critic"] ** 2)
        g["critic_w1"][...] = d_pre.T @ cache["set_in"]
        g["critic_b1"][...] = d_pre.sum(0)
        return grad


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


class ActorCriticWeighter:
    """Per-node aggregation probabilities from an online actor-critic (see the module docstring)."""

    def __init__(self, n_nodes: int, settings: ActorCriticSettings, seed: int) -> None:
        if n_nodes < 1:
            raise HpcfedError(f"aggregation: n_nodes={n_nodes}; need at least 1")
        self.n_nodes, self.settings, self.seed = n_nodes, settings, seed
        self._nets = _Nets(settings.hidden)
        self._resets = 0                               # network initialisations so far (keys their RNG)
        self._draws = 0                                # exploration draws so far (keys their RNG)
        self._reset_learning()
        self._last = np.full(n_nodes, np.nan)          # last probabilities by node id
        self._rel_prev = np.full(n_nodes, np.nan)      # last probabilities * number present
        self._trust_mean = np.full(n_nodes, np.nan)    # running mean cosine to the reference by node id
        self.fallbacks = 0                             # how often the guard fell back to uniform
        self.fallback_left = 0                         # rounds of uniform weights still to come

    def _reset_learning(self) -> None:
        """Fresh networks, optimizer, reward statistics and buffers (at start and after a fallback)."""
        s, n = self.settings, self.n_nodes
        self._params = self._nets.init(s.sigma, s.prior, rng(self.seed, "actor-critic", "init", self._resets))
        self._resets += 1
        self._adam_m = np.zeros(self._nets.size)
        self._adam_v = np.zeros(self._nets.size)
        self._adam_steps = np.zeros(2, dtype=np.int64)  # actor, critic
        self._buf_feats = np.zeros((s.update_every, n, N_FEATURES))
        self._buf_mask = np.zeros((s.update_every, n), dtype=bool)
        self._buf_z = np.zeros((s.update_every, n))
        self._buf_reward = np.zeros(s.update_every)
        self._buf_len = 0
        self._pending = False                          # a round awaits its reward
        self._pend_feats = np.zeros((n, N_FEATURES))
        self._pend_mask = np.zeros(n, dtype=bool)
        self._pend_z = np.zeros(n)
        self.rewards_seen = 0
        self._reward_sq = 0.0                          # running mean of r^2 (normaliser)
        self._reward_mean = 0.0                        # running mean of r (collapse test)
        self._last_reward = math.nan
        self._flat_rounds = 0
        self._collapsed_rounds = 0

    @property
    def in_fallback(self) -> bool:
        return self.fallback_left > 0

    @property
    def sigma(self) -> float:
        """Current std of the logit noise (exploration), for traces."""
        return self._sigma(self._nets.views(self._params)["log_sigma"][0])

    def _sigma(self, log_sigma: float) -> float:
        s = self.settings
        return math.exp(min(max(log_sigma, math.log(s.min_sigma)), math.log(s.max_sigma)))

    def weights(self, nodes: Sequence[int], updates: Any, reference: Any = None) -> np.ndarray:
        """Probabilities (float64, sum 1) over ``nodes``, whose updates are the rows of ``updates``.

        ``updates``: an (n, P) array or n 1-D arrays (numpy or cupy); ``reference``: rank 0's own
        update in the same domain, or None for the coordinate-wise median of the updates.
        """
        nodes = np.asarray(nodes, dtype=np.int64)
        n = len(nodes)
        if n == 0 or len(np.unique(nodes)) != n or nodes.min() < 0 or nodes.max() >= self.n_nodes:
            raise HpcfedError(f"aggregation: nodes {nodes.tolist()} must be distinct ids in [0, {self.n_nodes})")
        rows = as_rows(updates)
        if len(rows) != n:
            raise HpcfedError(f"aggregation: {len(rows)} updates for {n} nodes; need ({n}, P), one row per node")
        if reference is None:
            reference = coordinate_median(rows)
        sq, dots, ref_sq = inner_products(rows, reference)
        cos = cosines(sq, dots, ref_sq)
        decay = self.settings.trust_decay
        known = self._trust_mean[nodes]
        self._trust_mean[nodes] = np.where(np.isnan(known), cos, decay * known + (1 - decay) * cos)
        rel_prev = np.nan_to_num(self._rel_prev[nodes], nan=1.0)
        feats = node_features(sq, dots, ref_sq, self._trust_mean[nodes], rel_prev)
        if self.in_fallback:   # the informed prior alone, without noise (uniform when prior = 0)
            probs = _softmax(self.settings.prior * feats[:, TRUST])
            self._pending = False
        else:
            probs = self._act(nodes, feats)
        self._last[:] = np.nan
        self._last[nodes] = probs
        self._rel_prev[:] = np.nan
        self._rel_prev[nodes] = probs * n
        return probs

    def _act(self, nodes: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """Sample the logits of the present nodes and remember the round for its reward."""
        self._pend_feats[:] = 0.0
        self._pend_feats[nodes] = feats
        self._pend_mask[:] = False
        self._pend_mask[nodes] = True
        scores, _, _ = self._nets.forward(self._params, self._pend_feats[None], self._pend_mask[None])
        noise = rng(self.seed, "actor-critic", "noise", self._draws).standard_normal(len(nodes))
        self._draws += 1
        z = scores[0][nodes] + self.sigma * noise
        self._pend_z[:] = 0.0
        self._pend_z[nodes] = z
        self._pending = True
        return _softmax(z)

    def reward(self, value: float) -> None:
        """The reward of the last :meth:`weights` round (e.g. val loss before - after); learns from it."""
        if self.in_fallback:
            self.fallback_left -= 1
            if not self.in_fallback:
                self._reset_learning()
            return
        if not self._pending:
            raise HpcfedError("aggregation: reward() without a weights() round to reward; call weights() first")
        self._pending = False
        value = float(value)
        if not math.isfinite(value) or self._guard(value):
            self._fall_back()
            return
        s = self.settings
        decay = s.reward_decay
        self._reward_sq = value * value if self.rewards_seen == 0 else decay * self._reward_sq + (1 - decay) * value**2
        scaled = float(np.clip(value / (math.sqrt(self._reward_sq) + 1e-300), -REWARD_CLIP, REWARD_CLIP))
        k = self._buf_len
        self._buf_feats[k], self._buf_mask[k], self._buf_z[k] = self._pend_feats, self._pend_mask, self._pend_z
        self._buf_reward[k] = scaled
        self._buf_len += 1
        self.rewards_seen += 1
        if self._buf_len == s.update_every:
            self._learn(actor=self.rewards_seen > s.warmup)
            self._buf_len = 0

    def _guard(self, value: float) -> bool:
        """Update the flat/collapse counters with a finite reward; True when the guard must fall back."""
        s = self.settings
        self._flat_rounds = self._flat_rounds + 1 if abs(value - self._last_reward) <= s.flat_tolerance else 0
        self._last_reward = value
        self._reward_mean = s.reward_decay * self._reward_mean + (1 - s.reward_decay) * value
        collapsed = np.nanmax(self._last) > s.collapse_threshold and np.sum(~np.isnan(self._last)) > 1
        self._collapsed_rounds = self._collapsed_rounds + 1 if collapsed and self._reward_mean <= 0 else 0
        return self._flat_rounds >= s.patience or self._collapsed_rounds >= s.patience

    def _fall_back(self) -> None:
        self.fallbacks += 1
        self.fallback_left = self.settings.fallback_rounds

    def _learn(self, actor: bool) -> None:
        """One Adam step on the buffered rounds (critic always; actor after the warm-up)."""
        s, nets = self.settings, self._nets
        mask, z, reward = self._buf_mask, self._buf_z, self._buf_reward
        batch = len(reward)
        scores, values, cache = nets.forward(self._params, self._buf_feats, mask)
        d_values = (values - reward) / batch
        d_scores = np.zeros_like(scores)
        d_log_sigma = 0.0
        if actor:
            raw = float(nets.views(self._params)["log_sigma"][0])
            sigma = self._sigma(raw)
            m = mask.astype(np.float64)
            advantage = reward - values
            resid = (z - scores) / sigma
            d_scores = -(advantage / batch)[:, None] * m * resid / sigma
            if math.log(s.min_sigma) <= raw <= math.log(s.max_sigma):   # the clamp passes no gradient outside
                d_log_sigma = -float(advantage @ ((resid**2 - 1.0) * m).sum(1)) / batch - s.entropy
        grad = nets.backward(self._params, cache, d_scores, d_values, d_log_sigma)
        parts = [(slice(nets.n_actor, nets.size), 1, s.critic_lr)]
        if actor:
            parts.append((slice(0, nets.n_actor), 0, s.lr))
        (beta1, beta2) = ADAM_BETAS
        for part, index, lr in parts:    # torch.optim.Adam's update, per parameter group
            self._adam_steps[index] += 1
            t = int(self._adam_steps[index])
            m_, v_, g = self._adam_m[part], self._adam_v[part], grad[part]
            m_ *= beta1
            m_ += (1 - beta1) * g
            v_ *= beta2
            v_ += (1 - beta2) * g * g
            denom = np.sqrt(v_ / (1 - beta2**t)) + ADAM_EPS
            self._params[part] -= (lr / (1 - beta1**t)) * m_ / denom

    def probabilities(self) -> np.ndarray:
        """Last probabilities by node id (NaN for nodes absent from the last round), for traces."""
        return self._last.copy()

    _ARRAYS = ("params", "adam_m", "adam_v", "adam_steps", "last", "rel_prev", "trust_mean", "buf_feats",
               "buf_mask", "buf_z", "buf_reward", "pend_feats", "pend_mask", "pend_z")
    _SCALARS = {"seed": "seed", "resets": "_resets", "draws": "_draws", "buf_len": "_buf_len", "pending": "_pending",
                "rewards_seen": "rewards_seen", "reward_sq": "_reward_sq", "reward_mean": "_reward_mean",
                "last_reward": "_last_reward", "flat_rounds": "_flat_rounds", "collapsed_rounds": "_collapsed_rounds",
                "fallbacks": "fallbacks", "fallback_left": "fallback_left"}
    _FLOATS = ("reward_sq", "reward_mean", "last_reward")

    def state_dict(self) -> dict[str, np.ndarray | int | float]:
        """Everything needed to continue bit-identically: arrays and scalars only."""
        state: dict[str, np.ndarray | int | float] = {"n_nodes": self.n_nodes}
        for name in self._ARRAYS:
            state[name] = getattr(self, f"_{name}").copy()
        for name, attr in self._SCALARS.items():
            state[name] = float(getattr(self, attr)) if name in self._FLOATS else int(getattr(self, attr))
        return state

    def load_state_dict(self, state: dict[str, np.ndarray | int | float]) -> None:
        """Restore a :meth:`state_dict` taken from a weighter with the same n_nodes and settings."""
        if int(state["n_nodes"]) != self.n_nodes:
            raise HpcfedError(f"aggregation: checkpoint is for {int(state['n_nodes'])} nodes, "
                              f"this run has {self.n_nodes}")
        if "params" not in state or np.shape(state["params"]) != (self._nets.size,):
            raise HpcfedError("aggregation: actor-critic checkpoint has networks of another shape "
                              "(aggregation.actor_critic.hidden differs, or an older format)")
        for name in self._ARRAYS:
            getattr(self, f"_{name}")[...] = state[name]
        for name, attr in self._SCALARS.items():
            setattr(self, attr, float(state[name]) if name in self._FLOATS else int(state[name]))
        self._pending = bool(self._pending)
