"""Time per step of hpcfed `sync` (dense fp32) against PyTorch DDP (gloo), measured in the same run.

Same model, data, batch per worker, optimizer and number of workers. hpcfed runs W
workers plus its rank-0 server (W + 1 processes); DDP runs W processes (allreduce).

    python benchmarks/step_time.py [--workers 4] [--steps 200] [--quick]
"""

from __future__ import annotations

import argparse

from common import markdown_table, run_hpcfed, save_json
from ddp_reference import run_ddp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 steps, 2 workers")
    args = parser.parse_args()
    steps, worker_counts = (30, [2]) if args.quick else (args.steps, args.workers)
    overrides = [f"train.steps={steps}", f"train.eval_every={steps}"]
    rows, results = [], []
    for workers in worker_counts:
        ddp = run_ddp(workers, None, overrides)
        ours = run_hpcfed(workers + 1, overrides)
        ratio = ours["time_per_step_s"] / ddp["time_per_step_s"]
        results.append({"workers": workers, "steps": steps, "ddp": ddp, "hpcfed": {
            k: ours[k] for k in ("time_per_step_s", "final_accuracy", "bytes_up_per_worker_step")}})
        rows.append([workers, steps, f"{1e3 * ddp['time_per_step_s']:.2f}", f"{1e3 * ours['time_per_step_s']:.2f}",
                     f"{ratio:.2f}x", f"{100 * ddp['final_accuracy']:.2f}", f"{100 * ours['final_accuracy']:.2f}"])
    print(markdown_table(["workers", "steps", "DDP gloo ms/step", "hpcfed sync ms/step", "hpcfed / DDP",
                          "DDP acc %", "hpcfed acc %"], rows))
    print(f"(json: {save_json('step_time', results)})")


if __name__ == "__main__":
    main()
