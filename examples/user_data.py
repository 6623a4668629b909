"""An example user data factory for hpcfed: ``data.name: "user_data:noisy_digits"``.

A factory returns ``(x, y)`` (arrays or tensors: x of shape (N, C, L), (N, C, H, W) or (N, features);
y of shape (N,) with integer labels 0..K-1) or a map-style torch Dataset of (sample, label) pairs,
which hpcfed stacks. It gets ``data.kwargs`` plus ``seed`` when its signature names it. Integer
samples (e.g. uint8 images) are kept as they are and cast to float32 batch by batch; scale them
in the model if they need it. This folder must be on PYTHONPATH where rank 0 runs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class NoisyDigits(Dataset):
    """scikit-learn's 8x8 digits in [0, 1] with Gaussian noise, as (tensor (1, 8, 8), int label) pairs."""

    def __init__(self, noise: float, seed: int) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images[:, None] / 16.0
        images = images + np.random.default_rng(seed).normal(0.0, noise, images.shape)
        self.x = torch.as_tensor(images, dtype=torch.float32)
        self.y = digits.target.tolist()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], self.y[i]


def noisy_digits(seed: int, noise: float = 0.1) -> Dataset:
    return NoisyDigits(noise, seed)
