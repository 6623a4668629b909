"""FedAvg against FedAvg + server adjustment on a shared set, on non-IID clients, over several seeds.

For each Dirichlet alpha: FedAvg (all training data on clients; ``server_adjust.enabled: false``),
FedAvg + adjustment with the default safeguard (``accept: better``: the adjusted model replaces the
aggregate only when it lowers the loss on a held-out slice of the shared set), and the unguarded
adjustment (``accept: always``). 20 clients on 3 worker ranks, 30% of them per round, the built-in
`cnn`. "Rounds to FedAvg's final" is the first round whose accuracy reaches FedAvg's final accuracy
(mean over seeds; each seed against its own FedAvg run). Writes a plot of the mean accuracy against rounds.

    python benchmarks/fed_server_adjust.py --data mnist1d --samples 20000 --alphas 0.1 0.5 --seeds 0 1 2
    python benchmarks/fed_server_adjust.py --data digits --rounds 20 --alphas 0.1 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import REPO, markdown_table, run_hpcfed, save_json  # noqa: E402

SETTINGS = {
    "FedAvg": ["federated.server_adjust.enabled=false"],
    "+ adjust (accept: better, default)": [],
    "+ adjust (accept: always)": ["federated.server_adjust.accept=always"],
}


def first_reaching(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(curve) if a >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--plot", default=None, help="default: docs/fed_server_adjust_<data>.png")
    args = parser.parse_args()
    plot = Path(args.plot or REPO / "docs" / f"fed_server_adjust_{args.data}.png")
    results, rows = {}, []
    figure, axes = plt.subplots(1, len(args.alphas), figsize=(6 * len(args.alphas), 4), squeeze=False)
    for axis, alpha in zip(axes[0], args.alphas):
        base = ["algorithm=fedavg", f"federated.rounds={args.rounds}", "federated.clients=20", "federated.fraction=0.3",
                "data.partition=dirichlet", f"data.alpha={alpha}", f"data.name={args.data}", "checkpoint.every=0"]
        if args.samples:
            base.append(f"data.samples={args.samples}")
        curves: dict[str, list[list[float]]] = {name: [] for name in SETTINGS}
        accepted: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for seed in args.seeds:
            for name, extra in SETTINGS.items():
                summary = run_hpcfed(4, [*base, f"seed={seed}", *extra])
                curves[name].append([r["accuracy"] for r in summary["per_round"]])
                accepted[name].append(float(np.mean([r.get("adjust_accepted", 0) for r in summary["per_round"]])))
        finals = {name: [100 * c[-1] for c in runs] for name, runs in curves.items()}
        for name, runs in curves.items():
            reach = [first_reaching(c, fedavg[-1]) for c, fedavg in zip(runs, curves["FedAvg"])]
            gain = np.mean(finals[name]) - np.mean(finals["FedAvg"])
            rows.append([args.data, alpha, name, " ".join(f"{a:.2f}" for a in finals[name]),
                         f"{np.mean(finals[name]):.2f} ± {np.std(finals[name]):.2f}", f"{gain:+.2f}",
                         " ".join(str(r) if r else "-" for r in reach), f"{np.mean(accepted[name]):.2f}"])
            axis.plot(range(1, args.rounds + 1), 100 * np.mean(runs, axis=0), label=name)
        results[str(alpha)] = {"curves": curves, "accepted": accepted}
        axis.set(title=f"{args.data}, Dirichlet alpha {alpha}, {len(args.seeds)} seeds (mean)", xlabel="round",
                 ylabel="test accuracy %")
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(plot, dpi=110)
    print(markdown_table(["data", "alpha", "setting", "final acc % (each seed)", "mean ± std %", "vs FedAvg",
                          "round reaching FedAvg's final (each)", "rounds adjusted"], rows))
    print(f"(plot: {plot}; json: {save_json(f'fed_server_adjust_{args.data}', results)})")


if __name__ == "__main__":
    main()
