"""Shared test helpers: launch real MPI ranks under mpiexec with a timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class MpiResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def mpiexec() -> str:
    """The mpiexec that belongs to this Python environment (the MPICH wheel's), else PATH's."""
    candidate = Path(sys.executable).with_name("mpiexec")
    return str(candidate) if candidate.exists() else "mpiexec"


def run_mpi(n: int, args: list[str], *, timeout: float = 120, cwd: Path | None = None,
            env: dict[str, str] | None = None, module: bool = True) -> MpiResult:
    """Run ``mpiexec -n N python -m mpi4py -m hpcfed ARGS`` (or a script when module=False).

    Fails the test (instead of hanging) when the job outlives ``timeout`` seconds.
    """
    import time

    target = ["-m", "hpcfed", *args] if module else list(args)
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py", *target]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd or REPO, env=full_env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpiexec and every rank it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"MPI job hung for more than {timeout}s: {' '.join(cmd)}\n"
                    f"stdout: {stdout[-3000:]}\nstderr: {stderr[-3000:]}")
    return MpiResult(proc.returncode, stdout, stderr, time.monotonic() - start)


@pytest.fixture
def mpirun():
    """The :func:`run_mpi` launcher as a fixture."""
    return run_mpi
