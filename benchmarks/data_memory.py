"""Rank 0's peak memory with a large uint8 HDF5 data set: blocks shipped by rank 0 against index mode.

Writes a uint8 HDF5 file of about ``--gb`` GB (N x 1 x 64 x 64 images, 10 classes) and a tiny one
of the same layout, runs 5 `mlp` steps on 3 ranks with `data.read: ship` and `data.read: index`, and
reports every run's peak RSS of rank 0 (from summary.json), with the tiny file's as the baseline
measured in the same run. The test split is 1% (rank 0 reads those rows itself in both modes).

    python benchmarks/data_memory.py [--gb 2.0] [--keep FILE]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import h5py
import numpy as np

from common import markdown_table, run_hpcfed, save_json

SHAPE = (1, 64, 64)


def write(path: Path, rows: int) -> None:
    """uint8 images in chunks of 10k rows (never all in memory), labels 0..9."""
    gen = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        x = f.create_dataset("x", (rows, *SHAPE), dtype=np.uint8, chunks=(256, *SHAPE))
        for start in range(0, rows, 10_000):
            stop = min(rows, start + 10_000)
            x[start:stop] = gen.integers(0, 256, size=(stop - start, *SHAPE), dtype=np.uint8)
        f["y"] = gen.integers(0, 10, size=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    args = parser.parse_args()
    rows = int(args.gb * 1e9 / np.prod(SHAPE))
    results, table = {}, []
    with tempfile.TemporaryDirectory(dir=".") as folder:
        big, tiny = Path(folder, "big.h5"), Path(folder, "tiny.h5")
        write(big, rows)
        write(tiny, 2000)
        base = ["data.name=hdf5", "data.test_fraction=0.01", "model.name=mlp", "train.steps=5", "train.eval_every=5",
                "checkpoint.every=0"]
        for name, path, read in (("tiny file", tiny, "ship"), ("big, ship", big, "ship"),
                                 ("big, index", big, "index")):
            summary = run_hpcfed(3, [*base, f"data.path={path.resolve()}", f"data.read={read}"])
            results[name] = {"peak_rss_mb": summary["peak_rss_mb"], "bytes_data": summary["bytes_data"]}
    baseline = results["tiny file"]["peak_rss_mb"][0]
    for name, r in results.items():
        table.append([name, f"{r['peak_rss_mb'][0]:.0f}", f"{r['peak_rss_mb'][0] - baseline:+.0f}",
                      f"{max(r['peak_rss_mb'][1:]):.0f}", f"{r['bytes_data'] / 1e6:.1f}"])
    print(f"{rows:,} x {SHAPE} uint8 = {rows * np.prod(SHAPE) / 1e9:.2f} GB; 3 ranks (2 workers), mlp, 5 steps")
    print(markdown_table(["run", "rank 0 peak RSS MB", "vs tiny file MB", "largest worker RSS MB",
                          "start-up data sent MB"], table))
    print(f"(json: {save_json('data_memory', {'rows': rows, 'results': results})})")


if __name__ == "__main__":
    main()
