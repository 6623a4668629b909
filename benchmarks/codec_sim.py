"""In-process simulation of synchronous SGD with the gradient codec, for choosing settings.

The quickstart task: sklearn digits (80/20 split by seed), the 2-conv CNN (151,306
parameters), 4 simulated workers (iid shards), 300 steps, batch 32 per worker, SGD
lr 0.05 momentum 0.9, mean of worker gradients. Each step follows the product's sync
loop: workers encode -> rank 0 decodes each -> mean -> rank 0 encodes the aggregate
once -> every rank decodes those bytes -> optimizer step; kernel exchanges whenever
``kernel_due``. Uplink bytes per worker and step count packets AND local kernels;
downlink counts the aggregate packet and the global kernel.

    PYTHONPATH=. python benchmarks/codec_sim.py --seeds 0 1 2
    PYTHONPATH=. python benchmarks/codec_sim.py --setting "keep=0.03,bits=4,block=16" --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from hpcfed.codec import CompressionSettings, GradientCodec
from hpcfed.data.partition import iid

SWEEP = [                      # over the defaults (keep 0.02, 4 bits, block 8, refresh 2, history 2)
    "enabled=false",
    "",
    "bits=2",
    "keep=0.03,bits=8",
]


def parse_setting(text: str) -> CompressionSettings:
    """'key=value,...' over the defaults (bools: true/false)."""
    types = {f.name: f.type for f in dataclasses.fields(CompressionSettings)}
    values = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        kind = str(types[key])
        values[key] = value.lower() == "true" if "bool" in kind else float(value) if "float" in kind else int(value)
    return CompressionSettings(**values)


def cnn() -> nn.Module:
    """The quickstart CNN for 1x8x8 digits (151,306 parameters)."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, 10))


def simulate(cfg: CompressionSettings, seed: int, steps: int, workers: int = 4, batch: int = 32) -> dict:
    """Train once; returns accuracy and byte counts."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    shards = [train[part] for part in iid(len(train), workers, seed)]
    torch.manual_seed(seed)
    model = cnn()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    codecs = [GradientCodec(n, cfg, seed=seed, rank=r) for r in range(workers + 1)]   # 0 = server
    rngs = [np.random.default_rng([seed, w]) for w in range(workers)]
    up = down = 0
    shares = []                                           # energy share each compressed packet carried
    for step in range(steps):
        if codecs[0].kernel_due(step):
            local = [c.local_kernel() for c in codecs[1:]]
            merged = codecs[0].merge_kernels(local)
            for c in codecs:
                c.install_kernel(merged)
            up += sum(p.size for p in local)
            down += merged.size
        decoded = []
        for w in range(workers):
            idx = rngs[w].choice(shards[w], batch, replace=False)
            model.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in params]).numpy()
            packet = codecs[w + 1].encode(grad, step)
            assert packet.size == codecs[0].payload_nbytes(step)
            up += packet.size
            if codecs[0].compressed(step):
                shares.append(int(packet[-1]) / 127)
            decoded.append(codecs[0].decode(packet, step))
        aggregate = codecs[0].encode(np.mean(decoded, axis=0), step)
        down += aggregate.size
        update = [c.decode(aggregate, step) for c in codecs][0]
        offset = 0
        for p in params:
            p.grad = torch.from_numpy(update[offset: offset + p.numel()].copy()).view_as(p)
            offset += p.numel()
        opt.step()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    return {"accuracy": 100 * acc, "up": up / (steps * workers), "down": down / steps,
            "share": float(np.mean(shares)) if shares else 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", help="'key=value,...' (repeatable); default: a sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 steps, one seed, two settings")
    parser.add_argument("--out", default="bench-out/codec_sim.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = args.setting or SWEEP
    if args.quick:
        settings, args.seeds, args.steps = settings[:2], args.seeds[:1], 30
    rows = []
    dense_up = 4 * sum(p.numel() for p in cnn().parameters())
    print("| setting | seeds | accuracy % (each) | mean acc % | up B/worker/step | ratio vs dense | down B/step "
          "| energy share carried |")
    print("|---|---|---|---|---|---|---|---|")
    for text in settings:
        cfg = parse_setting(text)
        start = time.perf_counter()
        runs = [simulate(cfg, seed, args.steps) for seed in args.seeds]
        accs = [r["accuracy"] for r in runs]
        up, down = np.mean([r["up"] for r in runs]), np.mean([r["down"] for r in runs])
        share = np.mean([r["share"] for r in runs])
        rows.append({"setting": text or "defaults", "config": dataclasses.asdict(cfg), "seeds": args.seeds,
                     "accuracy": accs, "up_bytes": up, "down_bytes": down, "share": share,
                     "seconds": time.perf_counter() - start})
        print(f"| {text or 'defaults'} | {len(accs)} | {' '.join(f'{a:.2f}' for a in accs)} | {np.mean(accs):.2f} "
              f"| {up:,.0f} | {dense_up / up:.1f}x | {down:,.0f} | {share:.2f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "dense_up_bytes": dense_up, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
