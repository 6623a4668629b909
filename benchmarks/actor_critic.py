"""Aggregation rules with faulty workers, end to end under mpiexec: actor-critic against uniform and robust rules.

6 workers (7 ranks), of which 0 or 2 (ranks 5 and 6) are faulty: labels randomly permuted on their
data, gradients (or deltas) scaled by -5, or replaced by Gaussian noise of the same norm. For `sync`
(``--steps`` steps) and `fedavg` (18 clients on the 6 worker ranks, half of them per round, 10 local
steps, no server adjustment), per scenario and rule, over several seeds: final test accuracy (mean ±
std), the faulty workers' mean weight over the second half of the run (uniform: 1/6), and the run's
training time per step (or round) as a ratio to `uniform` in the same scenario and seed. A run that
hpcfed ends because its loss turned non-finite counts as "diverged" (accuracy: chance is not assumed).

MNIST-1D is generated once per seed into an HDF5 file that every run of that seed reads
(``data.name: hdf5``; the same samples as ``data.name: mnist1d`` with that seed), so the table's time
goes to training, not to generating the same signals 20 times. Writes a plot of the actor-critic's
per-worker weights over time (docs/actor_critic_weights.png).

    python benchmarks/actor_critic.py                                  # sync + fedavg, 3 seeds
    python benchmarks/actor_critic.py --algorithms sync --seeds 0 --scenarios none label:2
    python benchmarks/actor_critic.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import h5py
import matplotlib
import numpy as np

from common import REPO, markdown_table, run_hpcfed, save_json

from hpcfed.config import load_config
from hpcfed.data.datasets import load_dataset

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WORKERS = 6
FAULTS = {"label": "faults.label_noise.ranks", "scale": "faults.grad_scale.ranks", "noise": "faults.grad_noise.ranks"}
METHODS = ["uniform", "actor_critic", "median", "trimmed_mean", "fltrust"]


def faulty_ranks(scenario: str) -> list[int]:
    """Worker ranks (1-based) that are faulty in ``scenario`` ('none' or 'kind:count'): the last ``count``."""
    return [] if scenario == "none" else [WORKERS - i for i in range(int(scenario.split(":")[1]))][::-1]


def faulty_weight(weights: np.ndarray, bad: list[int], algorithm: str) -> float:
    """Faulty workers' mean share of the aggregate over the second half of the run."""
    late = weights[len(weights) // 2:]
    columns = [r - 1 for r in bad]
    if algorithm == "fedavg":   # a rank's weight sums its sampled clients' shares; normalise per round
        return float(np.nanmean(late[:, columns] / np.maximum(late.sum(axis=1, keepdims=True), 1e-12)))
    return float(np.nanmean(late[:, columns].sum(axis=1) / len(columns)))


def write_mnist1d(samples: int, seed: int, path: Path) -> None:
    """The MNIST-1D data set of ``seed`` as an HDF5 file hpcfed reads (datasets x and y)."""
    cfg = load_config(None, [f"seed={seed}", "data.name=mnist1d", f"data.samples={samples}"])
    data = load_dataset(cfg.data, seed)
    with h5py.File(path, "w") as file:
        file["x"], file["y"] = data.x, data.y


def plot_weights(curves: dict[str, tuple[np.ndarray, list[int]]], path: Path) -> None:
    figure, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for axis, (title, (weights, bad)) in zip(axes[0], curves.items()):
        for worker in range(weights.shape[1]):
            faulty = worker + 1 in bad
            axis.plot(weights[:, worker], lw=1.2 if faulty else 0.8, ls="-" if faulty else ":",
                      label=f"rank {worker + 1}" + (" (faulty)" if faulty else ""))
        axis.axhline(1 / WORKERS, color="grey", lw=0.5)
        axis.set(title=title, xlabel="step / round", ylabel="weight")
        axis.legend(fontsize=6)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def run(base: list[str], scenario: str, method: str) -> dict | None:
    """One run's summary, or None if hpcfed stopped it for a non-finite loss."""
    bad = faulty_ranks(scenario)
    faults = [f"{FAULTS[scenario.split(':')[0]]}=[{','.join(map(str, bad))}]"] if bad else []
    try:
        return run_hpcfed(WORKERS + 1, [*base, *faults, f"aggregation.weighting={method}"])
    except RuntimeError as error:
        if "non-finite" not in str(error):
            raise
        return None


def cell(accuracies: list[float | None], weights: list[float], ratios: list[float]) -> str:
    done = [a for a in accuracies if a is not None]
    text = f"{np.mean(done):.2f} ± {np.std(done):.2f}" if done else "diverged"
    if len(done) < len(accuracies):
        text += f" ({len(accuracies) - len(done)} diverged)"
    if weights:
        text += f" (w {np.mean(weights):.3f})"
    return text + (f" [{np.mean(ratios):.2f}x]" if ratios else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000, help="MNIST-1D samples generated")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algorithms", nargs="+", default=["sync", "fedavg"])
    parser.add_argument("--scenarios", nargs="+", default=["none", "label:2", "scale:2", "noise:2"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--quick", action="store_true", help="smoke run: sync, 20 steps, 2,000 samples, one seed")
    parser.add_argument("--plot", default=str(REPO / "docs" / "actor_critic_weights.png"))
    args = parser.parse_args()
    if args.quick:
        args.algorithms, args.steps, args.samples, args.seeds = ["sync"], 20, 2000, args.seeds[:1]
        args.scenarios = args.scenarios[:2]
    results, curves, rows = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        files = {seed: Path(tmp, f"mnist1d-{seed}.h5") for seed in args.seeds}
        for seed, path in files.items():
            write_mnist1d(args.samples, seed, path)
        for algorithm in args.algorithms:
            base = ([f"train.steps={args.steps}", f"train.eval_every={args.steps}"] if algorithm == "sync" else
                    ["algorithm=fedavg", f"federated.rounds={args.rounds}", "federated.clients=18",
                     "federated.fraction=0.5", "federated.local_steps=10", "federated.server_adjust.enabled=false"])
            for scenario in args.scenarios:
                bad = faulty_ranks(scenario)
                per_method = {m: {"accuracy": [], "weight": [], "time": []} for m in args.methods}
                for seed in args.seeds:
                    data = [f"seed={seed}", "data.name=hdf5", f"data.path={files[seed]}", "checkpoint.every=0"]
                    for method in args.methods:
                        summary = run([*base, *data], scenario, method)
                        entry = per_method[method]
                        entry["accuracy"].append(None if summary is None else 100 * summary["final_accuracy"])
                        entry["time"].append(None if summary is None else summary["train_time_s"] / summary["steps"])
                        if summary is not None and bad and method != "median" and method != "trimmed_mean":
                            weights = summary["trace_weights"]
                            entry["weight"].append(faulty_weight(weights, bad, algorithm))
                            if method == "actor_critic" and seed == args.seeds[0]:
                                curves[f"{algorithm}, {scenario}"] = (weights, bad)
                uniform_time = per_method.get("uniform", {}).get("time", [])
                cells = []
                for method, entry in per_method.items():
                    ratios = [t / u for t, u in zip(entry["time"], uniform_time) if t and u and method != "uniform"]
                    cells.append(cell(entry["accuracy"], entry["weight"], ratios))
                    results.append({"algorithm": algorithm, "scenario": scenario, "method": method, **entry})
                rows.append([algorithm, scenario, *cells])
                print(f"{algorithm} {scenario}: " + " | ".join(cells), flush=True)
    print(f"\nMNIST-1D ({args.samples} samples), {WORKERS} workers, faulty = the last 2; sync {args.steps} steps, fedavg "
          f"{args.rounds} rounds; seeds {args.seeds}; test accuracy % mean ± std (w = faulty workers' mean weight in "
          f"the second half, uniform = {1 / WORKERS:.3f}) [time per step or round / uniform's]\n")
    print(markdown_table(["algorithm", "faulty", *args.methods], rows))
    if curves:
        plot_weights(curves, Path(args.plot))
    print(f"(plot: {args.plot if curves else 'none'}; json: {save_json('actor_critic', results)})")


if __name__ == "__main__":
    main()
