"""In-process runs of algorithm ``sync`` with the gradient codec, for choosing codec settings.

Each run is the product's own step (:mod:`hpcfed.algorithms.sync_loopback`: rank 0's and every
worker's step core in one process over the loopback transport, the real frames and byte counts),
so nothing here re-implements the step. Uplink bytes per worker and step count every frame a worker
sends (headers, packets, local kernels, buffers); downlink counts rank 0's frames per worker.

    PYTHONPATH=. python benchmarks/codec_sim.py --seeds 0 1 2                       # digits, the sweep
    PYTHONPATH=. python benchmarks/codec_sim.py --setting "keep=0.03,bits=4,block=16" --seeds 0
    PYTHONPATH=. python benchmarks/codec_sim.py --setting "swap=0.05" --setting "enabled=false"   # delta kernels
    PYTHONPATH=. python benchmarks/codec_sim.py --data mnist1d --samples 20000 --model cnn1d_small \\
        --steps 3000 --setting "" --setting "enabled=false"
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hpcfed.algorithms import sync_loopback  # noqa: E402
from hpcfed.config import load_config  # noqa: E402
from hpcfed.data.datasets import load_dataset  # noqa: E402

SWEEP = [                      # over the compression defaults
    "enabled=false",
    "",
    "bits=2",
    "keep=0.03,bits=8",
    "swap=0.05",               # delta kernel refreshes: 5 % of k swapped per refresh
]


def overrides(setting: str) -> list[str]:
    """'key=value,...' of the compression section as --set overrides (compression on unless said)."""
    items = [f"compression.{item}" for item in filter(None, setting.split(","))]
    return ["compression.enabled=true", *items]


def simulate(args: argparse.Namespace, setting: str, seed: int, data) -> dict:
    """One run; accuracy (%) and bytes per worker per step, up and down."""
    base = [f"seed={seed}", f"data.name={args.data}", f"model.name={args.model}", f"train.steps={args.steps}",
            f"train.lr={args.lr}", "train.batch_size=32", "checkpoint.every=0"]
    if args.samples:
        base.append(f"data.samples={args.samples}")
    cfg = load_config(None, [*base, *overrides(setting)])
    run = sync_loopback.build(cfg, args.workers, data).run()
    per = args.workers * args.steps
    up = sum(core.transport.bytes_sent for core in run.workers.values()) / per
    return {"accuracy": 100 * sync_loopback.accuracy_of(run, cfg, data), "up": up,
            "down": run.server.transport.bytes_sent / per, "identical": run.replicas_identical(),
            "dense_up": 48 + 4 * run.server.replica.model.size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", help="'key=value,...' (repeatable); default: a sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--data", default="digits")
    parser.add_argument("--samples", type=int, default=None, help="mnist1d/synthetic: samples generated")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 steps, one seed, two settings")
    parser.add_argument("--out", default="bench-out/codec_sim.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = args.setting or SWEEP
    if args.quick:
        settings, args.seeds, args.steps = settings[:2], args.seeds[:1], 30
    rows, datasets = [], {}
    print(f"{args.data}, model {args.model}, {args.workers} workers, {args.steps} steps, lr {args.lr}")
    print("| setting | seeds | accuracy % (each) | mean ± std % | up B/worker/step | ratio vs dense "
          "| down B/worker/step |")
    print("|---|---|---|---|---|---|---|")
    for text in settings:
        start = time.perf_counter()
        runs = []
        for seed in args.seeds:
            if seed not in datasets:     # generated once per seed (MNIST-1D: about a minute for 20,000)
                cfg = load_config(None, [f"seed={seed}", f"data.name={args.data}"]
                                  + ([f"data.samples={args.samples}"] if args.samples else []))
                datasets[seed] = load_dataset(cfg.data, seed)
            runs.append(simulate(args, text, seed, datasets[seed]))
        accs = [r["accuracy"] for r in runs]
        up, down, dense = (float(np.mean([r[k] for r in runs])) for k in ("up", "down", "dense_up"))
        rows.append({"setting": text or "defaults", "seeds": args.seeds, "accuracy": accs, "up_bytes": up,
                     "down_bytes": down, "dense_up_bytes": dense, "identical": all(r["identical"] for r in runs),
                     "seconds": time.perf_counter() - start})
        print(f"| {text or 'defaults'} | {len(accs)} | {' '.join(f'{a:.2f}' for a in accs)} "
              f"| {np.mean(accs):.2f} ± {np.std(accs):.2f} | {up:,.0f} | {dense / up:.1f}x | {down:,.0f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
