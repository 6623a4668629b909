"""The cost model of one `sync` step: bytes per worker and at rank 0, and where a single server's link saturates.

Sizes come from the product's own codec (payload_nbytes, a real local and global kernel of random
gradients at the second refresh, a delta with the default ``swap``), not from a formula typed in. Per worker and step, with
b blocks per worker (1 without coding), n parameters, k = keep * n kept coefficients, tail t < block^2,
g = ceil(k / group) quantization groups and B buffer floats (sent as fp16 changes: b_B = 4 + 2 B, 0 if B = 0):

    up   = b * (48 + 4 g + 4 t + ceil(k bits / 8) + 1 + b_B) + local kernel / refresh_every
    down =      48 + 4 g + 4 t + ceil(k bits / 8) + 1 + b_B  + global kernel / refresh_every
    dense: 48 + 4 n + 4 B each way

Rank 0 per step: W b unpacks of k values (dequantize) and an O(W b (k + t)) weighted sum, one O(k)
quantization, one inverse DCT of n values and the optimizer step to apply its update (the same as every
worker), and a kernel merge of O(W k) votes every refresh. Its link carries W (up + down) bytes per step;
with a step time T it saturates at W* = R T / (up + down) for a link of R bytes/s.

    PYTHONPATH=. python benchmarks/cost_model.py [--n 25000000] [--step-s 0.1 0.5]
"""

from __future__ import annotations

import argparse

import numpy as np

from hpcfed.codec import CompressionSettings, GradientCodec

HEADER = 48


def sizes(n: int) -> dict[str, float]:
    """Bytes per worker and step, up and down, for the default codec and for dense fp32."""
    cfg = CompressionSettings()
    worker, server = GradientCodec(n, cfg, np, rank=1), GradientCodec(n, cfg, np, rank=0)
    grad = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    for step in range(cfg.refresh_every):    # the first refresh is a full exchange (off the version-0 kernel)
        worker.encode(grad, step)
    first = server.merge_kernels([worker.local_kernel()])
    for codec in (worker, server):
        codec.install_kernel(first)
    for step in range(cfg.refresh_every, 2 * cfg.refresh_every):   # later ones are deltas when swap > 0
        worker.encode(grad, step)
    local = worker.local_kernel().size
    merged = server.merge_kernels([worker.local_kernel()]).size
    packet = server.payload_nbytes(cfg.refresh_every + 1)
    return {"k": worker.k, "packet": packet, "local_kernel": local, "global_kernel": merged,
            "up": HEADER + packet + local / cfg.refresh_every, "down": HEADER + packet + merged / cfg.refresh_every,
            "dense": HEADER + 4 * n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[151_306, 4_200_000, 25_000_000])
    parser.add_argument("--step-s", type=float, nargs="+", default=[0.1, 0.5])
    args = parser.parse_args()
    print("| n | k | packet B | local / global kernel B (every refresh) | up B/step | down B/step | dense B/step "
          "| ratio |\n|---|---|---|---|---|---|---|---|")
    table = []
    for n in args.n:
        s = sizes(n)
        table.append((n, s))
        print(f"| {n:,} | {s['k']:,} | {s['packet']:,} | {s['local_kernel']:,} / {s['global_kernel']:,} "
              f"| {s['up']:,.0f} | {s['down']:,.0f} | {s['dense']:,} | {s['dense'] / s['up']:.0f}x |")
    print("\nW at which rank 0's link saturates, W* = R T / (up + down), for step time T:")
    print("| n | T s | codec, 10 Gb/s | codec, 100 Gb/s | dense, 10 Gb/s | dense, 100 Gb/s |\n|---|---|---|---|---|---|")
    for n, s in table:
        for t in args.step_s:
            cells = [1.25e9 * scale * t / per for per in (s["up"] + s["down"], 2 * s["dense"]) for scale in (1, 10)]
            print(f"| {n:,} | {t} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
