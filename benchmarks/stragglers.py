"""Stragglers: time per step and final accuracy of wait-all, drop-stragglers and coded, plus straggler-free.

For each (workers, stragglers, split) it runs hpcfed `sync` on digits with the chosen
worker ranks sleeping D seconds every step. Coded runs use target k = W - stragglers.
Ratios are against the straggler-free wait-all run measured in the same invocation.

    python benchmarks/stragglers.py [--delay 0.2] [--steps 150] [--quick]
"""

from __future__ import annotations

import argparse

from common import markdown_table, run_hpcfed, save_json

SPLITS = {"iid": ["data.partition=iid"], "dirichlet(0.1)": ["data.partition=dirichlet", "data.alpha=0.1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--delay", type=float, default=0.2, help="D: seconds a straggler sleeps per step")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--settings", default="4:1,4:2,8:2", help="workers:stragglers pairs")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 workers, 1 straggler, 20 steps, iid")
    args = parser.parse_args()
    settings = [(4, 1)] if args.quick else [tuple(map(int, s.split(":"))) for s in args.settings.split(",")]
    splits = {"iid": SPLITS["iid"]} if args.quick else SPLITS
    steps = 20 if args.quick else args.steps
    rows, results = [], []
    for workers, n_slow in settings:
        slow = ",".join(str(rank) for rank in range(2, 2 + n_slow))
        fault = ["faults.stragglers.ranks=[" + slow + "]", f"faults.stragglers.delay_s={args.delay}"]
        coded = ["coding.enabled=true", "coding.mode=coded", f"coding.target={workers - n_slow}"]
        modes = {
            "straggler-free (wait-all)": [],
            "straggler-free (coded)": coded,
            "wait-all": fault,
            "drop-stragglers": ["coding.enabled=true", "coding.mode=drop-stragglers",
                                f"coding.target={workers - n_slow}", *fault],
            "coded": [*coded, *fault],
        }
        for split, split_args in splits.items():
            base = [f"train.steps={steps}", f"train.eval_every={steps}", *split_args]
            reference = None
            for mode, extra in modes.items():
                summary = run_hpcfed(workers + 1, [*base, *extra])
                reference = reference or summary
                ratio = summary["time_per_step_s"] / reference["time_per_step_s"]
                results.append({"workers": workers, "stragglers": n_slow, "delay_s": args.delay, "split": split,
                                "mode": mode, **{k: summary[k] for k in (
                                    "time_per_step_s", "final_accuracy", "mean_wait_s", "resyncs",
                                    "bytes_up_per_worker_step", "param_hashes")}})
                rows.append([workers, n_slow, split, mode, f"{1e3 * summary['time_per_step_s']:.1f}",
                             f"{ratio:.2f}x", f"{100 * summary['final_accuracy']:.2f}"])
    print(f"D = {args.delay} s per step on each straggler, {steps} steps, digits CNN, batch 32 per block\n")
    print(markdown_table(["workers", "stragglers", "split", "mode", "ms/step", "vs straggler-free wait-all",
                          "test acc %"], rows))
    print(f"(json: {save_json('stragglers', results)})")


if __name__ == "__main__":
    main()
