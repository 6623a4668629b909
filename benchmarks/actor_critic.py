"""Actor-critic aggregation weights against uniform weights and a robust rule, with faulty workers.

6 workers, of which 1 or 2 are faulty: labels randomly permuted on their data, gradients
(or deltas) scaled by -5, or replaced by Gaussian noise of the same norm. For `sync` and
`fedavg` (18 clients on the 6 worker ranks, 3 per rank, half of them per round): final test
accuracy, and the faulty workers' mean weight over the second half of the run (uniform = 1/6).
A run that hpcfed ends because its loss turned non-finite is reported as "diverged".
Writes a plot of the actor-critic's per-worker weights over time (docs/actor_critic_weights.png).

    python benchmarks/actor_critic.py [--steps 200] [--rounds 20] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

from common import REPO, markdown_table, run_hpcfed, save_json

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WORKERS = 6
METHODS = {"uniform": "uniform", "actor_critic": "actor_critic", "median (robust ref.)": "median"}
SCENARIOS = {"none": [], "labels x1": ["faults.label_noise.ranks=[1]"], "scale -5 x1": ["faults.grad_scale.ranks=[1]"],
             "noise x1": ["faults.grad_noise.ranks=[1]"], "scale -5 x2": ["faults.grad_scale.ranks=[1,2]"]}


def faulty_ranks(extra: list[str]) -> list[int]:
    return sorted({int(r) for item in extra for r in item.split("=[")[1].rstrip("]").split(",")}) if extra else []


def faulty_weight(weights: np.ndarray, bad: list[int], algorithm: str) -> float:
    """Faulty workers' mean share of the aggregate over the second half of the run."""
    late = weights[len(weights) // 2:]
    if algorithm == "fedavg":   # a rank's weight sums its sampled clients' shares; normalise per round
        return float(np.nanmean(late[:, bad] / np.maximum(late.sum(axis=1, keepdims=True), 1e-12)))
    return float(np.nanmean(late[:, bad].sum(axis=1) / len(bad)))


def plot_weights(curves: dict[str, tuple[np.ndarray, list[int]]], path: Path) -> None:
    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for axis, (title, (weights, bad)) in zip(axes[0], curves.items()):
        for worker in range(weights.shape[1]):
            axis.plot(weights[:, worker], lw=1.2 if worker in bad else 0.8, ls="-" if worker in bad else ":",
                      label=f"rank {worker + 1}" + (" (faulty)" if worker in bad else ""))
        axis.axhline(1 / WORKERS, color="grey", lw=0.5)
        axis.set(title=title, xlabel="step / round", ylabel="weight")
        axis.legend(fontsize=6)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--algorithms", nargs="+", default=["sync", "fedavg"])
    parser.add_argument("--quick", action="store_true", help="smoke run: sync, 20 steps, two scenarios")
    parser.add_argument("--plot", default=str(REPO / "docs" / "actor_critic_weights.png"))
    args = parser.parse_args()
    scenarios = dict(list(SCENARIOS.items())[:2]) if args.quick else SCENARIOS
    algorithms = ["sync"] if args.quick else args.algorithms
    steps = 20 if args.quick else args.steps
    rows, results, curves = [], [], {}
    for algorithm in algorithms:
        base = ([f"train.steps={steps}", f"train.eval_every={steps}"] if algorithm == "sync" else
                ["algorithm=fedavg", f"federated.rounds={args.rounds}", "federated.clients=18",
                 "federated.fraction=0.5", "federated.local_steps=10", "federated.server_adjust.enabled=false"])
        for scenario, extra in scenarios.items():
            cells = []
            bad = [r - 1 for r in faulty_ranks(extra)]
            for label, method in METHODS.items():
                try:
                    summary = run_hpcfed(WORKERS + 1, [*base, *extra, f"aggregation.weighting={method}"])
                except RuntimeError as error:   # hpcfed stops a run whose loss is no longer finite
                    if "non-finite" not in str(error):
                        raise
                    results.append({"algorithm": algorithm, "scenario": scenario, "method": label,
                                    "accuracy": None, "faulty_weight": None, "diverged": True})
                    cells.append("diverged")
                    continue
                weights = summary.pop("trace_weights")
                faulty = faulty_weight(weights, bad, algorithm) if bad and method != "median" else None
                if method == "actor_critic" and bad:
                    curves[f"{algorithm}, {scenario}"] = (weights, bad)
                results.append({"algorithm": algorithm, "scenario": scenario, "method": label,
                                "accuracy": summary["final_accuracy"], "faulty_weight": faulty, "diverged": False})
                cells.append(f"{100 * summary['final_accuracy']:.2f}" + (f" (w {faulty:.3f})" if faulty is not None else ""))
            rows.append([algorithm, scenario, *cells])
    print(f"{WORKERS} workers; sync {steps} steps, fedavg {args.rounds} rounds; test accuracy % "
          f"(w = faulty workers' mean weight in the second half; uniform = {1 / WORKERS:.3f})\n")
    print(markdown_table(["algorithm", "faulty", *METHODS], rows))
    if curves:
        plot_weights(curves, Path(args.plot))
    print(f"(plot: {args.plot if curves else 'none'}; json: {save_json('actor_critic', results)})")


if __name__ == "__main__":
    main()
