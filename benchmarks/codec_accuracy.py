"""Accuracy against bytes on the wire: hpcfed's codec settings vs dense fp32 vs DDP's PowerSGD hook.

One task (data, model, steps, lr; 4 workers, batch 32 per worker, SGD momentum 0.9) over several
seeds. hpcfed runs are the product's step in one process (:func:`codec_sim.simulate`: rank 0's and
every worker's step core over the loopback transport), so their bytes are measured: every frame a
worker sent (packets, scales, raw tail, kernel proposals, 48-byte headers) up, rank 0's frames per
worker down. PowerSGD runs are real DDP (gloo) with ``powerSGD_hook`` on the same model, data split,
batches and optimizer; their bytes are computed from the hook's messages: per step the P (n x r) and
Q (m x r) fp32 factors of every weight matrix plus the other tensors uncompressed, dense for the
hook's first `start_powerSGD_iter` steps; one copy per worker each way (an allreduce hands every
worker the same reduced factors; a ring moves about twice that).

    python benchmarks/codec_accuracy.py                                   # digits cnn, 300 steps
    python benchmarks/codec_accuracy.py --data mnist1d --samples 20000 --model cnn1d_small --steps 3000 \\
        --setting enabled=false --setting "keep=0.3,swap=0.1"
    python benchmarks/codec_accuracy.py --quick
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from codec_sim import simulate
from common import markdown_table, save_json
from ddp_reference import run_ddp

from hpcfed.config import load_config
from hpcfed.data.datasets import load_dataset
from hpcfed.models import build_model

SETTINGS = ["enabled=false", "", "swap=0"]     # dense, the defaults (delta refreshes), the full kernel exchange
POWERSGD_START = 2


def powersgd_bytes(model: torch.nn.Module, rank: int, steps: int) -> float:
    """Mean bytes per worker per step of the PowerSGD hook (rank ``rank``) on ``model``."""
    dense = sum(p.numel() for p in model.parameters()) * 4
    compressed = sum(4 * rank * (p.shape[0] + math.prod(p.shape[1:])) if p.dim() >= 2 else 4 * p.numel()
                     for p in model.parameters())
    warm = min(POWERSGD_START, steps)
    return (warm * dense + (steps - warm) * compressed) / steps


def progress(seed: int, name: str, accuracy: float, up: float) -> None:
    print(f"seed {seed} {name}: {accuracy:.2f}%, {up:,.0f} B up per worker per step", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--samples", type=int, default=None, help="mnist1d/synthetic: samples generated")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--setting", action="append", help="hpcfed codec 'key=value,...' (repeatable)")
    parser.add_argument("--powersgd", type=int, nargs="*", default=[1, 4], help="PowerSGD ranks")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 steps, one seed")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds = 40, args.seeds[:1]
    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    for seed in args.seeds:
        task = [f"seed={seed}", f"data.name={args.data}", f"model.name={args.model}", f"train.steps={args.steps}",
                f"train.lr={args.lr}", "train.batch_size=32", f"train.eval_every={args.steps}"]
        task += [f"data.samples={args.samples}"] if args.samples else []
        cfg = load_config(None, task)
        data = load_dataset(cfg.data, seed)                    # once per seed, shared by every run
        for setting in args.setting or SETTINGS:
            run = simulate(args, setting, seed, data)
            entry = results.setdefault(f"hpcfed {setting or 'defaults'}", {"accuracy": [], "up": [], "down": []})
            for key in ("accuracy", "up", "down"):
                entry[key].append(run[key])
            progress(seed, f"hpcfed {setting or 'defaults'}", run["accuracy"], run["up"])
        model = build_model(cfg.model, data.sample_shape, data.num_classes, seed)
        for rank in args.powersgd:
            ddp = run_ddp(args.workers, None, task, powersgd=rank, port=29600 + rank + 10 * seed, data=data)
            entry = results.setdefault(f"DDP + PowerSGD rank {rank}", {"accuracy": [], "up": [], "down": []})
            nbytes = powersgd_bytes(model, rank, args.steps)
            entry["accuracy"].append(100 * ddp["final_accuracy"])
            entry["up"].append(nbytes)
            entry["down"].append(nbytes)
            progress(seed, f"DDP + PowerSGD rank {rank}", 100 * ddp["final_accuracy"], nbytes)
    dense = 4 * sum(p.numel() for p in model.parameters())
    rows = []
    for name, entry in results.items():
        accuracy, up = np.array(entry["accuracy"]), float(np.mean(entry["up"]))
        rows.append([name, " ".join(f"{a:.2f}" for a in accuracy), f"{accuracy.mean():.2f} ± {accuracy.std():.2f}",
                     f"{up:,.0f}", f"{dense / up:.1f}x", f"{np.mean(entry['down']):,.0f}"])
    print(f"{args.data} {args.model}, {args.workers} workers, {args.steps} steps, lr {args.lr}, seeds {args.seeds}; "
          f"bytes per worker per step (dense fp32 gradient: {dense:,} B)\n")
    print(markdown_table(["setting", "test acc % per seed", "mean ± std %", "up B", "vs dense fp32", "down B"], rows))
    print(f"(json: {save_json(f'codec_accuracy_{args.data}_{args.model}', results)})")


if __name__ == "__main__":
    main()
