"""Time per step of a compressed `sync` run against a dense one, end to end under mpiexec, in the same run.

The issue's setting: `mpiexec -n 5` (4 workers), the digits CNN widened to 4.26M parameters
(`model.hidden: 4096`), 30 steps; dense and compressed runs alternate, one pair per seed (`--seeds`),
and the table shows medians, with rank 0's phases per step from the trace (unpack/decode, aggregate,
encode, apply) and the test accuracy of every run (mean ± std over the seeds).

    python benchmarks/compressed_step.py [--seeds 0 1 2] [--steps 30] [--hidden 4096] [--workers 4]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from common import markdown_table, run_hpcfed, save_json

PHASES = ("t_wait", "t_decode", "t_aggregate", "t_encode", "t_apply")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    base = [f"model.hidden={args.hidden}", f"train.steps={args.steps}", f"train.eval_every={args.steps}",
            "checkpoint.every=0"]
    settings = {"dense": ["compression.enabled=false"], "compressed": ["compression.enabled=true"]}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for seed in args.seeds:
        for name, extra in settings.items():
            runs[name].append(run_hpcfed(args.workers + 1, [*base, f"seed={seed}", *extra], phases=PHASES))
    rows, summary = [], {}
    for name, results in runs.items():
        step = statistics.median(r["time_per_step_s"] for r in results)
        phases = {p: statistics.median(r["trace_phases"][p] for r in results) for p in PHASES}
        summary[name] = {"time_per_step_s": step, "phases": phases,
                         "accuracy": [r["final_accuracy"] for r in results],
                         "bytes_up_per_worker_step": results[0]["bytes_up_per_worker_step"]}
        rows.append([name, f"{step:.3f}", *(f"{phases[p]:.4f}" for p in PHASES),
                     " ".join(f"{100 * r['final_accuracy']:.2f}" for r in results),
                     f"{100 * np.mean(summary[name]['accuracy']):.2f} ± {100 * np.std(summary[name]['accuracy']):.2f}",
                     f"{results[0]['bytes_up_per_worker_step']:,.0f}"])
    ratio = summary["compressed"]["time_per_step_s"] / summary["dense"]["time_per_step_s"]
    print(markdown_table(["run", "s/step (median)", *(f"rank 0 {p[2:]} s" for p in PHASES), "test acc % (each)", "mean ± std %",
                          "up B/worker/step"], rows))
    print(f"compressed / dense time per step: {ratio:.2f}x "
          f"({args.workers} workers, hidden {args.hidden}, {args.steps} steps, seeds {args.seeds})")
    print(f"(json: {save_json('compressed_step', {'args': vars(args), 'summary': summary, 'ratio': ratio})})")


if __name__ == "__main__":
    main()
