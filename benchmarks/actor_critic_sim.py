"""In-process runs of `sync` with faulty workers, comparing aggregation rules (for tuning the actor-critic).

Each run is the product's own step (:mod:`hpcfed.algorithms.sync_loopback`: rank 0's and every
worker's step core in one process over the loopback transport), with the product's fault injection:
``label`` (permuted labels), ``scale`` (gradients x -5), ``noise`` (Gaussian noise of the same norm)
on the last 1 or 2 of 6 workers. Reported per scenario and rule: test accuracy (mean ± std over seeds),
the faulty workers' mean weight over the second half (uniform: 1/6), and rank 0's aggregation time
per step (the trace's t_aggregate, which includes its validation gradient for fltrust/actor_critic).

    PYTHONPATH=. python benchmarks/actor_critic_sim.py --data mnist1d --samples 20000 --steps 300
    PYTHONPATH=. python benchmarks/actor_critic_sim.py --scenarios label:2 --methods actor_critic uniform --seeds 0
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpcfed.algorithms import sync_loopback  # noqa: E402
from hpcfed.config import load_config  # noqa: E402
from hpcfed.data.datasets import load_dataset  # noqa: E402

WORKERS = 6
FAULTS = {"label": "faults.label_noise.ranks", "scale": "faults.grad_scale.ranks", "noise": "faults.grad_noise.ranks"}


def overrides(args: argparse.Namespace, scenario: str, method: str, seed: int) -> list[str]:
    out = [f"seed={seed}", f"data.name={args.data}", f"train.steps={args.steps}", "checkpoint.every=0",
           f"aggregation.weighting={method}", "aggregation.trim=2"]
    if args.samples:
        out.append(f"data.samples={args.samples}")
    if scenario != "none":
        kind, count = scenario.split(":")
        out.append(f"{FAULTS[kind]}=[{','.join(str(WORKERS - i) for i in range(int(count)))}]")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenarios", nargs="+", default=["none", "label:2", "scale:2", "noise:2"])
    parser.add_argument("--methods", nargs="+", default=["uniform", "median", "trimmed_mean", "fltrust",
                                                         "actor_critic"])
    parser.add_argument("--out", default="bench-out/actor_critic_sim.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| scenario | rule | test acc % (mean ± std) | faulty weight (2nd half) | aggregate s/step |\n|---|---|---|---|---|")
    for scenario in args.scenarios:
        faulty = [] if scenario == "none" else [WORKERS - 1 - i for i in range(int(scenario.split(":")[1]))]
        for method in args.methods:
            accs, weights, times = [], [], []
            for seed in args.seeds:
                cfg = load_config(None, overrides(args, scenario, method, seed))
                data = load_dataset(cfg.data, seed)
                run = sync_loopback.build(cfg, WORKERS, data).run()
                accs.append(100 * sync_loopback.accuracy_of(run, cfg, data))
                half = run.columns[len(run.columns) // 2:]
                if faulty:
                    weights.append(float(np.nanmean([c["weight"][faulty].mean() for c in half])))
                times.append(float(np.mean([r["t_aggregate"] for r in run.rows])))
            weight = f"{np.mean(weights):.3f}" if weights and np.isfinite(np.mean(weights)) else "-"
            rows.append({"scenario": scenario, "method": method, "accuracy": accs, "faulty_weight": weights,
                         "aggregate_s": times})
            print(f"| {scenario} | {method} | {np.mean(accs):.2f} ± {np.std(accs):.2f} | {weight} "
                  f"| {np.mean(times):.4f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
