"""Codec throughput (GB/s of fp32 gradient) against memcpy and PowerSGD, measured in one run.

For each size: memcpy (np.copyto into a preallocated buffer; the best of a run before and
one after the codec timings, as the machine may be shared), a worker's encode (with
error feedback, averaged over a whole refresh cycle, so history steps count), the
server's decode (into a preallocated vector, ``decode(..., out=)``), rank 0's two
coefficient-domain steps, ``unpack`` (packet -> k values + tail, into a preallocated vector)
and ``encode_unpacked`` (aggregate in that domain -> packet, residual included; the kernel
stays fixed, a refresh adds one gather and one scatter of k residual values), all
counted as GB/s of the n-element fp32 gradient they stand for, and PowerSGD's
compress/decompress math on the same gradient viewed as a near-square matrix. PowerSGD
is a faithful re-implementation of the per-matrix path of torch's ``powerSGD_hook``
(that hook needs a DDP GradBucket): error feedback
in, P = M Q, orthogonalize P with the hook's own ``_orthogonalize``, Q = M^T P; then
decompress M' = P Q^T and the new error M - M'. Its two allreduces are left out
(single process), which only flatters PowerSGD. One CPU thread for everything.

With ``--device cuda`` the same codec runs on the GPU through CuPy (the ``xp`` code path),
PowerSGD on torch CUDA, memcpy is a device-to-device copy, every timing ends with a stream
synchronisation, and the table adds each codec rate as a fraction of the GPU's peak memory
bandwidth (2 x memory clock x bus width, from the CUDA device attributes). The rate counts
the fp32 gradient once, so the fraction understates the memory traffic actually moved.

    PYTHONPATH=. python benchmarks/codec_speed.py            # 1M..64M elements
    PYTHONPATH=. python benchmarks/codec_speed.py --quick
    PYTHONPATH=. python benchmarks/codec_speed.py --device cuda
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
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize  # noqa: E402

from hpcfed.codec import CompressionSettings, GradientCodec  # noqa: E402
from hpcfed.runtime.device import as_tensor, get_xp, synchronize  # noqa: E402


def best_seconds(fn, repeats: int, xp=np) -> float:
    """Best (minimum) wall time of ``repeats`` calls after one warm-up call: the machine is shared.
    On a GPU each call ends with a stream synchronisation, so the time is the kernels' time."""
    def call() -> None:
        fn()
        synchronize(xp)

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_bandwidth(xp) -> float | None:
    """The current GPU's peak memory bandwidth in bytes/s (2 x memory clock x bus width), or None."""
    runtime, device = xp.cuda.runtime, xp.cuda.Device().id
    try:   # cudaDevAttrMemoryClockRate = 36, cudaDevAttrGlobalMemoryBusWidth = 37 (CUDA's driver_types.h)
        clock_khz = runtime.deviceGetAttribute(36, device)
        bus_bits = runtime.deviceGetAttribute(37, device)
    except Exception:   # an older or newer runtime without these attributes
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8


def powersgd(grad, rank: int, repeats: int, xp=np) -> tuple[float, float]:
    """(compress s, decompress s) of PowerSGD's math on ``grad`` as a near-square matrix."""
    n = grad.size
    cols = 1 << int(np.ceil(np.log2(np.sqrt(n))))
    m = as_tensor(grad[: n - n % cols].copy()).view(1, -1, cols)
    error = torch.zeros_like(m)
    q = torch.randn(1, cols, rank, device=m.device)
    p = torch.empty(1, m.shape[1], rank, device=m.device)

    def compress() -> None:
        m.add_(error)
        torch.bmm(m, q, out=p)
        _orthogonalize(p)
        torch.bmm(m.transpose(1, 2), p, out=q)

    out = torch.empty_like(m)

    def decompress() -> None:
        torch.bmm(p, q.transpose(1, 2), out=out)
        torch.sub(m, out, out=error)

    return best_seconds(compress, repeats, xp), best_seconds(decompress, repeats, xp)


def measure(n: int, cfg: CompressionSettings, repeats: int, xp=np) -> dict:
    rng = np.random.default_rng(0)
    grads = [xp.asarray(rng.standard_normal(n).astype(np.float32)) for _ in range(2)]
    dst = xp.empty_like(grads[0])
    memcpy = best_seconds(lambda: xp.copyto(dst, grads[0]), repeats, xp)
    worker, server = GradientCodec(n, cfg, xp, rank=1), GradientCodec(n, cfg, xp, rank=0)
    cycle = list(range(1, 1 + cfg.refresh_every))            # steps with and without history
    packets = {}

    def encode_cycle() -> None:
        for step in cycle:
            packets[step] = worker.encode(grads[step % 2], step)

    encode = best_seconds(encode_cycle, repeats, xp) / len(cycle)
    step = cycle[0]
    decode = best_seconds(lambda: server.decode(packets[step], step, out=dst), repeats, xp)
    vec = xp.empty(server.unpacked_size(step), dtype=xp.float32)
    unpack = best_seconds(lambda: server.unpack(packets[step], step, out=vec), repeats, xp)
    encode_unpacked = best_seconds(lambda: server.encode_unpacked(vec, step), repeats, xp)
    memcpy = min(memcpy, best_seconds(lambda: xp.copyto(dst, grads[0]), repeats, xp))   # before and after
    start = time.perf_counter()
    merged = server.merge_kernels([worker.local_kernel()])
    worker.install_kernel(merged)
    server.install_kernel(merged)
    exchange = time.perf_counter() - start
    row = {"elements": n, "memcpy_s": memcpy, "encode_s": encode, "decode_s": decode, "unpack_s": unpack,
           "encode_unpacked_s": encode_unpacked, "kernel_exchange_s": exchange, "packet_bytes": int(packets[step].size)}
    for r in (1, 4):
        row[f"psgd{r}_compress_s"], row[f"psgd{r}_decompress_s"] = powersgd(grads[0], r, repeats, xp)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M and 4M elements, fewer repeats")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: CuPy codec, torch CUDA")
    parser.add_argument("--out", default=None, help="JSON results (default bench-out/codec_speed[_cuda].json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    xp = get_xp(args.device)
    cfg = CompressionSettings()
    sizes = [1 << 20, 1 << 22] if args.quick else [1 << 20, 1 << 22, 1 << 24, 1 << 26]
    rows = [measure(n, cfg, 3 if args.quick else 5, xp) for n in sizes]
    gbs = lambda n, s: 4 * n / s / 1e9  # noqa: E731
    print(f"codec settings: {cfg}")
    if xp is not np:
        peak = peak_bandwidth(xp)
        name = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"].decode()
        print(f"device: {name}, peak memory bandwidth {peak / 1e9:.0f} GB/s" if peak else f"device: {name}")
        print("| elements | D2D copy GB/s | encode GB/s (fraction of peak) | decode GB/s (fraction of peak) "
              "| unpack GB/s | encode_unpacked GB/s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            n = r["elements"]
            enc, dec = gbs(n, r["encode_s"]), gbs(n, r["decode_s"])
            share = (lambda rate: f" ({rate * 1e9 / peak:.2f})") if peak else (lambda rate: "")
            print(f"| {n / 2**20:.0f}M | {gbs(n, r['memcpy_s']):.0f} | {enc:.1f}{share(enc)} | {dec:.1f}{share(dec)} "
                  f"| {gbs(n, r['unpack_s']):.1f} | {gbs(n, r['encode_unpacked_s']):.1f} |")
    print("| elements | memcpy GB/s | encode GB/s (x memcpy) | decode GB/s (x memcpy) | unpack GB/s (x memcpy) "
          "| encode_unpacked GB/s (x memcpy) | PowerSGD r1 comp/decomp GB/s "
          "| PowerSGD r4 comp/decomp GB/s | encode vs r1 compress | decode vs r1 decompress | kernel exchange s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        n, mem = r["elements"], gbs(r["elements"], r["memcpy_s"])
        enc, dec = gbs(n, r["encode_s"]), gbs(n, r["decode_s"])
        unp, enu = gbs(n, r["unpack_s"]), gbs(n, r["encode_unpacked_s"])
        print(f"| {n / 2**20:.0f}M | {mem:.2f} | {enc:.2f} ({enc / mem:.2f}x) | {dec:.2f} ({dec / mem:.2f}x) "
              f"| {unp:.1f} ({unp / mem:.1f}x) | {enu:.1f} ({enu / mem:.1f}x) "
              f"| {gbs(n, r['psgd1_compress_s']):.2f} / {gbs(n, r['psgd1_decompress_s']):.2f} "
              f"| {gbs(n, r['psgd4_compress_s']):.2f} / {gbs(n, r['psgd4_decompress_s']):.2f} "
              f"| {r['psgd1_compress_s'] / r['encode_s']:.2f}x | {r['psgd1_decompress_s'] / r['decode_s']:.2f}x "
              f"| {r['kernel_exchange_s']:.2f} |")
    out = Path(args.out or f"bench-out/codec_speed{'' if args.device == 'cpu' else '_cuda'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": str(cfg), "device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
