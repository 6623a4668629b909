"""Data sets: digits (ships with scikit-learn), MNIST-1D (generated), HDF5 files, synthetic.

Everything is loaded on rank 0 only and handed to workers over MPI, so user
files need to exist only where rank 0 runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpcfed.config import DataConfig
from hpcfed.errors import HpcfedError
from hpcfed.seeding import rng


@dataclass(frozen=True)
class Dataset:
    """Samples (float32, shape (N, C, ...)), integer labels (int64, (N,)) and their row ids in the source."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    ids: np.ndarray | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> "Dataset":
        ids = None if self.ids is None else self.ids[index]
        return Dataset(self.x[index], self.y[index], self.num_classes, ids)


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The whole labelled data set named by ``cfg`` (before the train/test split)."""
    loaders = {"digits": _digits, "mnist1d": _mnist1d, "hdf5": _hdf5, "synthetic": _synthetic}
    x, y = loaders[cfg.name](cfg, seed)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 2:  # feature vectors become one-channel signals, so conv models take them too
        x = x[:, None, :]
    y = np.ascontiguousarray(y, dtype=np.int64)
    return Dataset(x, y, int(y.max()) + 1, np.arange(len(y)))


def train_test_split(data: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded random split; the test part has at least one sample."""
    order = rng(seed, "split").permutation(len(data))
    n_test = max(1, int(round(test_fraction * len(data))))
    return data.subset(np.sort(order[n_test:])), data.subset(np.sort(order[:n_test]))


def carve(data: Dataset, fraction: float, seed: int, purpose: str) -> tuple[Dataset, Dataset]:
    """Split off a seeded random ``fraction`` (at least one sample): returns (carved, rest)."""
    order = rng(seed, purpose).permutation(len(data))
    n = max(1, int(round(fraction * len(data))))
    return data.subset(np.sort(order[:n])), data.subset(np.sort(order[n:]))


def _digits(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images[:, None, :, :] / 16.0, digits.target


def _mnist1d(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    made = make_dataset(args)  # procedural: no download
    return np.concatenate([made["x"], made["x_test"]]), np.concatenate([made["y"], made["y_test"]])


def _hdf5(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    path = cfg.path
    try:
        with h5py.File(path, "r") as file:
            missing = [name for name in ("x", "y") if name not in file]
            if missing:
                raise HpcfedError(f"data.path: '{path}' has no dataset '{missing[0]}' (needs datasets 'x' and 'y')")
            x, y = file["x"][...], file["y"][...]
    except OSError as err:
        raise HpcfedError(f"data.path: '{path}' is not a readable HDF5 file ({err})") from None
    if len(x) != len(y) or y.ndim != 1:
        raise HpcfedError(f"data.path: '{path}': 'y' must be 1-D with one label per row of 'x' "
                          f"(x has {len(x)} rows, y has shape {y.shape})")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise HpcfedError(f"data.path: '{path}': 'y' must hold non-negative integer class labels (got {y.dtype})")
    if len(y) < 4:
        raise HpcfedError(f"data.path: '{path}': needs at least 4 samples (got {len(y)})")
    return x, y


def _synthetic(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian classes in 32 dimensions: separable, for fast tests."""
    gen = rng(seed, "synthetic")
    centers = gen.normal(0.0, 1.5, size=(4, 32))
    y = gen.integers(0, 4, size=cfg.samples)
    return centers[y] + gen.normal(0.0, 1.0, size=(cfg.samples, 32)), y
