"""The three transfer paths and both ways of waiting under real mpiexec on CPU ranks, and device errors."""

import json

import h5py
import pytest
import torch

from conftest import run_mpi
from hpcfed.codec import dct
from hpcfed.io import read_attrs

pytestmark = pytest.mark.mpi
RUN = ["run", "--set", "train.steps=12", "--set", "train.eval_every=6", "--set", "compression.enabled=true",
       "--set", "compression.warmup_steps=2", "--set", "compression.refresh_every=4"]


def _runs(tmp_path, key, values):
    """One short compressed run per value of the ``mpi`` setting ``key``: {value: (summary, trace attrs, devices)};
    every run must succeed with identical replicas."""
    runs = {}
    for value in values:
        out = tmp_path / value
        result = run_mpi(4, [*RUN, "--set", f"mpi.{key}={value}", "--set", f"output.dir={out}"], timeout=180)
        assert result.returncode == 0, result.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["replicas_identical"]
        with h5py.File(out / "trace.h5", "r") as trace:
            attrs = read_attrs(trace)
        runs[value] = summary, attrs, json.loads(attrs["devices"])
    return runs


def test_staged_and_direct_paths_train_bit_identically_to_host(tmp_path):
    runs = _runs(tmp_path, "transfer", ("host", "staged", "direct"))
    for transfer, (summary, attrs, devices) in runs.items():
        assert summary["kernel_bytes"] > 0
        assert len(devices) == 4 and all(f"transfer {transfer}" in d for d in devices)
        assert all(d.endswith(f"cpu dct {dct.fused_kind()})") for d in devices), devices
        assert not attrs["cuda_aware_mpi"] and "mpi_memory_alloc_kinds" in attrs["cuda_aware_reason"]
    assert len({summary["param_hashes"][0] for summary, _, _ in runs.values()}) == 1


def test_busy_and_sleeping_waits_train_bit_identically(tmp_path):
    """mpi.wait changes only how a rank waits: the same run ends with the same parameters, and the trace
    records each rank's mode (auto decides from ranks and CPUs of the node)."""
    runs = _runs(tmp_path, "wait", ("busy", "sleep", "auto"))
    for wait, (_, _, devices) in runs.items():
        expected = {"busy": "wait busy (set)", "sleep": "wait sleep (set)", "auto": "ranks on "}[wait]
        assert len(devices) == 4 and all(expected in d for d in devices), devices
    assert len({summary["param_hashes"][0] for summary, _, _ in runs.values()}) == 1


@pytest.mark.parametrize("transfer", ["staged", "direct"])
def test_coded_straggler_is_resynced_through_the_path(tmp_path, transfer):
    straggler = ["--set", "coding.enabled=true", "--set", "faults.stragglers.ranks=[2]",
                 "--set", "faults.stragglers.delay_s=1.0"]
    result = run_mpi(4, ["run", "--set", "train.steps=8", "--set", "train.eval_every=8", *straggler,
                         "--set", f"mpi.transfer={transfer}", "--set", f"output.dir={tmp_path}"], timeout=180)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resyncs"] >= 1 and summary["replicas_identical"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("args, expected", [
    (["--set", "device=cuda"], "device: cuda on rank 0: torch sees no CUDA GPU"),
    (["--set", "device=cpu", "--set", "server_device=cuda"], "server_device: cuda on rank 0: torch sees no CUDA GPU"),
    (["--set", "algorithm=fedavg", "--set", "device=cuda"], "device: cuda is supported by algorithm sync"),
    (["--set", "device=gpu"], "device"),
])
def test_device_errors_give_one_line_and_status_2(tmp_path, args, expected):
    result = run_mpi(3, ["run", *args, "--set", f"output.dir={tmp_path / 'out'}"], timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
