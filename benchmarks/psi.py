"""PSI throughput: `hpcfed align` (1 and 2 ranks per party) against openmined-psi, in one run.

Two parties with N ids each, half of them common (random 20-character ids in text files).
Throughput = ids of both parties / seconds. hpcfed's time is measured inside the job (slowest
rank) around `hpcfed.psi.align.main`: reading the files, the protocol, writing the HDF5 files;
not the ~1 s mpiexec start, shown separately as wall. openmined-psi 2.x runs its ECDH
protocol in raw mode (server setup, client request, server response, client intersection)
in this process on the same ids already in memory. Sizes above --openmined-max are not run
for openmined: its time is extrapolated linearly from its two largest measured sizes (its
cost is linear in N), and the table says so. A primitives table gives per-core rates of the
group operations candidates. On a shared machine wall times depend on the other load, so the
table also gives CPU time (busiest process) and the throughput it implies with a core per
process, ratioed the same way. Needs `pip install openmined-psi` (and `cryptography`, optional).

    PYTHONPATH=. python benchmarks/psi.py [--quick] [--sizes 100000 1000000] [--out bench-out/psi.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import markdown_table, mpiexec, save_json


def make_ids(n: int, folder: Path) -> list[Path]:
    """Two text files of n ids each, n // 2 common, in independent random orders."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"party_{k}.txt" for k in range(2)]
    if all(p.exists() for p in paths):
        return paths
    rng = random.Random(n)
    pool = [f"id-{rng.getrandbits(80):020x}" for _ in range(n + n // 2)]
    for k, path in enumerate(paths):
        ids = pool[k * (n // 2): k * (n // 2) + n]
        rng.shuffle(ids)
        path.write_text("\n".join(ids) + "\n")
    return paths


def run_hpcfed(paths: list[Path], ranks_per_party: int, out: Path) -> dict:
    """One alignment under mpiexec (this file as the MPI program); returns its timing record."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "align.yaml"
    config.write_text("parties:\n" + "".join(f"  - {{path: {p}}}\n" for p in paths)
                      + f"ranks_per_party: {ranks_per_party}\noutput: {{dir: {out}}}\n")
    cmd = [mpiexec(), "-n", str(2 * ranks_per_party), sys.executable, "-m", "mpi4py", __file__,
           "--worker", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"hpcfed align failed ({proc.returncode}): {proc.stderr[-2000:]}")
    record = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    return {**record, "wall_s": wall}


def worker(config: str) -> None:
    """Inside mpiexec: time `main` on every rank; rank 0 prints the slowest rank's time as JSON.

    Like align itself, the worker talks through the project's Transport with integer buffers only.
    """
    import h5py

    from hpcfed.psi.align import main, output_path
    from hpcfed.psi.config import load_align_config
    from hpcfed.runtime.transport import Transport

    net = Transport()
    net.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    main(config, [], net)
    mine = [round((time.perf_counter() - start) * 1e6), round((time.process_time() - cpu) * 1e6),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]   # us, us, KiB
    seconds_us, cpu_us, peak_kb = net.allgather_ints(mine).max(axis=0).tolist()
    if net.rank == 0:
        with h5py.File(output_path(load_align_config(config), 0)) as f:
            print(json.dumps({"seconds": seconds_us / 1e6, "cpu_s": cpu_us / 1e6,
                              "n_intersection": int(f.attrs["n_intersection"]),
                              "bytes_sent_party0": int(f.attrs["bytes_sent"]), "peak_rss_mb": peak_kb / 1024}),
                  flush=True)


def run_openmined(paths: list[Path]) -> dict:
    """openmined-psi's ECDH PSI (raw mode) on the same ids, one process; returns time and size."""
    import private_set_intersection.python as psi

    server_ids, client_ids = (p.read_text().split() for p in paths)
    start, cpu = time.perf_counter(), time.process_time()
    server = psi.server.CreateWithNewKey(True)
    client = psi.client.CreateWithNewKey(True)
    setup = server.CreateSetupMessage(1e-9, len(client_ids), server_ids, psi.DataStructure.RAW)
    request = client.CreateRequest(client_ids)
    response = server.ProcessRequest(request)
    common = client.GetIntersection(setup, response)
    return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "n_intersection": len(common)}


def primitive_rates(n: int = 2000) -> list[list[object]]:
    """Per-core operations per second (CPU time) of the candidate building blocks."""
    import hashlib

    from nacl import bindings as sodium

    from hpcfed.psi import ecdh

    msgs = [f"id-{i:020x}".encode() for i in range(n)]
    digests = [hashlib.sha512(m).digest()[:32] for m in msgs]
    us = [ecdh.point_bytes(m) for m in msgs]
    key = ecdh.new_key()
    scalar = sodium.crypto_core_ed25519_scalar_reduce(hashlib.sha512(key).digest())
    edwards = [sodium.crypto_core_ed25519_from_uniform(d) for d in digests]
    ops = {
        "hash to curve25519: RFC 9380 Elligator 2 (gmpy2) [used]": lambda: [ecdh.point_bytes(m) for m in msgs],
        "hash to ed25519: libsodium from_uniform": lambda: [sodium.crypto_core_ed25519_from_uniform(d)
                                                            for d in digests],
        "X25519 multiply: libsodium via PyNaCl [used]": lambda: [sodium.crypto_scalarmult(key, u) for u in us],
        "ed25519 noclamp multiply: libsodium": lambda: [sodium.crypto_scalarmult_ed25519_noclamp(scalar, p)
                                                         for p in edwards],
    }
    try:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

        private = X25519PrivateKey.from_private_bytes(key)
        ops["X25519 multiply: OpenSSL via cryptography"] = lambda: [
            private.exchange(X25519PublicKey.from_public_bytes(u)) for u in us]
    except ImportError:
        pass
    rows = []
    for name, op in ops.items():
        start = time.process_time()
        op()
        rows.append([name, f"{n / (time.process_time() - start):,.0f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 ids per party")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--openmined-max", type=int, default=300_000,
                        help="largest size openmined runs at; larger ones are extrapolated")
    parser.add_argument("--out", default="bench-out/psi.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    sizes = [2000] if args.quick else sorted(args.sizes)
    omax = max(sizes) if args.quick else args.openmined_max
    data = REPO / Path(args.out).parent / "psi-data"
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    primitives = primitive_rates()
    print(markdown_table(["primitive (one core)", "ops/s"], primitives), flush=True)
    openmined: dict[int, dict] = {}
    for n in sorted({*[s for s in sizes if s <= omax], *([min(omax, 300_000)] if max(sizes) > omax else [])}):
        openmined[n] = {**run_openmined(make_ids(n, data / str(n))), "measured": True}
        print(f"openmined-psi n={n:,}: {openmined[n]['seconds']:.1f} s", flush=True)
    rows, results = [], []
    for n in sizes:
        if n not in openmined:
            (n1, r1), (n2, r2) = sorted(openmined.items())[-2:]
            openmined[n] = {key: r2[key] + (r2[key] - r1[key]) / (n2 - n1) * (n - n2) for key in ("seconds", "cpu_s")}
            openmined[n].update(measured=False, n_intersection=n // 2, extrapolated_from=[n1, n2])
        base = openmined[n]
        base_rate, base_cpu_rate = 2 * n / base["seconds"], 2 * n / base["cpu_s"]
        note = "measured" if base["measured"] else "extrapolated from {:,} and {:,}".format(*base["extrapolated_from"])
        rows.append([f"{n:,}", "openmined-psi (raw, 1 process)", 1, f"{base['seconds']:.1f}", f"{base_rate:,.0f}",
                     "1.00", f"{base['cpu_s']:.1f}", f"{base_cpu_rate:,.0f}", "1.00", note])
        results.append({"n": n, "impl": "openmined-psi", **base, "ids_per_s": base_rate,
                        "ids_per_cpu_s": base_cpu_rate})
        for per_party in (1, 2):
            rec = run_hpcfed(make_ids(n, data / str(n)), per_party, REPO / Path(args.out).parent / f"psi-run-{n}")
            assert rec["n_intersection"] == base["n_intersection"] == n // 2, (rec, base)
            rate, cpu_rate = 2 * n / rec["seconds"], 2 * n / rec["cpu_s"]
            rows.append([f"{n:,}", f"hpcfed align, {per_party} rank(s)/party", 2 * per_party,
                         f"{rec['seconds']:.1f}", f"{rate:,.0f}", f"{rate / base_rate:.2f}", f"{rec['cpu_s']:.1f}",
                         f"{cpu_rate:,.0f}", f"{cpu_rate / base_cpu_rate:.2f}",
                         f"mpiexec wall {rec['wall_s']:.1f} s, peak RSS/rank {rec['peak_rss_mb']:.0f} MB"])
            results.append({"n": n, "impl": "hpcfed", "ranks_per_party": per_party, **rec, "ids_per_s": rate,
                            "ratio_vs_openmined": rate / base_rate, "ids_per_cpu_s": cpu_rate,
                            "cpu_ratio_vs_openmined": cpu_rate / base_cpu_rate})
            print(f"hpcfed n={n:,} ranks/party={per_party}: {rec['seconds']:.1f} s", flush=True)
    print()
    print(markdown_table(["ids/party", "implementation", "processes", "seconds", "ids/s (both parties)",
                          "ratio vs openmined", "CPU s (busiest process)", "ids/s if each process had a core",
                          "ratio (CPU-time based)", "note"], rows))
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")
    path = save_json(Path(args.out).stem, {"primitives": primitives, "results": results,
                                           "cores": os.cpu_count()}, str(Path(args.out).parent))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
