"""FedAvg against FedAvg + server adjustment on a shared set, on non-IID clients.

For each Dirichlet alpha: FedAvg (all training data on clients), FedAvg + adjustment with a
shared set of 1% and of 5% of the training data held by rank 0, and the 5% run with a
proximal term. Digits CNN, 20 clients on 3 worker ranks, 30% of them per round.
"Rounds to FedAvg's final" is the first round whose accuracy reaches FedAvg's final accuracy.
Writes a plot of accuracy against rounds (docs/fed_server_adjust.png by default).

    python benchmarks/fed_server_adjust.py [--rounds 30] [--alphas 0.1 0.5] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import REPO, markdown_table, run_hpcfed, save_json  # noqa: E402

SETTINGS = {
    "FedAvg": ["federated.server_adjust.enabled=false"],
    "+ adjust, shared 1%": ["federated.server_adjust.shared_fraction=0.01"],
    "+ adjust, shared 5%": ["federated.server_adjust.shared_fraction=0.05"],
    "+ adjust 5% + prox 0.1": ["federated.server_adjust.shared_fraction=0.05", "federated.server_adjust.prox=0.1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--plot", default=str(REPO / "docs" / "fed_server_adjust.png"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, alpha 0.1")
    args = parser.parse_args()
    rounds, alphas = (3, [0.1]) if args.quick else (args.rounds, args.alphas)
    results, rows = {}, []
    figure, axes = plt.subplots(1, len(alphas), figsize=(6 * len(alphas), 4), squeeze=False)
    for axis, alpha in zip(axes[0], alphas):
        base = ["algorithm=fedavg", f"federated.rounds={rounds}", "federated.clients=20", "federated.fraction=0.3",
                "data.partition=dirichlet", f"data.alpha={alpha}"]
        curves = {}
        for name, extra in SETTINGS.items():
            summary = run_hpcfed(4, [*base, *extra])
            curves[name] = [r["accuracy"] for r in summary["per_round"]]
            axis.plot(range(1, rounds + 1), [100 * a for a in curves[name]], label=name)
        target = curves["FedAvg"][-1]
        for name, curve in curves.items():
            reached = next((i + 1 for i, a in enumerate(curve) if a >= target), None)
            rows.append([alpha, name, f"{100 * curve[-1]:.2f}", f"{100 * (curve[-1] - target):+.2f}",
                         reached if reached is not None else "never"])
        results[str(alpha)] = curves
        axis.set(title=f"Dirichlet alpha = {alpha}", xlabel="round", ylabel="test accuracy %")
        axis.legend()
    figure.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=90)
    print(f"digits CNN, 20 clients (30% per round, 20 local steps), {rounds} rounds\n")
    print(markdown_table(["alpha", "setting", "final acc %", "vs FedAvg final", "rounds to FedAvg's final"], rows))
    print(f"(plot: {args.plot}; json: {save_json('fed_server_adjust', results)})")


if __name__ == "__main__":
    main()
