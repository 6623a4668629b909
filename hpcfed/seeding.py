"""One seed derives every random stream: per rank, per purpose (determinism by construction)."""

from __future__ import annotations

import hashlib

import numpy as np


def stream_key(seed: int, *purpose: str | int) -> list[int]:
    """Entropy words for (seed, purpose...): stable across runs, platforms and Python hash seeds."""
    digest = hashlib.sha256(repr((seed, *purpose)).encode()).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


def rng(seed: int, *purpose: str | int) -> np.random.Generator:
    """A numpy Generator for one purpose, e.g. ``rng(seed, "batches", rank, epoch)``."""
    return np.random.default_rng(stream_key(seed, *purpose))


def torch_seed(seed: int, *purpose: str | int) -> int:
    """A 63-bit integer seed for torch generators of one purpose."""
    low, high = stream_key(seed, *purpose)[:2]
    return low | (high << 31)
