"""The sbatch scripts on a real one-node Slurm cluster, with configs/tiny.yaml.

- every script passes ``bash -n`` and ``shellcheck``;
- slurm/cpu.sbatch runs to COMPLETED and leaves trace.h5, checkpoints and summary.json (identical replicas);
- a run interrupted with USR1 (to the ranks for srun, to the batch shell for mpiexec) checkpoints, is
  requeued by its script, resumes, and ends with the same parameters as the uninterrupted run.

The cluster fixture runs ``.ci/start-slurm`` (installs and starts Slurm as root; a no-op when a node is
already up). It skips, with the reason, where Slurm cannot be had: not root, no apt-get and no Slurm,
or HPCFED_SKIP_SLURM=1. Every wait has a deadline; jobs left behind are cancelled by id.
Worker 1 sleeps 50 ms a step (timing only; the arithmetic is unchanged), so a run lasts a few seconds
and can be interrupted between its first checkpoint and its end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SHELL_SCRIPTS = [*sorted((REPO / "slurm").glob("*.sbatch")), REPO / ".ci" / "start-slurm"]
CONFIG = "configs/tiny.yaml"
STEPS = 120  # train.steps in configs/tiny.yaml
PACED = ("--set", "faults.stragglers.ranks=[1]", "--set", "faults.stragglers.delay_s=0.05")
RUN_S = 180  # one job attempt, queueing included (start-up of 3 ranks takes ~15 s on 2 busy cores)
# Slurm holds a requeued job for AuthInfo=cred_expire seconds: 15 with .ci/start-slurm's slurm.conf, 120 by default
REQUEUE_HOLD_S = 130
POLL_S = 0.2


@dataclass
class Job:
    """A submitted batch job: its id, its output file and its run directory."""

    id: str
    out: Path
    run_dir: Path

    def info(self) -> dict[str, str]:
        """``scontrol show job`` as key -> value ({} once Slurm has forgotten the job)."""
        proc = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True, text=True, timeout=30)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}

    def log(self) -> str:
        """The tail of the job's output file (all attempts: the scripts append)."""
        return self.out.read_text(errors="replace")[-4000:] if self.out.exists() else "(no output file yet)"

    def wait_for(self, condition: Callable[[dict[str, str]], bool], what: str, timeout_s: float) -> dict[str, str]:
        """Poll until ``condition(info)`` holds; fail with the job's state and log after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not condition(info := self.info()):
            if time.monotonic() > deadline:
                pytest.fail(f"job {self.id}: not {what} after {timeout_s:.0f}s (JobState={info.get('JobState')}, "
                            f"Reason={info.get('Reason')}, Restarts={info.get('Restarts')})\n--- log:\n{self.log()}")
            time.sleep(POLL_S)
        return info

    def wait_completed(self, timeout_s: float = RUN_S) -> dict[str, str]:
        """Wait (bounded) until the job has ended, and check that it ended COMPLETED."""
        info = self.wait_for(lambda i: i.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"),
                             "finished", timeout_s)
        assert info.get("JobState") == "COMPLETED", \
            f"job {self.id} ended {info.get('JobState')} (ExitCode={info.get('ExitCode')})\n--- log:\n{self.log()}"
        return info

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def traced_steps(self) -> np.ndarray:
        with h5py.File(self.run_dir / "trace.h5", "r") as trace:
            return trace["steps/step"][()]


def _node_ready() -> bool:
    if not shutil.which("sinfo"):
        return False
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout.split()
    return any(state in ("idle", "mixed", "allocated", "completing") for state in states)


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    """A Slurm cluster that takes jobs: the one running here, or one that .ci/start-slurm starts."""
    if os.environ.get("HPCFED_SKIP_SLURM") == "1":
        pytest.skip("HPCFED_SKIP_SLURM=1")
    if _node_ready():
        return
    if os.geteuid() != 0:
        pytest.skip("no Slurm running, and .ci/start-slurm needs root to install and start one")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("no Slurm installed and no apt-get to install it")
    proc = subprocess.run(["bash", str(REPO / ".ci" / "start-slurm")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f".ci/start-slurm failed (status {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")


@pytest.fixture(scope="module")
def sbatch(slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Job]]:
    """``sbatch(script, *args)`` submits ``slurm/<script>`` with 3 tasks from the repository root."""
    jobs: list[Job] = []
    folder = tmp_path_factory.mktemp("slurm")
    bin_dir = str(Path(sys.executable).parent)  # the job's `python` (and `mpiexec`) are this environment's

    def submit(script: str, *args: str) -> Job:
        # --time: the scripts ask for USR1 5 minutes before the limit, so a shorter limit signals at once
        name = f"hpcfed-test-{len(jobs)}"
        job = Job("", folder / f"{name}.out", folder / name)
        env = {key: value for key, value in os.environ.items() if not key.startswith("HPCFED_")}
        env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", HPCFED_RUN_DIR=str(job.run_dir))
        cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--output={job.out}", "--nodes=1", "--overcommit",
               "--ntasks=3", "--cpus-per-task=1", "--time=10", f"slurm/{script}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr.strip()}"
        job.id = proc.stdout.strip().split(";")[0]
        jobs.append(job)
        return job

    yield submit
    for job in jobs:
        subprocess.run(["scancel", job.id], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def uninterrupted(sbatch: Callable[..., Job]) -> Job:
    """slurm/cpu.sbatch with the tiny config, run to the end."""
    job = sbatch("cpu.sbatch", CONFIG, *PACED)
    job.wait_completed()
    return job


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_script_is_clean_shell(script: Path) -> None:
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (apt-get install -y shellcheck)")
    lint = subprocess.run(["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout


def test_cpu_job_completes_with_hdf5_outputs(uninterrupted: Job) -> None:
    info = uninterrupted.info()
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    summary = uninterrupted.summary()
    assert summary["replicas_identical"] and summary["world_size"] == 3 and summary["steps"] == STEPS
    assert (uninterrupted.run_dir / "checkpoints" / "latest").is_file()
    assert sorted((uninterrupted.run_dir / "checkpoints").glob("step_*.h5")), "no checkpoint file"
    steps = uninterrupted.traced_steps()
    assert len(steps) == STEPS and np.all(np.diff(steps) > 0), steps


@pytest.mark.parametrize("script, interrupt", [
    ("cpu.sbatch", ["--signal=USR1"]),                # Slurm signals the ranks (srun's tasks)
    ("mpiexec.sbatch", ["--batch", "--signal=USR1"]),  # the batch shell, which passes it on to mpiexec
], ids=["srun", "mpiexec"])
def test_interrupted_job_requeues_and_resumes_to_the_same_parameters(
        sbatch: Callable[..., Job], uninterrupted: Job, script: str, interrupt: list[str]) -> None:
    job = sbatch(script, CONFIG, *PACED)
    latest = job.run_dir / "checkpoints" / "latest"
    job.wait_for(lambda info: latest.exists() or info.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING"),
                 "checkpointed", RUN_S)
    assert latest.exists(), f"job ended before its first checkpoint\n--- log:\n{job.log()}"
    subprocess.run(["scancel", *interrupt, job.id], check=True, timeout=30)

    info = job.wait_for(lambda i: i.get("Restarts", "0") != "0" or i.get("JobState") not in ("RUNNING", "COMPLETING"),
                        "requeued", 90)
    assert info.get("Restarts") == "1" and not (job.run_dir / "summary.json").exists(), \
        f"job {job.id} was not requeued mid-run (JobState={info.get('JobState')})\n--- log:\n{job.log()}"
    info = job.wait_completed(REQUEUE_HOLD_S + RUN_S)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    log = job.log()
    assert "requeueing job" in log and f"--resume {job.run_dir}" in log, log
    summary = job.summary()
    assert summary["replicas_identical"]
    assert summary["param_hashes"] == uninterrupted.summary()["param_hashes"]
    np.testing.assert_array_equal(job.traced_steps(), uninterrupted.traced_steps())
