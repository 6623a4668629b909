"""Mini-batches over one worker's samples: epoch permutations derived from the seed, with explicit state."""

from __future__ import annotations

import numpy as np

from hpcfed.seeding import rng


class BatchSampler:
    """Yields index batches; state is (epoch, position), so a checkpoint can resume it exactly."""

    def __init__(self, n_samples: int, batch_size: int, seed: int, stream: int) -> None:
        self.n_samples = n_samples
        self.batch_size = min(batch_size, n_samples)
        self.seed = seed
        self.stream = stream
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return rng(self.seed, "batches", self.stream, self.epoch).permutation(self.n_samples)

    def next(self) -> np.ndarray:
        if self.position + self.batch_size > self.n_samples:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation()
        batch = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch
