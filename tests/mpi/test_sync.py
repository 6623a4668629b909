"""End-to-end runs of `hpcfed run` under mpiexec with 2-4 real ranks."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.datasets import load_digits

from conftest import REPO, run_mpi
from hpcfed.codec import dct

pytestmark = pytest.mark.mpi
SMALL = ["--set", "train.steps=12", "--set", "train.eval_every=4"]


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_replicas_stay_bit_identical(tmp_path, ranks):
    result = run_mpi(ranks, ["run", *SMALL, "--set", f"output.dir={tmp_path}"], timeout=120)
    assert result.returncode == 0, result.stderr
    summary = summary_of(tmp_path)
    assert summary["replicas_identical"] and len(summary["param_hashes"]) == ranks
    assert len(set(summary["param_hashes"])) == 1
    assert summary["bytes_up"] == (ranks - 1) * 12 * summary["dense_bytes_per_step"]
    assert (tmp_path / "config.yaml").read_text().startswith("seed: 0")
    assert "[rank 0] step 12/12" in result.stderr


def test_same_seed_same_result_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        result = run_mpi(3, ["run", *SMALL, "--set", f"seed={seed}", "--set", f"output.dir={out}"], timeout=120)
        assert result.returncode == 0, result.stderr
        runs[name] = summary_of(out)
    for key in ("param_hashes", "final_accuracy", "bytes_up", "bytes_down"):
        assert runs["a"][key] == runs["b"][key]
    assert runs["a"]["param_hashes"] != runs["c"]["param_hashes"]


def test_quickstart_reaches_95_percent(tmp_path):
    result = run_mpi(4, ["run", "--set", f"output.dir={tmp_path}"], timeout=300)
    assert result.returncode == 0, result.stderr
    summary = summary_of(tmp_path)
    assert summary["final_accuracy"] >= 0.95 and summary["replicas_identical"]


def test_hdf5_data_config(tmp_path):
    digits = load_digits()
    data = tmp_path / "digits.h5"
    with h5py.File(data, "w") as f:
        f["x"] = digits.data.astype(np.float32) / 16
        f["y"] = digits.target
    out = tmp_path / "run"
    result = run_mpi(3, ["run", str(REPO / "configs" / "hdf5-data.yaml"), "--set", f"data.path={data}",
                         "--set", "train.steps=150", "--set", f"output.dir={out}"], timeout=180)
    assert result.returncode == 0, result.stderr
    assert summary_of(out)["final_accuracy"] > 0.85


@pytest.mark.parametrize("args, expected", [
    (["--set", "train.lr=-1"], "train.lr"),
    (["--set", "train.bogus=1"], "unknown key 'train.bogus'"),
    (["BROKEN_YAML"], "YAML syntax error"),
    (["--set", "data.name=hdf5", "--set", "data.path=missing.h5"], "data.path: file 'missing.h5' not found"),
    (["missing.yaml"], "file 'missing.yaml' not found"),
])
def test_bad_input_gives_one_line_and_status_2(tmp_path, args, expected):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {lr: 0.1\n")
    args = [str(broken) if a == "BROKEN_YAML" else a for a in args]
    result = run_mpi(3, ["run", *args, "--set", f"output.dir={tmp_path / 'out'}"], timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_one_rank_is_told_how_to_launch():
    result = run_mpi(1, ["run"], timeout=60)
    assert result.returncode == 2 and "mpiexec -n 4 python -m mpi4py -m hpcfed run" in result.stderr


def test_worker_failure_ends_the_job_promptly(tmp_path):
    # the no-hang bound is run_mpi's timeout (it fails the test if the job outlives it, start-up included);
    # what happened is asserted below, not how long it took
    script = str(Path(__file__).with_name("crash_worker.py"))
    result = run_mpi(4, [script, "run", "--set", "train.steps=1000", "--set", f"output.dir={tmp_path}"],
                     timeout=60, module=False, env={"PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    assert "injected failure at step 5" in result.stderr
    assert not (tmp_path / "summary.json").exists()


def test_info_reports_cuda_aware_decision():
    result = run_mpi(2, ["info"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "world size      2" in result.stdout and "CUDA-aware MPI  no (" in result.stdout
    assert f"CPU block DCT   {dct.fused_kind()}" in result.stdout
    forced = run_mpi(2, ["info"], timeout=60, env={"HPCFED_CUDA_AWARE": "1"})
    assert "CUDA-aware MPI  yes (set by HPCFED_CUDA_AWARE=1)" in forced.stdout
