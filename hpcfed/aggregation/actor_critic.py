"""Actor-critic weighting of node updates at rank 0 (advantage actor-critic, trained online).

Each round the weighter turns the updates of the nodes present into one probability per
node; the caller aggregates with them, applies the step, and reports the validation-loss
improvement as the reward.

State of a node (scale-free, cheap, computed here from the updates):
  relative previous probability (p_prev * n_prev; 1 = uniform; 1 for a node new this round),
  cosine to the coordinate-wise median update, log of its norm over the median norm (clipped),
  whether it arrived late.
Actor: one small network shared by all nodes scores each node from its own features and the
  mean features of the present set, so any number of nodes works; a linear term on the node's
  own features is added, its cosine weight starting at ``prior`` (an informed initial policy:
  nodes that disagree with the median get less weight from round one; 0 starts uniform, and
  the reward can unlearn it either way).
Action: a logistic-normal draw, logits z_i ~ N(score_i, sigma^2) (sigma learned, bounded),
  probabilities = softmax of z over the present nodes; the sampled probabilities are the weights.
Critic: a small network on set-level summaries (mean and std of the node features) predicts
  the normalised reward; it is the baseline of the advantage A = r - V(s). The reward is the
  immediate effect of this round's aggregate, so the target is r itself (no bootstrapping,
  which would only add the critic's noise).
Objective per update (every ``update_every`` rewards, on the rewards since the last one):
  -A * log pi(z | s)  -  entropy * H(pi)  +  (V(s) - r)^2 / 2, Adam; during the first
  ``warmup`` rewards only the critic learns, so the policy starts from a sensible baseline.
Rewards are divided by their running RMS (and clipped), since loss improvements shrink by
orders of magnitude over training.

Guard (falls back to uniform weights for ``fallback_rounds`` rounds, then restarts learning
from freshly initialised networks; ``fallbacks`` counts how often):
  - a non-finite reward: at once (the reward is useless and is not learned from);
  - a flat reward (equal to the previous one within ``flat_tolerance``) for ``patience`` rounds;
  - a collapsed policy: the largest probability above ``collapse_threshold`` for ``patience``
    rounds in a row while the running mean reward is not positive (the loss is not improving).

Determinism: one torch generator per instance, seeded from ``seed``, draws the initial weights
and the exploration noise; no global RNG is touched. ``state_dict`` holds arrays and scalars
only, and a restored weighter continues bit-identically.
"""

from __future__ import annotations

import math
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
import torch

from hpcfed.aggregation.robust import coordinate_median
from hpcfed.errors import HpcfedError
from hpcfed.seeding import torch_seed

N_FEATURES = 4          # relative previous probability, cosine to median, log norm ratio, late
COSINE = 1              # index of the cosine-to-median feature
LOG_RATIO_CLIP = 4.0    # |log(norm / median norm)| beyond this carries no more information
PREV_CLIP = 4.0         # relative previous probability is clipped to [0, PREV_CLIP]
REWARD_CLIP = 5.0       # normalised rewards are clipped to [-REWARD_CLIP, REWARD_CLIP]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ActorCriticSettings:
    """Hyper-parameters of :class:`ActorCriticWeighter` (defaults tuned on the digits simulation)."""

    lr: float = 0.02                  # actor learning rate (Adam)
    critic_lr: float = 0.02           # critic learning rate (Adam)
    entropy: float = 0.01             # weight of the entropy bonus (per node)
    hidden: int = 32                  # hidden units of the actor and the critic
    update_every: int = 1             # one gradient step every this many rewards
    warmup: int = 10                  # first rewards on which only the critic learns
    sigma: float = 0.5                # initial std of the logit noise (exploration)
    prior: float = 2.0                # initial weight of cosine-to-median in the actor's linear term (0: uniform)
    min_sigma: float = 0.05
    max_sigma: float = 2.0
    reward_decay: float = 0.95        # running RMS / mean of the reward
    collapse_threshold: float = 0.95  # max probability counted as collapsed
    patience: int = 30                # rounds of collapse (or flat reward) before falling back
    flat_tolerance: float = 1e-12     # |r - r_prev| at most this counts as flat
    fallback_rounds: int = 50         # rounds of uniform weights after the guard triggers

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
        if not 0 < self.collapse_threshold <= 1:
            raise HpcfedError(f"aggregation.actor_critic.collapse_threshold: {self.collapse_threshold}; "
                              "must lie in (0, 1]")


def node_features(updates: np.ndarray, rel_prev: np.ndarray, late: np.ndarray) -> np.ndarray:
    """Per-node state features (n, N_FEATURES), float64, always finite.

    Computed in float64 so any finite float32 update (even near its max) gives finite norms;
    non-finite entries count as 0.
    """
    u = np.nan_to_num(np.asarray(updates, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    median = coordinate_median(u)
    norms = np.sqrt(np.einsum("ij,ij->i", u, u))
    median_norm = float(np.sqrt(median @ median))
    denom = norms * median_norm
    cos = np.divide(u @ median, denom, out=np.zeros_like(norms), where=denom > 0)
    reference = float(np.median(norms))
    tiny = np.finfo(np.float64).tiny
    log_ratio = np.log(norms + tiny) - np.log(reference + tiny)
    return np.stack([np.clip(rel_prev, 0.0, PREV_CLIP), np.clip(cos, -1.0, 1.0),
                     np.clip(log_ratio, -LOG_RATIO_CLIP, LOG_RATIO_CLIP), late.astype(np.float64)], axis=1)


class _Nets(torch.nn.Module):
    """Actor (per-node scorer), critic (set-level value) and the log-std of the logit noise."""

    def __init__(self, hidden: int, sigma: float, prior: float, gen: torch.Generator) -> None:
        super().__init__()

        def layer(fan_in: int, fan_out: int, scale: float) -> torch.nn.Parameter:
            bound = scale / math.sqrt(fan_in)
            return torch.nn.Parameter(torch.empty(fan_out, fan_in, dtype=torch.float64).uniform_(-bound, bound,
                                                                                                  generator=gen))

        f2 = 2 * N_FEATURES
        self.actor_w1, self.actor_b1 = layer(f2, hidden, 1.0), torch.nn.Parameter(torch.zeros(hidden, dtype=torch.float64))
        self.actor_w2 = torch.nn.Parameter(torch.zeros(1, hidden, dtype=torch.float64))
        self.actor_lin = torch.nn.Parameter(torch.zeros(N_FEATURES, dtype=torch.float64))
        with torch.no_grad():
            self.actor_lin[COSINE] = prior
        self.log_sigma = torch.nn.Parameter(torch.tensor(math.log(sigma), dtype=torch.float64))
        self.critic_w1, self.critic_b1 = layer(f2, hidden, 1.0), torch.nn.Parameter(torch.zeros(hidden, dtype=torch.float64))
        self.critic_w2 = torch.nn.Parameter(torch.zeros(1, hidden, dtype=torch.float64))
        self.critic_b2 = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def actor_params(self) -> list[torch.nn.Parameter]:
        return [self.actor_w1, self.actor_b1, self.actor_w2, self.actor_lin, self.log_sigma]

    def critic_params(self) -> list[torch.nn.Parameter]:
        return [self.critic_w1, self.critic_b1, self.critic_w2, self.critic_b2]

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B, N) and values (B,) for padded node features (B, N, F) with a (B, N) presence mask."""
        m = mask.to(feats.dtype).unsqueeze(-1)
        count = m.sum(1).clamp(min=1.0)
        mean = (feats * m).sum(1) / count
        std = (((feats - mean.unsqueeze(1)) ** 2 * m).sum(1) / count).sqrt()
        node_in = torch.cat([feats, mean.unsqueeze(1).expand_as(feats)], dim=-1)
        scores = (torch.tanh(node_in @ self.actor_w1.T + self.actor_b1) @ self.actor_w2.T).squeeze(-1)
        scores = scores + feats @ self.actor_lin
        values = torch.tanh(torch.cat([mean, std], -1) @ self.critic_w1.T + self.critic_b1) @ self.critic_w2.T
        return scores, (values + self.critic_b2).squeeze(-1)


class ActorCriticWeighter:
    """Per-node aggregation probabilities from an online actor-critic (see the module docstring)."""

    def __init__(self, n_nodes: int, settings: ActorCriticSettings, seed: int) -> None:
        if n_nodes < 1:
            raise HpcfedError(f"aggregation: n_nodes={n_nodes}; need at least 1")
        self.n_nodes, self.settings = n_nodes, settings
        self._gen = torch.Generator().manual_seed(torch_seed(seed, "actor-critic"))
        self._reset_learning()
        self._last = np.full(n_nodes, np.nan)          # last probabilities by node id
        self._rel_prev = np.full(n_nodes, np.nan)      # last probabilities * number present
        self.fallbacks = 0                             # how often the guard fell back to uniform
        self.fallback_left = 0                         # rounds of uniform weights still to come

    def _reset_learning(self) -> None:
        """Fresh networks, optimizer, reward statistics and buffers (at start and after a fallback)."""
        s, n = self.settings, self.n_nodes
        self._nets = _Nets(s.hidden, s.sigma, s.prior, self._gen)
        self._opt = torch.optim.Adam([{"params": self._nets.actor_params(), "lr": s.lr},
                                      {"params": self._nets.critic_params(), "lr": s.critic_lr}])
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
        with torch.no_grad():
            return float(self._sigma())

    def weights(self, nodes: Sequence[int], updates: np.ndarray, late: Sequence[bool] | None = None) -> np.ndarray:
        """Probabilities (float64, sum 1) over ``nodes``, whose updates are the rows of ``updates``."""
        nodes = np.asarray(nodes, dtype=np.int64)
        n = len(nodes)
        if n == 0 or len(np.unique(nodes)) != n or nodes.min() < 0 or nodes.max() >= self.n_nodes:
            raise HpcfedError(f"aggregation: nodes {nodes.tolist()} must be distinct ids in [0, {self.n_nodes})")
        if np.ndim(updates) != 2 or len(updates) != n:
            raise HpcfedError(f"aggregation: updates of shape {np.shape(updates)}; need ({n}, P), one row per node")
        late = np.zeros(n, dtype=bool) if late is None else np.asarray(late, dtype=bool)
        if late.shape != (n,):
            raise HpcfedError(f"aggregation: {late.size} late flags for {n} nodes; need one per node")
        if self.in_fallback:
            probs = np.full(n, 1.0 / n)
            self._pending = False
        else:
            probs = self._act(nodes, updates, late)
        self._last[:] = np.nan
        self._last[nodes] = probs
        self._rel_prev[:] = np.nan
        self._rel_prev[nodes] = probs * n
        return probs

    def _act(self, nodes: np.ndarray, updates: np.ndarray, late: np.ndarray) -> np.ndarray:
        """Sample the logits of the present nodes and remember the round for its reward."""
        rel_prev = np.nan_to_num(self._rel_prev[nodes], nan=1.0)
        self._pend_feats[:] = 0.0
        self._pend_feats[nodes] = node_features(updates, rel_prev, late)
        self._pend_mask[:] = False
        self._pend_mask[nodes] = True
        with torch.no_grad():
            scores, _ = self._nets(torch.from_numpy(self._pend_feats)[None], torch.from_numpy(self._pend_mask)[None])
            sigma = self._sigma().item()
            noise = torch.randn(len(nodes), generator=self._gen, dtype=torch.float64)
        z = scores[0].numpy()[nodes] + sigma * noise.numpy()
        self._pend_z[:] = 0.0
        self._pend_z[nodes] = z
        self._pending = True
        e = np.exp(z - z.max())
        return e / e.sum()

    def _sigma(self) -> torch.Tensor:
        s = self.settings
        return self._nets.log_sigma.clamp(math.log(s.min_sigma), math.log(s.max_sigma)).exp()

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
        feats = torch.from_numpy(self._buf_feats)
        mask = torch.from_numpy(self._buf_mask)
        z = torch.from_numpy(self._buf_z)
        reward = torch.from_numpy(self._buf_reward)
        scores, values = self._nets(feats, mask)
        loss = 0.5 * ((values - reward) ** 2).mean()
        if actor:
            log_sigma = self._sigma().log()
            m = mask.to(z.dtype)
            log_prob = ((-0.5 * ((z - scores) / log_sigma.exp()) ** 2 - log_sigma) * m).sum(1)
            advantage = (reward - values).detach()
            entropy = log_sigma + 0.5 * math.log(2 * math.pi * math.e)   # per node
            loss = loss - (advantage * log_prob).mean() - self.settings.entropy * entropy
        self._opt.zero_grad()
        loss.backward()
        self._opt.step()

    def probabilities(self) -> np.ndarray:
        """Last probabilities by node id (NaN for nodes absent from the last round), for traces."""
        return self._last.copy()

    def state_dict(self) -> dict[str, np.ndarray | int | float]:
        """Everything needed to continue bit-identically: arrays and scalars only."""
        state: dict[str, np.ndarray | int | float] = {
            f"net.{name}": p.detach().numpy().copy() for name, p in self._nets.named_parameters()}
        for index, slots in self._opt.state_dict()["state"].items():
            for key, tensor in slots.items():
                state[f"opt.{index}.{key}"] = tensor.detach().numpy().copy()
        state.update({
            "generator": self._gen.get_state().numpy().copy(), "n_nodes": self.n_nodes,
            "last": self._last.copy(), "rel_prev": self._rel_prev.copy(),
            "buf_feats": self._buf_feats.copy(), "buf_mask": self._buf_mask.copy(), "buf_z": self._buf_z.copy(),
            "buf_reward": self._buf_reward.copy(), "buf_len": self._buf_len, "pending": int(self._pending),
            "pend_feats": self._pend_feats.copy(), "pend_mask": self._pend_mask.copy(), "pend_z": self._pend_z.copy(),
            "rewards_seen": self.rewards_seen, "reward_sq": self._reward_sq, "reward_mean": self._reward_mean,
            "last_reward": self._last_reward, "flat_rounds": self._flat_rounds,
            "collapsed_rounds": self._collapsed_rounds, "fallbacks": self.fallbacks,
            "fallback_left": self.fallback_left,
        })
        return state

    def load_state_dict(self, state: dict[str, np.ndarray | int | float]) -> None:
        """Restore a :meth:`state_dict` taken from a weighter with the same n_nodes and settings."""
        if int(state["n_nodes"]) != self.n_nodes:
            raise HpcfedError(f"aggregation: checkpoint is for {int(state['n_nodes'])} nodes, "
                              f"this run has {self.n_nodes}")
        self._reset_learning()
        with torch.no_grad():
            for name, p in self._nets.named_parameters():
                p.copy_(torch.from_numpy(np.asarray(state[f"net.{name}"])))
        opt_state = self._opt.state_dict()
        for key, value in state.items():
            if key.startswith("opt."):
                _, index, slot = key.split(".")
                opt_state["state"].setdefault(int(index), {})[slot] = torch.from_numpy(np.array(value))
        self._opt.load_state_dict(opt_state)
        self._gen.set_state(torch.from_numpy(np.asarray(state["generator"], dtype=np.uint8).copy()))
        for name in ("last", "rel_prev", "buf_feats", "buf_mask", "buf_z", "buf_reward",
                     "pend_feats", "pend_mask", "pend_z"):
            getattr(self, f"_{name}")[...] = state[name]
        self._buf_len, self._pending = int(state["buf_len"]), bool(state["pending"])
        self.rewards_seen = int(state["rewards_seen"])
        self._reward_sq, self._reward_mean = float(state["reward_sq"]), float(state["reward_mean"])
        self._last_reward = float(state["last_reward"])
        self._flat_rounds, self._collapsed_rounds = int(state["flat_rounds"]), int(state["collapsed_rounds"])
        self.fallbacks, self.fallback_left = int(state["fallbacks"]), int(state["fallback_left"])

