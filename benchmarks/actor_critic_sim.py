"""In-process simulation of parameter-server SGD with faulty workers, for tuning the actor-critic weighting.

Digits (80/20 stratified split by seed); rank 0 holds 100 samples of the TRAINING split as its
validation set for the reward (never the test set); the rest is dealt iid over 6 simulated
workers. The digits CNN (151,306 parameters), SGD lr 0.05 momentum 0.9, batch 32 per worker.
Each step every worker computes a gradient; the faulty ones (the last 1 or 2 workers) send
  label: gradients on their partition with the labels randomly permuted,
  scale: their gradient times -5,
  noise: Gaussian noise with the norm of their gradient.
Rank 0 combines them by the method (uniform mean, actor-critic weights, coordinate-wise
median, trimmed mean dropping as many per side as there are faulty workers, at least 1),
steps the optimizer, and for the actor-critic reports reward = val loss before - after.
Reported: final test accuracy (360 samples; one sample = 0.28 points), the faulty workers'
mean probability over the second half of training (1/6 = 0.167 is uniform), and accuracy
differences against `uniform` from the same run.

    PYTHONPATH=. python benchmarks/actor_critic_sim.py                     # full table
    PYTHONPATH=. python benchmarks/actor_critic_sim.py --quick             # smoke run
    PYTHONPATH=. python benchmarks/actor_critic_sim.py --methods actor_critic --scenarios scale:1 \\
        --steps 150 --setting "lr=0.02,entropy=0"                          # tuning
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

from hpcfed.aggregation import (ActorCriticSettings, ActorCriticWeighter, aggregate, coordinate_median,
                                trimmed_mean, uniform_weights)
from hpcfed.data.partition import iid

WORKERS = 6
VAL_SAMPLES = 100
METHODS = ["uniform", "actor_critic", "median", "trimmed_mean"]
SCENARIOS = ["none:0", "label:1", "scale:1", "noise:1", "label:2", "scale:2", "noise:2"]


def parse_setting(text: str) -> ActorCriticSettings:
    """'key=value,...' over the defaults."""
    types = {f.name: f.type for f in dataclasses.fields(ActorCriticSettings)}
    values = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        values[key] = int(value) if "int" in str(types[key]) else float(value)
    return ActorCriticSettings(**values)


def cnn() -> nn.Module:
    """The digits CNN for 1x8x8 images (151,306 parameters)."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1024, 128), nn.ReLU(), nn.Linear(128, 10))


def simulate(method: str, fault: str, n_faulty: int, seed: int, steps: int, settings: ActorCriticSettings,
             batch: int = 32) -> dict:
    """One training run; returns test accuracy, faulty workers' mean probability and timings."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    gen = np.random.default_rng([seed, 1])
    train = gen.permutation(train)
    val, train = np.sort(train[:VAL_SAMPLES]), np.sort(train[VAL_SAMPLES:])
    shards = [train[part] for part in iid(len(train), WORKERS, seed)]
    faulty = list(range(WORKERS - n_faulty, WORKERS))
    labels = [y.clone() for _ in range(WORKERS)]
    for w in faulty:
        if fault == "label":
            labels[w][shards[w]] = y[shards[w][gen.permutation(len(shards[w]))]]
    torch.manual_seed(seed)
    model = cnn()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    rngs = [np.random.default_rng([seed, 2, w]) for w in range(WORKERS)]
    weighter = ActorCriticWeighter(WORKERS, settings, seed) if method == "actor_critic" else None
    loss_fn = nn.functional.cross_entropy

    def val_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(model(x[val]), y[val]))

    before = val_loss()
    faulty_prob, t_weigh = [], 0.0
    for step in range(steps):
        grads = np.empty((WORKERS, sum(p.numel() for p in params)), dtype=np.float32)
        for w in range(WORKERS):
            idx = rngs[w].choice(shards[w], batch, replace=False)
            model.zero_grad()
            loss_fn(model(x[idx]), labels[w][idx]).backward()
            grads[w] = torch.cat([p.grad.reshape(-1) for p in params]).numpy()
            if w in faulty and fault == "scale":
                grads[w] *= -5.0
            elif w in faulty and fault == "noise":
                noise = rngs[w].standard_normal(grads.shape[1]).astype(np.float32)
                grads[w] = noise * (np.linalg.norm(grads[w]) / np.linalg.norm(noise))
        start = time.perf_counter()
        if method == "median":
            update = coordinate_median(grads)
        elif method == "trimmed_mean":
            update = trimmed_mean(grads, max(1, n_faulty))
        else:
            probs = weighter.weights(range(WORKERS), grads) if weighter else uniform_weights(WORKERS)
            update = aggregate(grads, probs)
            if step >= steps // 2 and faulty:
                faulty_prob.append(float(np.mean(probs[faulty])))
        t_weigh += time.perf_counter() - start
        offset = 0
        for p in params:
            p.grad = torch.from_numpy(update[offset:offset + p.numel()].copy()).view_as(p)
            offset += p.numel()
        opt.step()
        if weighter:
            after = val_loss()
            start = time.perf_counter()
            weighter.reward(before - after)
            t_weigh += time.perf_counter() - start
            before = after
    with torch.no_grad():
        acc = float((model(x[test]).argmax(1) == y[test]).float().mean())
    return {"accuracy": 100 * acc, "faulty_prob": float(np.mean(faulty_prob)) if faulty_prob else None,
            "weigh_ms_per_step": 1000 * t_weigh / steps,
            "fallbacks": weighter.fallbacks if weighter else None, "sigma": weighter.sigma if weighter else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--scenarios", nargs="+", default=SCENARIOS, help="fault:count, fault in none|label|scale|noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--setting", default="", help="actor-critic settings 'key=value,...' over the defaults")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, two scenarios")
    parser.add_argument("--out", default="bench-out/actor_critic_sim.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.scenarios, args.steps = ["none:0", "scale:1"], 20
    settings = parse_setting(args.setting)
    print(f"steps {args.steps}, seed {args.seed}, {WORKERS} workers, actor-critic {dataclasses.asdict(settings)}")
    print("| faults | method | test acc % | vs uniform (points) | faulty mean prob (2nd half) | x of 1/W "
          "| weighting ms/step | fallbacks | final sigma | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for scenario in args.scenarios:
        fault, count = scenario.split(":")
        base = None
        for method in args.methods:
            start = time.perf_counter()
            result = simulate(method, fault, int(count), args.seed, args.steps, settings)
            result.update(scenario=scenario, method=method, seconds=time.perf_counter() - start)
            rows.append(result)
            base = result["accuracy"] if method == "uniform" else base
            prob, fallbacks, sigma = result["faulty_prob"], result["fallbacks"], result["sigma"]
            cells = [scenario, method, f"{result['accuracy']:.2f}",
                     "" if base is None else f"{result['accuracy'] - base:+.2f}",
                     "" if prob is None else f"{prob:.3f}", "" if prob is None else f"{prob * WORKERS:.2f}",
                     f"{result['weigh_ms_per_step']:.1f}", "" if fallbacks is None else str(fallbacks),
                     "" if sigma is None else f"{sigma:.2f}",
                     f"{result['seconds']:.0f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "seed": args.seed, "workers": WORKERS,
                                          "settings": dataclasses.asdict(settings), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
