"""Data sets: digits (ships with scikit-learn), MNIST-1D (generated), HDF5 files, synthetic, or a user
factory named by an import path ``package.module:function``.

With ``data.read: ship`` (the default) everything is loaded on rank 0 and handed to workers over
MPI, so user files need to exist only where rank 0 runs. With ``data.read: index`` (HDF5 only)
rank 0 reads just the labels (:func:`load_labels`), splits and partitions by index, and each
worker reads its own rows (:func:`read_rows`).

Samples keep an integer dtype as stored (uint8 images stay uint8, cast to fp32 batch by batch);
any other dtype becomes float32. Feature vectors (N, F) become one-channel signals (N, 1, F).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from hpcfed.config import DataConfig
from hpcfed.data.plugins import call, one_line, resolve
from hpcfed.errors import HpcfedError
from hpcfed.seeding import rng

MNIST1D_SAMPLES = 5000    # data.samples default for mnist1d (its own default)
SYNTHETIC_SAMPLES = 2000  # data.samples default for synthetic
RUN_COST_BYTES = 32 << 10  # read_rows: bytes worth one extra HDF5 read call (reading a gap beats a call below this)
MAX_SPAN_BYTES = 64 << 20  # read_rows: most bytes read in one call
FANCY_ROWS = 32768         # read_rows: isolated rows per fancy-indexed read


@dataclass(frozen=True)
class Dataset:
    """Samples (float32 or an integer dtype as stored, shape (N, C, ...)), integer labels (int64, (N,))
    and their row ids in the source."""

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


@dataclass(frozen=True)
class Labels:
    """A data set without its samples: labels, the shape and dtype samples will have, and source row ids
    (what :func:`read_rows` takes). Splits, carving and partitioning work on it as on a :class:`Dataset`."""

    y: np.ndarray
    num_classes: int
    sample_shape: tuple[int, ...]
    x_dtype: np.dtype
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> "Labels":
        return Labels(self.y[index], self.num_classes, self.sample_shape, self.x_dtype, self.ids[index])


D = TypeVar("D", Dataset, Labels)


def sample_dtype(stored: np.dtype) -> np.dtype:
    """The dtype samples are kept in: integer types as stored, everything else float32."""
    return np.dtype(stored) if np.issubdtype(stored, np.integer) else np.dtype(np.float32)


def as_samples(x: np.ndarray) -> np.ndarray:
    """``x`` as contiguous samples of :func:`sample_dtype`, feature vectors (N, F) as signals (N, 1, F)."""
    x = np.ascontiguousarray(x, dtype=sample_dtype(x.dtype))
    return x[:, None, :] if x.ndim == 2 else x


def _sample_shape(stored_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, stored_shape[1]) if len(stored_shape) == 2 else tuple(stored_shape[1:])


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The whole labelled data set named by ``cfg`` (before the train/test split)."""
    loaders = {"digits": _digits, "mnist1d": _mnist1d, "hdf5": _hdf5, "synthetic": _synthetic}
    x, y = _factory(cfg, seed) if ":" in cfg.name else loaders[cfg.name](cfg, seed)
    x = as_samples(x)
    y = np.ascontiguousarray(y, dtype=np.int64)
    return Dataset(x, y, int(y.max()) + 1, np.arange(len(y)))


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices of a seeded random split; the test part has at least one row."""
    order = rng(seed, "split").permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def carve_indices(n: int, fraction: float, seed: int, purpose: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (carved, rest) row indices: a seeded random ``fraction`` (at least one row) and the rest."""
    order = rng(seed, purpose).permutation(n)
    k = max(1, int(round(fraction * n)))
    return np.sort(order[:k]), np.sort(order[k:])


def train_test_split(data: D, test_fraction: float, seed: int) -> tuple[D, D]:
    """A seeded random split of a Dataset or Labels: (train, test)."""
    train, test = split_indices(len(data), test_fraction, seed)
    return data.subset(train), data.subset(test)


def carve(data: D, fraction: float, seed: int, purpose: str) -> tuple[D, D]:
    """Split off a seeded random ``fraction`` (at least one sample) of a Dataset or Labels: (carved, rest)."""
    carved, rest = carve_indices(len(data), fraction, seed, purpose)
    return data.subset(carved), data.subset(rest)


def _check(where: str, x_shape: tuple[int, ...], y: np.ndarray) -> None:
    """The checks every user-supplied (x, y) passes; ``where`` starts each message (key and source)."""
    if len(x_shape) < 2:
        raise HpcfedError(f"{where}: 'x' must hold one sample per row, shape (N, ...) (got shape {tuple(x_shape)})")
    if x_shape[0] != len(y) or y.ndim != 1:
        raise HpcfedError(f"{where}: 'y' must be 1-D with one label per row of 'x' "
                          f"(x has {x_shape[0]} rows, y has shape {y.shape})")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise HpcfedError(f"{where}: 'y' must hold non-negative integer class labels (got {y.dtype})")
    if len(y) < 4:
        raise HpcfedError(f"{where}: needs at least 4 samples (got {len(y)})")


def _digits(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images[:, None, :, :] / 16.0, digits.target


def _mnist1d(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``data.samples`` (default 5000) signals, rounded down to a multiple of 10 (equal per class);
    make_dataset's own train/test split is undone (both parts concatenated)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = cfg.samples or MNIST1D_SAMPLES
    made = make_dataset(args)  # procedural: no download
    return np.concatenate([made["x"], made["x_test"]]), np.concatenate([made["y"], made["y_test"]])


@contextmanager
def _open_hdf5(path: str) -> Iterator[Any]:
    """An HDF5 file open for reading (a 64 MiB chunk cache); HpcfedError naming the file if it fails."""
    import h5py

    try:
        with h5py.File(path, "r", rdcc_nbytes=64 << 20) as file:
            yield file
    except OSError as err:
        raise HpcfedError(f"data.path: '{path}' is not a readable HDF5 file ({one_line(err)})") from None


def _xy(file: Any, path: str) -> tuple[Any, np.ndarray]:
    """The 'x' dataset (not read) and the checked 'y' labels of an open file."""
    missing = [name for name in ("x", "y") if name not in file]
    if missing:
        raise HpcfedError(f"data.path: '{path}' has no dataset '{missing[0]}' (needs datasets 'x' and 'y')")
    x, y = file["x"], file["y"][...]
    _check(f"data.path: '{path}'", x.shape, y)
    return x, y


def _hdf5(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    with _open_hdf5(cfg.path) as file:
        x, y = _xy(file, cfg.path)
        return x[...], y


def load_labels(cfg: DataConfig, seed: int) -> Labels:
    """The labels of ``data.path`` and the shape and dtype of its samples, without reading 'x'
    (``data.read: index``); checked as :func:`load_dataset` checks the file."""
    if cfg.name != "hdf5" or not cfg.path:
        raise HpcfedError(f"data.read: 'index' needs data.name 'hdf5' and data.path (got data.name '{cfg.name}')")
    with _open_hdf5(cfg.path) as file:
        x, y = _xy(file, cfg.path)
        shape, dtype = tuple(x.shape), x.dtype
    y = np.ascontiguousarray(y, dtype=np.int64)
    return Labels(y, int(y.max()) + 1, _sample_shape(shape), sample_dtype(dtype), np.arange(len(y)))


def _read_groups(rows: list[int], row_bytes: int) -> Iterator[tuple[int, int]]:
    """Split sorted unique row numbers into reads ``rows[a:b]``: contiguous runs, merged while reading the
    gaps between them costs less than the extra calls (:data:`RUN_COST_BYTES`) and the span fits
    :data:`MAX_SPAN_BYTES`."""
    first, runs, gap = 0, 1, 0
    for i in range(1, len(rows)):
        step = rows[i] - rows[i - 1]
        fits = (rows[i] + 1 - rows[first]) * row_bytes <= MAX_SPAN_BYTES
        if fits and step == 1:
            continue
        if fits and (gap + step - 1) * row_bytes <= runs * RUN_COST_BYTES:
            runs, gap = runs + 1, gap + step - 1
            continue
        yield first, i
        first, runs, gap = i, 1, 0
    if rows:
        yield first, len(rows)


def read_rows(path: str, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (source row ids, any order) of the samples 'x' of HDF5 file ``path``, shaped and typed as
    :func:`load_dataset` gives them (integer types as stored, else float32; (N, F) as (N, 1, F)).

    Contiguous runs are read with one call each, nearby runs together (gaps dropped in memory), and the
    remaining isolated rows by h5py fancy indexing in batches: large random partitions read in about the time
    of one fancy-indexed read, contiguous ones at close to disk speed, with bounded extra memory.
    """
    rows = np.asarray(rows)
    if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
        raise HpcfedError(f"data.path: '{path}': rows must be a 1-D integer array (got {rows.dtype}, {rows.shape})")
    unique, inverse = np.unique(rows.astype(np.int64), return_inverse=True)
    with _open_hdf5(path) as file:
        if "x" not in file:
            raise HpcfedError(f"data.path: '{path}' has no dataset 'x' (needs datasets 'x' and 'y')")
        x = file["x"]
        shape = tuple(x.shape)
        if len(shape) < 2:
            raise HpcfedError(f"data.path: '{path}': 'x' must hold one sample per row (got shape {x.shape})")
        if unique.size and (unique[0] < 0 or unique[-1] >= x.shape[0]):
            bad = int(unique[0] if unique[0] < 0 else unique[-1])
            raise HpcfedError(f"data.path: '{path}' has {shape[0]} rows here but row {bad} was asked for "
                              "(is it the same file on every node?)")
        out = np.empty((len(unique), *x.shape[1:]), dtype=sample_dtype(x.dtype))
        listed = unique.tolist()
        row_bytes = max(1, x.dtype.itemsize * int(np.prod(x.shape[1:])))
        singles: list[int] = []   # positions of isolated rows: one fancy-indexed read per FANCY_ROWS of them
        for a, b in _read_groups(listed, row_bytes):
            lo, hi = listed[a], listed[b - 1] + 1
            if b - a == 1:
                singles.append(a)
            elif hi - lo == b - a:   # one contiguous run (read_direct is slower: it selects within `out`)
                out[a:b] = x[lo:hi]
            else:
                out[a:b] = x[lo:hi][unique[a:b] - lo]
        for i in range(0, len(singles), FANCY_ROWS):
            at = np.asarray(singles[i:i + FANCY_ROWS])
            out[at] = x[unique[at]]   # increasing indices, as h5py needs
    out = out.reshape(len(out), *_sample_shape(shape))
    return out if len(unique) == len(rows) and np.array_equal(unique, rows) else out[inverse]


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _factory(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from the factory ``data.name`` called with ``data.kwargs`` (and ``seed=`` when it takes one):
    it returns (x, y) array-likes or a map-style Dataset of (sample, label) pairs, which is stacked."""
    where = f"data.name '{cfg.name}'"
    made = call("data.name", cfg.name, resolve("data.name", cfg.name), dict(cfg.kwargs), {"seed": seed})
    try:
        if isinstance(made, (tuple, list)):
            if len(made) != 2:
                raise HpcfedError(f"{where}: the factory returned {len(made)} items; expected (x, y)")
            x, y = (_to_numpy(v) for v in made)
        elif hasattr(made, "__getitem__") and hasattr(made, "__len__"):
            x, y = _stack(where, made)
        else:
            raise HpcfedError(f"{where}: the factory returned a {type(made).__name__}; expected (x, y) arrays "
                              "or a map-style torch Dataset of (sample, label) pairs")
        if x.dtype.kind not in "biuf":
            raise HpcfedError(f"{where}: 'x' must hold numbers (got dtype {x.dtype})")
    except HpcfedError:
        raise
    except Exception as err:
        raise HpcfedError(f"{where}: cannot read what the factory returned ({one_line(err)})") from None
    _check(where, x.shape, y)
    return x, y


def _stack(where: str, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """Samples and labels of a map-style Dataset, stacked."""
    samples, labels = [], []
    for i in range(len(dataset)):
        try:
            item = dataset[i]
        except Exception as err:
            raise HpcfedError(f"{where}: dataset[{i}] raised {one_line(err)}") from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise HpcfedError(f"{where}: dataset[{i}] is a {type(item).__name__}; expected a (sample, label) pair")
        samples.append(_to_numpy(item[0]))
        labels.append(_to_numpy(item[1]))
    if not samples:
        raise HpcfedError(f"{where}: the dataset is empty")
    shapes = {s.shape for s in samples}
    if len(shapes) > 1:
        raise HpcfedError(f"{where}: samples have different shapes ({', '.join(map(str, sorted(shapes)[:3]))})")
    return np.stack(samples), np.stack(labels)


def _synthetic(cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian classes in 32 dimensions: separable, for fast tests (``data.samples``, default 2000)."""
    n = cfg.samples or SYNTHETIC_SAMPLES
    gen = rng(seed, "synthetic")
    centers = gen.normal(0.0, 1.5, size=(4, 32))
    y = gen.integers(0, 4, size=n)
    return centers[y] + gen.normal(0.0, 1.0, size=(n, 32)), y
