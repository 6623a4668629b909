"""Checkpoints, graceful stop, resume, crash recovery and the trace, with real ranks and real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import matplotlib.image
import pytest

from conftest import REPO, mpiexec, run_mpi

pytestmark = pytest.mark.mpi
EXIT_RESUMABLE = 75
# compression with error feedback, 3 workers; the straggler fault only slows steps (it changes no math)
RUN = ["--set", "train.steps=40", "--set", "train.eval_every=10", "--set", "compression.enabled=true",
       "--set", "checkpoint.every=10"]
SLOW = ["--set", "faults.stragglers.ranks=[1,2,3]", "--set", "faults.stragglers.delay_s=0.15"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def start(args: list[str]) -> subprocess.Popen:
    cmd = [mpiexec(), "-n", "4", sys.executable, "-m", "mpi4py", "-m", "hpcfed", "run", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def rank_pids(run_dir: Path) -> list[int]:
    """PIDs of the Python ranks of the job writing to ``run_dir``."""
    out = subprocess.run(["pgrep", "-f", f"^{sys.executable} -m mpi4py -m hpcfed run.*{run_dir}"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("job hung")
    return proc.returncode, stderr


def test_stop_and_resume_is_bit_identical(tmp_path):
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    result = run_mpi(4, ["run", *RUN, "--set", f"output.dir={whole}"], timeout=180)
    assert result.returncode == 0, result.stderr

    proc = start([*RUN, *SLOW, "--set", f"output.dir={parted}"])
    wait_for(lambda: (parted / "checkpoints" / "step_00000010.h5").exists(), 120, "the first checkpoint")
    worker = rank_pids(parted)[-1]
    os.kill(worker, signal.SIGTERM)                       # one rank gets the signal, as under Slurm
    status, stderr = finish(proc)
    assert status == EXIT_RESUMABLE, stderr
    assert "stopped at step" in stderr and not (parted / "summary.json").exists()

    resumed = run_mpi(4, ["run", "--resume", str(parted)], timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert summary(parted)["param_hashes"] == summary(whole)["param_hashes"]
    assert summary(parted)["bytes_up"] == summary(whole)["bytes_up"]
    with h5py.File(parted / "trace.h5", "r") as trace:
        steps = trace["steps/step"][:]
        kinds = {bytes(k).rstrip(b"\0").decode() for k in trace["events"]["kind"]}
    assert list(steps) == list(range(1, 41)) and {"checkpoint", "stop", "resume"} <= kinds


def test_compressed_batchnorm_run_resumes_bit_identically(tmp_path):
    """BatchNorm buffers travel as fp16 changes when compressed; the checkpoint holds the synced ones."""
    model = ["--set", "model.name=resnet", "--set", "model.depth=8", "--set", "model.hidden=16", "--set",
             "compression.enabled=true", "--set", "checkpoint.every=10", "--set", "train.eval_every=100"]
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    for out, steps in ((whole, 20), (parted, 10)):
        result = run_mpi(3, ["run", *model, "--set", f"train.steps={steps}", "--set", f"output.dir={out}"],
                         timeout=240)
        assert result.returncode == 0, result.stderr
    (parted / "summary.json").unlink()
    resumed = run_mpi(3, ["run", "--resume", str(parted), "--set", "train.steps=20"], timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert summary(parted)["param_hashes"] == summary(whole)["param_hashes"] and summary(whole)["replicas_identical"]


def test_killed_worker_ends_job_and_checkpoint_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = start([*RUN, *SLOW, "--set", f"output.dir={run_dir}"])
    wait_for(lambda: (run_dir / "checkpoints" / "step_00000010.h5").exists(), 120, "the first checkpoint")
    killed_at = time.monotonic()
    os.kill(rank_pids(run_dir)[-1], signal.SIGKILL)
    status, _ = finish(proc, timeout=60)
    assert status != 0 and time.monotonic() - killed_at < 30
    resumed = run_mpi(4, ["run", "--resume", str(run_dir)], timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert summary(run_dir)["replicas_identical"] and summary(run_dir)["steps"] == 40


def test_truncated_checkpoint_falls_back_with_a_warning(tmp_path):
    run_dir = tmp_path / "run"
    result = run_mpi(4, ["run", *RUN, "--set", "train.steps=30", "--set", f"output.dir={run_dir}"], timeout=180)
    assert result.returncode == 0, result.stderr
    newest = run_dir / "checkpoints" / "step_00000030.h5"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (run_dir / "summary.json").unlink()
    resumed = run_mpi(4, ["run", "--resume", str(run_dir), "--set", "train.steps=35"], timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "step_00000030.h5" in resumed.stderr and "warning" in resumed.stderr
    assert "resuming" in resumed.stderr and "step_00000020.h5" in resumed.stderr
    assert summary(run_dir)["resumed_from_step"] == 20


def test_resume_refuses_a_changed_model(tmp_path):
    run_dir = tmp_path / "run"
    assert run_mpi(3, ["run", *RUN, "--set", "train.steps=10", "--set", f"output.dir={run_dir}"],
                   timeout=120).returncode == 0
    refused = run_mpi(3, ["run", "--resume", str(run_dir), "--set", "model.name=mlp"], timeout=60)
    assert refused.returncode == 2
    assert "config key 'model.name' differs from the checkpoint" in refused.stderr
    other_world = run_mpi(4, ["run", "--resume", str(run_dir)], timeout=60)
    assert other_world.returncode == 2 and "written by 3 ranks" in other_world.stderr


def test_trace_is_plain_hdf5_and_report_plots_it(tmp_path):
    run_dir = tmp_path / "run"
    assert run_mpi(4, ["run", *RUN, "--set", f"output.dir={run_dir}"], timeout=180).returncode == 0
    with h5py.File(run_dir / "trace.h5", "r") as trace:
        assert trace["steps/bytes_up"].shape == (40,) and trace["workers/arrival_s"].shape == (40, 3)
        assert "compression" in trace.attrs["config"].decode()
    if shutil.which("h5dump"):
        dump = subprocess.run(["h5dump", "-H", str(run_dir / "trace.h5")], capture_output=True, text=True)
        assert dump.returncode == 0 and "/steps" in dump.stdout.replace('GROUP "steps"', "/steps")
    report = run_mpi(1, ["report", str(run_dir), "--out", str(tmp_path / "plots")], timeout=120)
    assert report.returncode == 0, report.stderr
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) >= 4
    for png in pngs:
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
