"""Accuracy against bytes on the wire: hpcfed's codec settings vs dense fp32 vs DDP's PowerSGD hook.

The quickstart task (digits CNN, 151,306 parameters) with 4 workers, 300 steps, batch 32
per worker, SGD lr 0.05 momentum 0.9, for each seed. hpcfed uplink bytes are measured
(every frame a worker sent: packets, scales, raw tail, local kernels, 48-byte headers).
PowerSGD bytes are computed from the hook's messages: per step, the P (n x r) and Q (m x r)
fp32 factors of every weight matrix plus the biases sent uncompressed, dense for the
hook's first `start_powerSGD_iter` steps; one copy per worker (ring allreduce moves more).

    python benchmarks/codec_accuracy.py [--seeds 0 1] [--quick]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from common import markdown_table, run_hpcfed, save_json
from ddp_reference import run_ddp

from hpcfed.config import ModelConfig
from hpcfed.models import build_model

SETTINGS = {
    "hpcfed dense fp32": [],
    "hpcfed codec (defaults: block 8, keep 2%, 4 bit, refresh 2)": ["compression.enabled=true"],
    "hpcfed codec, 2 bit": ["compression.enabled=true", "compression.bits=2"],
    "hpcfed codec, keep 3%, 8 bit": ["compression.enabled=true", "compression.keep=0.03", "compression.bits=8"],
}
POWERSGD_START = 2


def powersgd_bytes(rank: int, steps: int) -> float:
    """Mean bytes per worker per step of the PowerSGD hook on the quickstart CNN."""
    model = build_model(ModelConfig(), (1, 8, 8), 10, seed=0)
    dense = sum(p.numel() for p in model.parameters()) * 4
    compressed = 0
    for p in model.parameters():
        if p.dim() >= 2:
            n, m = p.shape[0], math.prod(p.shape[1:])
            compressed += 4 * rank * (n + m)
        else:
            compressed += 4 * p.numel()
    warm = min(POWERSGD_START, steps)
    return (warm * dense + (steps - warm) * compressed) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 steps, one seed")
    args = parser.parse_args()
    steps, seeds = (40, [0]) if args.quick else (300, args.seeds)
    results: dict[str, dict] = {}
    for seed in seeds:
        base = [f"seed={seed}", f"train.steps={steps}", f"train.eval_every={steps}"]
        for name, extra in SETTINGS.items():
            summary = run_hpcfed(args.workers + 1, [*base, *extra])
            entry = results.setdefault(name, {"accuracy": [], "bytes": []})
            entry["accuracy"].append(summary["final_accuracy"])
            entry["bytes"].append(summary["bytes_up_per_worker_step"])
        for rank in (1, 4):
            ddp = run_ddp(args.workers, None, base, powersgd=rank, port=29600 + rank + 10 * seed)
            entry = results.setdefault(f"DDP + PowerSGD rank {rank}", {"accuracy": [], "bytes": []})
            entry["accuracy"].append(ddp["final_accuracy"])
            entry["bytes"].append(powersgd_bytes(rank, steps))
    dense = np.mean(results["hpcfed dense fp32"]["bytes"])
    rows = []
    for name, entry in results.items():
        accuracy, nbytes = 100 * np.array(entry["accuracy"]), np.mean(entry["bytes"])
        rows.append([name, " ".join(f"{a:.2f}" for a in accuracy), f"{accuracy.mean():.2f}", f"{nbytes:,.0f}",
                     f"{dense / nbytes:.0f}x"])
    print(f"digits CNN, {args.workers} workers, {steps} steps, seeds {seeds}; uplink bytes per worker per step\n")
    print(markdown_table(["setting", "test acc % per seed", "mean acc %", "bytes/worker/step", "vs dense"], rows))
    print(f"(json: {save_json('codec_accuracy', results)})")


if __name__ == "__main__":
    main()
