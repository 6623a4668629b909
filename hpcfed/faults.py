"""Fault injection for experiments and tests (config section ``faults``), applied on the worker ranks.

Stragglers sleep before a step; label noise permutes a rank's labels once; gradient faults
replace what a rank uploads (scaled by a factor, or Gaussian noise of the same norm).
None of them changes what the other ranks compute.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hpcfed.config import FaultsConfig
from hpcfed.data.datasets import Dataset
from hpcfed.xp import array_module, to_numpy
from hpcfed.seeding import rng


class Faults:
    """The faults configured for one rank."""

    def __init__(self, cfg: FaultsConfig, seed: int, rank: int) -> None:
        self.cfg = cfg
        self.rank = rank
        self.straggles = rank in cfg.stragglers.ranks and cfg.stragglers.delay_s > 0
        self.delays = rng(seed, "straggler", rank)
        self.noise = rng(seed, "grad-noise", rank)
        self.label_rng = rng(seed, "label-noise", rank)

    def straggle(self) -> None:
        """Sleep before computing a step, if this rank straggles."""
        faults = self.cfg.stragglers
        if self.straggles and self.delays.random() < faults.prob:
            time.sleep(self.delays.exponential(faults.delay_s) if faults.random else faults.delay_s)

    def labels(self, data: Dataset) -> Dataset:
        """This rank's data, with labels randomly permuted if it has label noise."""
        if self.rank not in self.cfg.label_noise.ranks:
            return data
        xp = array_module(data.y)
        return Dataset(data.x, xp.asarray(self.label_rng.permutation(to_numpy(data.y))), data.num_classes, data.ids)

    def update(self, values: Any) -> None:
        """Corrupt an outgoing gradient or delta (NumPy or CuPy) in place, if this rank has a gradient fault."""
        xp = array_module(values)
        if self.rank in self.cfg.grad_scale.ranks:
            values *= np.float32(self.cfg.grad_scale.factor)
        if self.rank in self.cfg.grad_noise.ranks:
            norm = float(xp.linalg.norm(values))
            noise = self.noise.standard_normal(values.size).astype(np.float32)
            values[:] = xp.asarray(noise * np.float32(norm / max(float(np.linalg.norm(noise)), 1e-30)))

    def state(self) -> dict:
        return {"delays": self.delays.bit_generator.state, "noise": self.noise.bit_generator.state}

    def load_state(self, state: dict) -> None:
        self.delays.bit_generator.state = state["delays"]
        self.noise.bit_generator.state = state["noise"]
