"""Rank 0's time and memory per compressed step against W and n, old full-decode path beside the new one.

One process per (n, W, path), so each peak RSS is that rank 0's alone:

- ``new``: the product's :class:`~hpcfed.algorithms.sync_core.ServerCore` over the loopback
  transport. W fake workers send real codec packets (from 4 real encoders, reused: the packets of
  one step share the kernel, as in a run) with correct headers; rank 0 unpacks each to its k values +
  tail, combines them, encodes the aggregate in the coefficient domain and applies it (one inverse
  DCT). Phases are the trace's own columns: t_decode (unpack), t_aggregate, t_encode, t_apply.
- ``old``: what rank 0 did before: decode every packet to full length (one inverse DCT each), a
  weighted sum of W dense vectors, a forward DCT of the aggregate (encode), decode of its own packet.
  Skipped where its W dense vectors would not fit this machine.

The baseline is ONE worker's encode of the same gradient size, measured in the same process right after
rank 0's steps (so under the same load; after the peak RSS is read). Defaults:
the ``compression`` defaults (block 8, keep 2%, 4 bits), SGD with momentum, uniform weights, one thread.
The kernel stays at version 0 during the timed steps; rank 0's merge of W proposals, which happens once
per refresh (every ``refresh_every`` steps), is timed on its own (last column): the first refresh (full
local kernels of k positions) and a later delta refresh (proposals of ``swap`` * k positions).

    PYTHONPATH=. python benchmarks/server_scaling.py                     # W 4..256, n 151k..25M
    PYTHONPATH=. python benchmarks/server_scaling.py --sizes 151306 --workers 4 16
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from hpcfed.codec import CompressionSettings, GradientCodec  # noqa: E402

ENCODERS = 4
STEPS = 4          # timed steps per configuration (the median is reported; step 1 warms up)
OLD_LIMIT = 7e9    # bytes of dense vectors the old path may hold (this machine has 24 GB)


def gradients(n: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """Heavy-tailed, low-frequency-leaning random gradients (what a network's gradients look like)."""
    gen = np.random.default_rng(seed)
    base = gen.standard_normal(n).astype(np.float32) * np.float32(1e-2)
    return [(base + gen.standard_t(3, n).astype(np.float32) * np.float32(1e-3)) for _ in range(count)]


SETTINGS = CompressionSettings(refresh_every=10**9)   # the defaults; kernel merges are timed on their own


def packets(n: int, steps: int) -> tuple[list[list[np.ndarray]], float, tuple[np.ndarray, np.ndarray]]:
    """Packets of ``ENCODERS`` real worker codecs for steps 1..steps, one worker's median encode time,
    and one worker's local kernel proposals (full, then a delta against the kernel merged from it) for
    timing rank 0's merges."""
    cfg = SETTINGS
    codecs = [GradientCodec(n, cfg, np, rank=r + 1) for r in range(ENCODERS)]
    grads = gradients(n, ENCODERS)
    out, times = [], []
    for step in range(1, steps + 1):
        row = []
        for codec, grad in zip(codecs, grads):
            clock = time.perf_counter()
            row.append(codec.encode(grad, step).copy())
            times.append(time.perf_counter() - clock)
        out.append(row)
    full = codecs[0].local_kernel()
    codecs[0].install_kernel(GradientCodec(n, cfg, np, rank=0).merge_kernels([full]))
    return out, statistics.median(times), (full, codecs[0].local_kernel())


def flat_replica(n: int):
    """A model of n parameters with SGD + momentum, as rank 0 holds it."""
    import torch

    from hpcfed.algorithms.sync_core import Replica
    from hpcfed.config import TrainConfig
    from hpcfed.models import FlatModel
    from hpcfed.optim import make_optimizer

    module = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(n))])
    model = FlatModel(module)
    return Replica(model, make_optimizer(TrainConfig(), model), np, compress_buffers=True)


def serve_new(n: int, workers: int, steps: list[list[np.ndarray]]) -> dict:
    """The product's ServerCore over loopback; per-phase medians of the trace row."""
    import torch  # noqa: F401

    from hpcfed.aggregation.combiner import Combiner
    from hpcfed.algorithms.sync_core import Schedule, ServerCore
    from hpcfed.algorithms.sync_loopback import NoStop
    from hpcfed.coding import make_assignment
    from hpcfed.config import AggregationConfig
    from hpcfed.runtime.comm import Frame, Kind
    from hpcfed.runtime.loopback import LoopbackHub

    hub = LoopbackHub(workers + 1)
    codec = GradientCodec(n, SETTINGS, np, rank=0)
    core = ServerCore(hub.endpoints[0], codec, Combiner(AggregationConfig(weighting="uniform"), workers, 0),
                      flat_replica(n), make_assignment(workers, workers, "cyclic"), "wait-all", workers, 32,
                      Schedule(len(steps) + 1, 0), NoStop())
    outbox = Frame(max(p.size for row in steps for p in row))
    rows = []
    for step, row in enumerate(steps, start=1):
        for w in range(1, workers + 1):
            nbytes = outbox.write(row[w % ENCODERS], step=step, kind=Kind.GRADIENT, sender=w, block=w - 1)
            hub.endpoints[w].send(outbox, nbytes, 0)
        rows.append(core.run_step(step)[0])
    keys = ["t_decode", "t_aggregate", "t_encode", "t_apply"]
    return {key: statistics.median(r[key] for r in rows[1:]) for key in keys}


def merge_seconds(n: int, workers: int, full: np.ndarray, delta: np.ndarray) -> tuple[float, float]:
    """Rank 0's kernel merges of ``workers`` proposals, once per refresh: (the first, full exchange; a later
    delta refresh, ``compression.swap`` of the defaults)."""
    codec = GradientCodec(n, SETTINGS, np, rank=0)
    clock = time.perf_counter()
    payload = codec.merge_kernels([full] * workers)
    t_full = time.perf_counter() - clock
    codec.install_kernel(payload)
    clock = time.perf_counter()
    codec.merge_kernels([delta] * workers)
    return t_full, time.perf_counter() - clock


def serve_old(n: int, workers: int, steps: list[list[np.ndarray]]) -> dict:
    """Rank 0 before: full decode of every packet, dense weighted sum, forward DCT of the aggregate."""
    from hpcfed.coding import combine_block_gradients

    codec = GradientCodec(n, SETTINGS, np, rank=0)
    replica = flat_replica(n)
    dense = [np.zeros(n, np.float32) for _ in range(workers)]
    timings: dict[str, list[float]] = {k: [] for k in ("t_decode", "t_aggregate", "t_encode", "t_apply")}
    for step, row in enumerate(steps, start=1):
        clock = time.perf_counter()
        grads = {w: codec.decode(row[(w + 1) % ENCODERS], step, out=dense[w]) for w in range(workers)}
        timings["t_decode"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        aggregate = combine_block_gradients(grads, [1.0] * workers)
        timings["t_aggregate"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        packet = codec.encode(aggregate, step)
        timings["t_encode"].append(time.perf_counter() - clock)
        clock = time.perf_counter()
        codec.decode(packet, step, out=replica.grads)
        replica.apply()
        timings["t_apply"].append(time.perf_counter() - clock)
    return {key: statistics.median(values[1:]) for key, values in timings.items()}


def child(args: argparse.Namespace) -> None:
    """One configuration in this process: load the packets, serve, print JSON with the peak RSS."""
    data = np.load(args.packets)
    steps = [[data[f"s{s}_e{e}"] for e in range(ENCODERS)] for s in range(STEPS)]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = (serve_new if args.path == "new" else serve_old)(args.n, args.w, steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # rank 0's alone
    result["start_rss_mb"] = base_rss / 1024
    result["t_merge"], result["t_merge_delta"] = merge_seconds(args.n, args.w, data["local"], data["delta"])
    result["worker_encode"] = packets(args.n, STEPS)[1]   # the baseline, under the same load as rank 0's timing
    print(json.dumps(result))


def fit_slope(ws: list[int], times: list[float]) -> float:
    """Exponent b of time ~ W^b (least squares in log-log)."""
    return float(np.polyfit(np.log(ws), np.log(times), 1)[0]) if len(ws) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[151306, 4_200_000, 25_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--out", default="bench-out/server_scaling.json")
    parser.add_argument("--child", choices=["new", "old"], dest="path")
    parser.add_argument("--n", type=int)
    parser.add_argument("--w", type=int)
    parser.add_argument("--packets")
    args = parser.parse_args()
    if args.path:
        return child(args)
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| n | W | path | decode s | aggregate s | encode s | apply s | rank 0 total s | one worker's encode s "
          "| ratio | peak RSS MB | kernel merge s per refresh (full / delta) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|",
          flush=True)
    for n in args.sizes:
        steps, _, (local, delta) = packets(n, STEPS)
        store = out.with_suffix(f".packets-{n}.npz")
        np.savez(store, local=local, delta=delta, **{f"s{s}_e{e}": p for s, row in enumerate(steps) for e, p in enumerate(row)})
        for w in args.workers:
            for path in ("old", "new"):
                if path == "old" and 4.0 * n * w > OLD_LIMIT:
                    print(f"| {n:,} | {w} | old | skipped: {4 * n * w / 1e9:.0f} GB of dense vectors |", flush=True)
                    continue
                proc = subprocess.run([sys.executable, __file__, "--child", path, "--n", str(n), "--w", str(w),
                                       "--packets", str(store)], capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(proc.stderr[-3000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                total = r["t_decode"] + r["t_aggregate"] + r["t_encode"] + r["t_apply"]
                encode_s = r["worker_encode"]
                r.update(n=n, w=w, path=path, total=total, ratio=total / encode_s)
                results.append(r)
                print(f"| {n:,} | {w} | {path} | {r['t_decode']:.4f} | {r['t_aggregate']:.4f} | {r['t_encode']:.4f} "
                      f"| {r['t_apply']:.4f} | {total:.4f} | {encode_s:.4f} | {r['ratio']:.2f}x "
                      f"| {r['peak_rss_mb']:.0f} | {r['t_merge']:.3f} / {r['t_merge_delta']:.3f} |", flush=True)
        store.unlink()
    for n in args.sizes:
        new = [r for r in results if r["n"] == n and r["path"] == "new"]
        work = [r["t_decode"] + r["t_aggregate"] for r in new]
        print(f"n = {n:,}: new path, unpack + aggregate time ~ W^{fit_slope([r['w'] for r in new], work):.2f}")
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
