"""Actor-critic aggregation weights against uniform weights and a robust rule, with faulty workers.

6 workers, of which 1 or 2 are faulty: labels randomly permuted on their data, gradients
(or deltas) scaled by -5, or replaced by Gaussian noise of the same norm. For `sync` and
`fedavg` (18 clients on the 6 worker ranks, 3 per rank, half of them per round): final test
accuracy, and the faulty workers' mean weight over the second half of the run (uniform = 1/6).

    python benchmarks/actor_critic.py [--steps 200] [--rounds 20] [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np

from common import markdown_table, run_hpcfed, save_json

WORKERS = 6
METHODS = {"uniform": "uniform", "actor_critic": "actor_critic", "median (robust ref.)": "median"}
SCENARIOS = {"none": [], "labels x1": ["faults.label_noise.ranks=[1]"], "scale -5 x1": ["faults.grad_scale.ranks=[1]"],
             "noise x1": ["faults.grad_noise.ranks=[1]"], "scale -5 x2": ["faults.grad_scale.ranks=[1,2]"]}


def faulty_ranks(extra: list[str]) -> list[int]:
    return sorted({int(r) for item in extra for r in item.split("=[")[1].rstrip("]").split(",")}) if extra else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--algorithms", nargs="+", default=["sync", "fedavg"])
    parser.add_argument("--quick", action="store_true", help="smoke run: sync, 20 steps, two scenarios")
    args = parser.parse_args()
    scenarios = dict(list(SCENARIOS.items())[:2]) if args.quick else SCENARIOS
    algorithms = ["sync"] if args.quick else args.algorithms
    steps = 20 if args.quick else args.steps
    rows, results = [], []
    for algorithm in algorithms:
        base = ([f"train.steps={steps}", f"train.eval_every={steps}"] if algorithm == "sync" else
                ["algorithm=fedavg", f"federated.rounds={args.rounds}", "federated.clients=18",
                 "federated.fraction=0.5", "federated.local_steps=10", "federated.server_adjust.enabled=false"])
        for scenario, extra in scenarios.items():
            cells = []
            for label, method in METHODS.items():
                summary = run_hpcfed(WORKERS + 1, [*base, *extra, f"aggregation.weighting={method}"])
                weights = summary.pop("trace_weights")
                late = weights[len(weights) // 2:]
                bad = [r - 1 for r in faulty_ranks(extra)]
                faulty = float(np.nanmean(late[:, bad].sum(axis=1) / len(bad))) if bad and method != "median" else None
                if algorithm == "fedavg" and faulty is not None:   # weights per rank sum its clients' shares
                    faulty = float(np.nanmean(late[:, bad] / np.maximum(late.sum(axis=1, keepdims=True), 1e-12)))
                results.append({"algorithm": algorithm, "scenario": scenario, "method": label,
                                "accuracy": summary["final_accuracy"], "faulty_weight": faulty})
                cells.append(f"{100 * summary['final_accuracy']:.2f}" + (f" (w {faulty:.3f})" if faulty is not None else ""))
            rows.append([algorithm, scenario, *cells])
    print(f"{WORKERS} workers; sync {steps} steps, fedavg {args.rounds} rounds; test accuracy % "
          f"(w = faulty workers' mean weight in the second half; uniform = {1 / WORKERS:.3f})\n")
    print(markdown_table(["algorithm", "faulty", *METHODS], rows))
    print(f"(json: {save_json('actor_critic', results)})")


if __name__ == "__main__":
    main()
