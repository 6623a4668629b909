"""Data loading, splits and flat models (no MPI)."""

import h5py
import numpy as np
import pytest
import torch

from hpcfed.config import DataConfig, ModelConfig
from hpcfed.data.datasets import load_dataset, train_test_split
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
