"""Shared by the benchmarks: launch hpcfed under mpiexec, read its summary, print and save tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py

REPO = Path(__file__).resolve().parents[1]


def mpiexec() -> str:
    candidate = Path(sys.executable).with_name("mpiexec")
    return str(candidate) if candidate.exists() else "mpiexec"


def run_hpcfed(ranks: int, overrides: list[str], config: str | None = None, timeout: float = 1800,
               phases: tuple[str, ...] = ()) -> dict:
    """One `hpcfed run` under mpiexec; returns its summary.json (raises with stderr on failure), with the
    trace's per-worker weights and the mean over steps of the trace columns named in ``phases``."""
    with tempfile.TemporaryDirectory() as out:
        args = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "hpcfed", "run"]
        args += [config] if config else []
        for item in [*overrides, f"output.dir={out}/run"]:
            args += ["--set", item]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"hpcfed run failed ({proc.returncode}): {proc.stderr[-2000:]}")
        summary = json.loads(Path(out, "run", "summary.json").read_text())
        with h5py.File(Path(out, "run", "trace.h5"), "r") as trace:   # per-worker weights (step x worker)
            summary["trace_weights"] = trace["workers/weight"][:]
            summary["trace_phases"] = {p: float(trace[f"steps/{p}"][:].mean()) for p in phases}
        return summary


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_json(name: str, data: object, out_dir: str = "bench-out") -> Path:
    path = REPO / out_dir / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
