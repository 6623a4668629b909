"""Checkpoint write/read cost against plain np.save/np.load of the same bytes, measured in one run.

State per model: parameters + momentum buffer + 4 workers' codec residuals, all fp32 of the model's
size (the quickstart CNN has 151,306 parameters). hpcfed's write includes the CRC-32s, fsync of
file and folder, the `latest` pointer and pruning; its read verifies every checksum. The baselines
are np.save of one array holding the same bytes, without and with fsync, and np.load.

A second table runs the quickstart (4 ranks, 300 steps) with a checkpoint every 50 steps and
with checkpoints only at the end, and states the share of the run's training time the periodic
checkpoints cost (the target is under 5%).

    PYTHONPATH=. python benchmarks/checkpoint.py [--quick] [--out bench-out/checkpoint.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hpcfed.io.checkpoint import read_checkpoint, write_checkpoint

WORKERS = 4


def state(n_params: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"model/params": rng.standard_normal(n_params, dtype=np.float32),
              "optimizer/state/0/momentum_buffer": rng.standard_normal(n_params, dtype=np.float32)}
    for rank in range(1, WORKERS + 1):
        arrays[f"rank{rank}/codec/residual"] = rng.standard_normal(n_params, dtype=np.float32)
    return arrays


def median_time(fn: Callable[[int], object], reps: int) -> float:
    times = []
    for rep in range(reps):
        start = time.perf_counter()
        fn(rep)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def np_save(path: Path, data: np.ndarray, fsync: bool) -> None:
    with open(path, "wb") as f:
        np.save(f, data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def measure(name: str, n_params: int, reps: int, work: Path) -> dict[str, float | str | int]:
    arrays = state(n_params)
    flat = np.concatenate(list(arrays.values()))
    run = work / name
    write = median_time(lambda rep: write_checkpoint(run, rep + 1, arrays, {"config_hash": "x"}, keep=2), reps)
    path = run / "checkpoints" / f"step_{reps:08d}.h5"
    read = median_time(lambda rep: read_checkpoint(path), reps)
    npy = work / f"{name}.npy"
    save = median_time(lambda rep: np_save(npy, flat, fsync=False), reps)
    save_sync = median_time(lambda rep: np_save(npy, flat, fsync=True), reps)
    load = median_time(lambda rep: np.load(npy), reps)
    return {"model": name, "params": n_params, "state_bytes": flat.nbytes, "file_bytes": path.stat().st_size,
            "npy_bytes": npy.stat().st_size, "write_s": write, "np_save_s": save, "np_save_fsync_s": save_sync,
            "read_s": read, "np_load_s": load, "reps": reps}


def table(rows: list[dict]) -> str:
    lines = [("| model | params | state MB | file MB (npy MB) | write s | np.save s | x np.save | "
              "np.save+fsync s | x np.save+fsync | read+verify s | np.load s | x np.load |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['state_bytes'] / 1e6:.1f} | {r['file_bytes'] / 1e6:.2f} "
            f"({r['npy_bytes'] / 1e6:.2f}) | {r['write_s']:.4f} | {r['np_save_s']:.4f} | "
            f"{r['write_s'] / r['np_save_s']:.2f} | {r['np_save_fsync_s']:.4f} | "
            f"{r['write_s'] / r['np_save_fsync_s']:.2f} | {r['read_s']:.4f} | {r['np_load_s']:.4f} | "
            f"{r['read_s'] / r['np_load_s']:.2f} |")
    return "\n".join(lines)


def run_overhead(quick: bool) -> dict:
    """Training time of the quickstart with checkpoints every 50 steps vs. only at the end (median of runs)."""
    from common import markdown_table, run_hpcfed

    steps, repeats = (100, 1) if quick else (300, 3)
    times = {}
    for label, every in (("every 50 steps", 50), ("only at the end", 0)):
        runs = [run_hpcfed(4, [f"train.steps={steps}", f"checkpoint.every={every}"])["train_time_s"]
                for _ in range(repeats)]
        times[label] = statistics.median(runs)
    share = times["every 50 steps"] / times["only at the end"] - 1
    print(markdown_table(["quickstart, 4 ranks", "train time s (median)"],
                         [[k, f"{v:.2f}"] for k, v in times.items()]))
    print(f"\nperiodic checkpoints cost {100 * share:+.1f}% of the training time (target: < 5%)")
    return {"steps": steps, "repeats": repeats, "train_time_s": times, "overhead": share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, 1M instead of 10M")
    parser.add_argument("--out", default="bench-out/checkpoint.json", help="JSON results file")
    parser.add_argument("--dir", default=None, help="folder to write into (default: a temp folder)")
    args = parser.parse_args()
    models = [("quickstart", 151_306, 1 if args.quick else 7),
              ("1M" if args.quick else "10M", 1_000_000 if args.quick else 10_000_000, 1 if args.quick else 5)]
    work = Path(tempfile.mkdtemp(prefix="hpcfed-ckpt-", dir=args.dir))
    try:
        rows = [measure(name, n, reps, work) for name, n, reps in models]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    print()
    overhead = run_overhead(args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "checkpoint", "work_dir": str(work.parent), "rows": rows,
                               "run_overhead": overhead}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
