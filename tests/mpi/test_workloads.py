"""The user's own model (with BatchNorm) and data under real ranks: accuracy, identical replicas with
buffers, bit-identical resume, HDF5 index mode, torchvision models, and one-line errors on every rank."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.datasets import load_digits

from conftest import REPO, run_mpi

pytestmark = pytest.mark.mpi

USER_MODEL = '''
from torch import nn

def bn_cnn(sample_shape, num_classes, width=16):
    """conv-BN-ReLU x2, pool, linear: a model whose running statistics must be synchronised."""
    return nn.Sequential(nn.Conv2d(sample_shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, num_classes))
'''


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def user_env(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "usercode"
    folder.mkdir(exist_ok=True)
    (folder / "my_models.py").write_text(USER_MODEL)
    return {"PYTHONPATH": f"{folder}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def test_user_batchnorm_model_trains_with_identical_replicas_and_resumes_bit_identically(tmp_path):
    env = user_env(tmp_path)
    model = ["--set", "model.name=my_models:bn_cnn", "--set", "train.eval_every=100"]
    whole = tmp_path / "whole"
    result = run_mpi(4, ["run", *model, "--set", f"output.dir={whole}"], timeout=400, env=env)
    assert result.returncode == 0, result.stderr
    done = summary(whole)
    assert done["final_accuracy"] >= 0.95 and done["replicas_identical"], done["final_accuracy"]
    with h5py.File(whole / "model.h5", "r") as saved:
        assert any("running_mean" in name for name in saved["params"])
    # stop at a checkpoint (train.steps=150 writes one at 150; the summary is removed), then resume to 300
    parted = tmp_path / "parted"
    first = run_mpi(4, ["run", *model, "--set", "train.steps=150", "--set", f"output.dir={parted}"],
                    timeout=400, env=env)
    assert first.returncode == 0, first.stderr
    (parted / "summary.json").unlink()
    resumed = run_mpi(4, ["run", "--resume", str(parted), "--set", "train.steps=300"], timeout=400, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert summary(parted)["param_hashes"] == done["param_hashes"]


def test_hdf5_index_mode_gives_the_parameters_of_shipped_blocks(tmp_path):
    digits = load_digits()
    data = tmp_path / "digits_uint8.h5"
    with h5py.File(data, "w") as f:
        f["x"] = digits.images[:, None].astype(np.uint8)   # stays uint8 until a batch is formed
        f["y"] = digits.target
    hashes, sent = {}, {}
    for read in ("ship", "index"):
        out = tmp_path / read
        result = run_mpi(4, ["run", "--set", "data.name=hdf5", "--set", f"data.path={data}", "--set",
                             f"data.read={read}", "--set", "train.steps=40", "--set", "coding.enabled=true",
                             "--set", f"output.dir={out}"], timeout=240)
        assert result.returncode == 0, result.stderr
        hashes[read], sent[read] = summary(out)["param_hashes"], summary(out)["bytes_data"]
    assert hashes["index"] == hashes["ship"] and len(set(hashes["index"])) == 1
    assert sent["index"] * 4 < sent["ship"]   # row ids + labels (16 B a row) instead of 64 B images + labels


def test_index_mode_names_the_rank_that_cannot_read_the_file(tmp_path):
    digits = load_digits()
    data = tmp_path / "digits.h5"
    with h5py.File(data, "w") as f:
        f["x"] = digits.images[:, None].astype(np.float32)
        f["y"] = digits.target
    probe = tmp_path / "probe.py"   # rank 2 cannot open the file, as on a node without the shared file system
    probe.write_text("import h5py, runpy, sys\nfrom mpi4py import MPI\n"
                     "if MPI.COMM_WORLD.Get_rank() == 2:\n"
                     "    real = h5py.File\n"
                     "    def File(name, *args, **kwargs):\n"
                     f"        if str(name) == {str(data)!r}:\n"
                     "            raise OSError('Unable to open file (file not found on this node)')\n"
                     "        return real(name, *args, **kwargs)\n"
                     "    h5py.File = File\n"
                     "sys.argv = ['hpcfed', *sys.argv[1:]]\nrunpy.run_module('hpcfed', run_name='__main__')\n")
    result = run_mpi(4, [str(probe), "run", "--set", "data.name=hdf5", "--set", f"data.path={data}", "--set",
                         "data.read=index", "--set", "train.steps=5", "--set", f"output.dir={tmp_path / 'out'}"],
                     timeout=120, module=False, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "rank 2 on" in errors[0] and "digits.h5" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("name, expected", [
    ("no_such_module:f", "cannot import"),
    ("my_models:missing", "missing"),
    ("my_models:bn_cnn", None),
])
def test_model_import_errors_are_one_line_on_every_rank(tmp_path, name, expected):
    if expected is None:   # a factory whose forward fails on the data's sample shape
        name, expected = "my_models:bn_cnn", "model.name 'my_models:bn_cnn'"
        args = ["--set", "data.name=synthetic"]   # 1 x 32 samples: a Conv2d model cannot take them
    else:
        args = []
    result = run_mpi(4, ["run", "--set", f"model.name={name}", *args, "--set", f"output.dir={tmp_path / 'o'}"],
                     timeout=120, env=user_env(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="torchvision is not installed (pip install 'hpcfed[vision]')")
def test_torchvision_resnet18_runs_a_few_steps(tmp_path):
    gen = np.random.default_rng(0)
    data = tmp_path / "images.h5"
    with h5py.File(data, "w") as f:
        f["x"] = gen.integers(0, 255, size=(96, 3, 32, 32), dtype=np.uint8)
        f["y"] = gen.integers(0, 10, size=96)
    out = tmp_path / "out"
    result = run_mpi(3, ["run", "--set", "model.name=torchvision.models:resnet18", "--set",
                         "model.kwargs={num_classes: 10}", "--set", "data.name=hdf5", "--set", f"data.path={data}",
                         "--set", "train.steps=3", "--set", "train.batch_size=4", "--set", f"output.dir={out}"],
                     timeout=400)
    assert result.returncode == 0, result.stderr
    assert summary(out)["replicas_identical"]

