"""Data loading, splits and flat models (no MPI)."""

import itertools
import sys

import h5py
import numpy as np
import pytest
import torch

from hpcfed.config import DataConfig, ModelConfig, load_config
from hpcfed.data import datasets
from hpcfed.data.datasets import (Labels, as_samples, carve, load_dataset, load_labels, read_rows, split_indices,
                                  train_test_split)
from hpcfed.errors import HpcfedError
from hpcfed.models import FlatModel, build_model


def test_digits_ships_and_splits_deterministically():
    data = load_dataset(DataConfig(), seed=0)
    assert data.x.shape == (1797, 1, 8, 8) and data.num_classes == 10
    train, test = train_test_split(data, 0.2, seed=3)
    again, _ = train_test_split(data, 0.2, seed=3)
    other, _ = train_test_split(data, 0.2, seed=4)
    assert len(test) == 359 and len(train) + len(test) == len(data)
    assert np.array_equal(train.x, again.x) and not np.array_equal(train.y, other.y)


def test_hdf5_file_is_read(tmp_path):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float64)
        f["y"] = np.arange(50) % 3
    data = load_dataset(DataConfig(name="hdf5", path=str(path)), seed=0)
    assert data.x.shape == (50, 1, 6) and data.x.dtype == np.float32 and data.num_classes == 3


@pytest.mark.parametrize("content, message", [
    ({"x": np.zeros((5, 2))}, "has no dataset 'y'"),
    ({"x": np.zeros((5, 2)), "y": np.zeros(4, dtype=int)}, "one label per row"),
    ({"x": np.zeros((5, 2)), "y": np.full(5, 0.5)}, "integer class labels"),
])
def test_bad_hdf5_content_is_named(tmp_path, content, message):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        for name, value in content.items():
            f[name] = value
    with pytest.raises(HpcfedError, match=message):
        load_dataset(DataConfig(name="hdf5", path=str(path)), seed=0)


def test_non_hdf5_file_is_named(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("not hdf5")
    with pytest.raises(HpcfedError, match="not a readable HDF5 file"):
        load_dataset(DataConfig(name="hdf5", path=str(path)), seed=0)


@pytest.mark.parametrize("name, shape, params", [("cnn", (1, 8, 8), 151_306), ("cnn", (1, 40), None), ("mlp", (1, 40), None)])
def test_models_are_seeded_and_flat(name, shape, params):
    first = FlatModel(build_model(ModelConfig(name=name), shape, 10, seed=5))
    second = FlatModel(build_model(ModelConfig(name=name), shape, 10, seed=5))
    assert torch.equal(first.params, second.params)
    assert params is None or first.size == params
    pointer = first.grads.data_ptr()
    x, y = torch.randn(4, *shape), torch.tensor([0, 1, 2, 3])
    first.backward(x, y)
    assert first.grads.data_ptr() == pointer and first.grads.abs().sum() > 0
    before = first.params.clone()
    torch.optim.SGD(first.module.parameters(), lr=0.1).step()
    assert torch.allclose(first.params, before - 0.1 * first.grads)


# --- sample counts, dtypes, HDF5 index mode, Python data factories -------------------------------------------

@pytest.mark.parametrize("samples, expected", [(None, 5000), (200, 200), (205, 200)])
def test_mnist1d_sample_count(samples, expected):
    data = load_dataset(DataConfig(name="mnist1d", samples=samples), seed=0)
    assert data.x.shape == (expected, 1, 40) and data.x.dtype == np.float32 and data.num_classes == 10
    assert np.bincount(data.y).tolist() == [expected // 10] * 10


def test_synthetic_sample_count():
    assert len(load_dataset(DataConfig(name="synthetic"), seed=0)) == 2000
    assert load_dataset(DataConfig(name="synthetic", samples=50), seed=0).x.shape == (50, 1, 32)


def _write(path, x, y, **options):
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x, **options)
        f["y"] = y
    return str(path)


def test_hdf5_integer_samples_keep_their_dtype(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(20, 1, 4, 4), dtype=np.uint8)
    data = load_dataset(DataConfig(name="hdf5", path=_write(tmp_path / "u8.h5", x, np.arange(20) % 2)), seed=0)
    assert data.x.dtype == np.uint8 and np.array_equal(data.x, x)
    assert as_samples(np.zeros((3, 5), np.float16)).dtype == np.float32
    assert as_samples(np.zeros((3, 5), np.int16)).shape == (3, 1, 5)


@pytest.mark.parametrize("x", [
    np.random.default_rng(1).normal(size=(300, 2, 5)),                              # float64 -> float32
    np.random.default_rng(2).integers(0, 255, size=(300, 7), dtype=np.uint8),       # (N, F) -> (N, 1, F), uint8
])
@pytest.mark.parametrize("chunked", [False, True])
def test_read_rows_equals_fancy_indexing(tmp_path, monkeypatch, x, chunked):
    options = {"chunks": (16, *x.shape[1:]), "compression": "gzip"} if chunked else {}
    path = _write(tmp_path / "d.h5", x, np.arange(300) % 3, **options)
    expected = as_samples(x)
    gen = np.random.default_rng(3)
    cases = [np.arange(300), np.arange(40, 90), np.sort(gen.choice(300, 77, replace=False)),
             np.sort(gen.choice(300, 3, replace=False)), gen.integers(0, 300, 50), np.array([299, 0, 5, 5]),
             np.array([], dtype=np.int64)]
    for cost, span, fancy in ((32 << 10, 64 << 20, 32768), (0, 64 << 20, 2), (10**9, 100, 32768)):   # every path
        monkeypatch.setattr(datasets, "RUN_COST_BYTES", cost)
        monkeypatch.setattr(datasets, "MAX_SPAN_BYTES", span)
        monkeypatch.setattr(datasets, "FANCY_ROWS", fancy)
        for rows in cases:
            got = read_rows(path, rows)
            assert got.dtype == expected.dtype and got.shape == (len(rows), *expected.shape[1:])
            assert np.array_equal(got, expected[rows])


def test_read_groups_merge_nearby_runs():
    groups = list(datasets._read_groups([0, 1, 2, 4, 5, 100, 101, 5000], 1000))
    assert groups == [(0, 5), (5, 7), (7, 8)]   # gap of 1 row merged; far runs apart


def test_read_rows_errors_name_the_file(tmp_path):
    path = _write(tmp_path / "d.h5", np.zeros((10, 3)), np.arange(10) % 2)
    with pytest.raises(HpcfedError, match="d.h5' has 10 rows here but row 10 was asked for") as info:
        read_rows(path, np.array([1, 10]))
    assert "\n" not in str(info.value)
    with pytest.raises(HpcfedError, match="rows must be a 1-D integer array"):
        read_rows(path, np.array([0.5]))
    bad = tmp_path / "text.h5"
    bad.write_text("not hdf5")
    with pytest.raises(HpcfedError, match=f"data.path: '{bad}' is not a readable HDF5 file"):
        read_rows(str(bad), np.array([0]))
    with pytest.raises(HpcfedError, match="missing.h5' is not a readable HDF5 file"):
        read_rows(str(tmp_path / "missing.h5"), np.array([0]))


def test_load_labels_reads_no_samples(tmp_path):
    raw = tmp_path / "x.bin"
    np.arange(60, dtype=np.float64).tofile(raw)
    path = tmp_path / "external.h5"
    with h5py.File(path, "w") as f:   # 'x' lives in a raw file that is deleted: any read of 'x' fails
        f.create_dataset("x", shape=(10, 6), dtype=np.float64, external=[(str(raw), 0, 480)])
        f["y"] = np.arange(10) % 3
    assert np.array_equal(read_rows(str(path), np.array([1])), [[np.arange(6, 12, dtype=np.float32)]])
    raw.unlink()
    with pytest.raises(HpcfedError, match="not a readable HDF5 file"):
        read_rows(str(path), np.array([1]))
    labels = load_labels(DataConfig(name="hdf5", path=str(path), read="index"), seed=0)
    assert labels.sample_shape == (1, 6) and labels.x_dtype == np.float32 and labels.num_classes == 3
    assert labels.y.dtype == np.int64 and np.array_equal(labels.ids, np.arange(10)) and len(labels) == 10


def test_label_splits_match_dataset_splits(tmp_path):
    x = np.random.default_rng(0).integers(0, 9, size=(120, 1, 3, 3), dtype=np.int32)
    path = _write(tmp_path / "d.h5", x, np.arange(120) % 4)
    cfg = DataConfig(name="hdf5", path=path, read="index")
    data, labels = load_dataset(cfg, 0), load_labels(cfg, 0)
    assert isinstance(labels, Labels) and labels.sample_shape == data.sample_shape and labels.x_dtype == np.int32
    (train, test), (ltrain, ltest) = train_test_split(data, 0.25, 7), train_test_split(labels, 0.25, 7)
    (shared, rest), (lshared, lrest) = carve(train, 0.1, 7, "shared-set"), carve(ltrain, 0.1, 7, "shared-set")
    for whole, part in ((test, ltest), (shared, lshared), (rest, lrest)):
        assert np.array_equal(whole.ids, part.ids) and np.array_equal(whole.y, part.y)
        assert np.array_equal(read_rows(path, part.ids), whole.x)
    assert [len(i) for i in split_indices(120, 0.25, 7)] == [90, 30]
    with pytest.raises(HpcfedError, match="data.read: 'index' needs data.name 'hdf5'"):
        load_labels(DataConfig(), 0)


DATA_FACTORIES = """
import numpy as np
import torch
from torch.utils.data import Dataset

def arrays(seed, n=40, scale=1.0):
    gen = np.random.default_rng(seed)
    return gen.normal(size=(n, 6)) * scale, list(np.arange(n) % 3)

def tensors():
    return torch.zeros(12, 2, 4, 4, dtype=torch.uint8), torch.arange(12) % 2

class Pairs(Dataset):
    def __init__(self, n):
        self.n = n
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        return torch.full((1, 5), float(i)), i % 4

def pairs(n=16):
    return Pairs(n)

def three():
    return 1, 2, 3

def number():
    return 7

def raises():
    raise RuntimeError("no data here")

class NotPairs(Pairs):
    def __getitem__(self, i):
        return {"x": i}

class Ragged(Pairs):
    def __getitem__(self, i):
        return torch.zeros(i % 2 + 1), 0

def not_pairs():
    return NotPairs(5)

def ragged():
    return Ragged(5)

def float_labels():
    return np.zeros((8, 3)), np.full(8, 0.5)

def strings():
    return np.array([["a"]] * 8), np.zeros(8, int)

def too_few():
    return np.zeros((3, 3)), np.zeros(3, int)
"""
_COUNTER = itertools.count()


@pytest.fixture
def data_plugin(tmp_path, monkeypatch):
    name = f"user_data_factories_{next(_COUNTER)}"
    (tmp_path / f"{name}.py").write_text(DATA_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_data_factory_arrays_and_datasets(data_plugin):
    data = load_dataset(DataConfig(name=f"{data_plugin}:arrays", kwargs={"n": 30}), seed=5)
    again = load_dataset(DataConfig(name=f"{data_plugin}:arrays", kwargs={"n": 30}), seed=5)
    other = load_dataset(DataConfig(name=f"{data_plugin}:arrays", kwargs={"n": 30}), seed=6)
    assert data.x.shape == (30, 1, 6) and data.x.dtype == np.float32 and data.num_classes == 3
    assert np.array_equal(data.x, again.x) and not np.array_equal(data.x, other.x)   # seed= is passed
    tensors = load_dataset(DataConfig(name=f"{data_plugin}:tensors"), seed=0)
    assert tensors.x.dtype == np.uint8 and tensors.x.shape == (12, 2, 4, 4) and tensors.y.dtype == np.int64
    pairs = load_dataset(DataConfig(name=f"{data_plugin}:pairs", kwargs={"n": 9}), seed=0)
    assert pairs.x.shape == (9, 1, 5) and pairs.x[4, 0, 0] == 4.0 and pairs.y.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert np.array_equal(pairs.ids, np.arange(9))


@pytest.mark.parametrize("attr, message", [
    ("missing", "has no attribute 'missing'"),
    ("three", r"the factory returned 3 items; expected \(x, y\)"),
    ("number", r"the factory returned a int; expected \(x, y\) arrays or a map-style torch Dataset"),
    ("raises", "the factory raised RuntimeError: no data here"),
    ("not_pairs", r"dataset\[0\] is a dict; expected a \(sample, label\) pair"),
    ("ragged", "samples have different shapes"),
    ("float_labels", "'y' must hold non-negative integer class labels"),
    ("strings", "'x' must hold numbers"),
    ("too_few", "needs at least 4 samples"),
])
def test_bad_data_factories_are_one_line_naming_data_name(data_plugin, attr, message):
    with pytest.raises(HpcfedError, match=message) as info:
        load_dataset(DataConfig(name=f"{data_plugin}:{attr}"), seed=0)
    assert str(info.value).startswith(f"data.name '{data_plugin}:{attr}': ") and "\n" not in str(info.value)


def test_unimportable_data_module_is_named():
    with pytest.raises(HpcfedError, match="data.name 'no_such_data_q7:f': cannot import module 'no_such_data_q7' "
                                          r"\(ModuleNotFoundError"):
        load_dataset(DataConfig(name="no_such_data_q7:f"), seed=0)


@pytest.mark.parametrize("override, message", [
    ("data.read=index", "data.read: 'index' needs data.name 'hdf5' \\(got data.name 'digits'\\)"),
    ("data.kwargs={n: 3}", "data.kwargs: only used with an import-path data.name"),
    ("data.name=cifar", "data.name: Input should be 'digits', 'mnist1d', 'hdf5' or 'synthetic', or an import path"),
    ("data.read=both", "data.read"),
    ("data.samples=3", "data.samples"),
])
def test_bad_data_config_is_one_line(override, message):
    with pytest.raises(HpcfedError, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_example_data_factory(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))
    data = load_dataset(DataConfig(name="user_data:noisy_digits", kwargs={"noise": 0.1}), seed=0)
    assert data.x.shape == (1797, 1, 8, 8) and data.x.dtype == np.float32 and data.num_classes == 10
    sys.modules.pop("user_data", None)
