"""GradientCodec: packets, sizes, error feedback, kernel exchange, drift, checkpoints, bad input."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hpcfed.aggregation.combiner import Combiner
from hpcfed.algorithms.sync_core import Replica, Schedule, ServerCore, WorkerCore
from hpcfed.algorithms.sync_loopback import NoStop
from hpcfed.codec import CompressionSettings, GradientCodec
from hpcfed.coding import make_assignment
from hpcfed.config import AggregationConfig, FaultsConfig
from hpcfed.faults import Faults
from hpcfed.models import FlatModel
from hpcfed.runtime.loopback import LoopbackHub
from hpcfed.codec.dct import inverse
from hpcfed.errors import HpcfedError

CFG = CompressionSettings(block=8, keep=0.05, bits=8, history=2, refresh_every=3, warmup_steps=0, group=64,
                          swap=0.0)   # full kernel exchanges; delta refreshes are tested on their own


def _grads(n: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]


class _Logistic(torch.nn.Module):
    """n weights, two logits (z, -z) with z = x . w: gradients are dense random-looking vectors of length n."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.w
        return torch.stack([z, -z], dim=1)


def _sync(cfg: CompressionSettings, n: int, steps: int, workers: int = 3, seed: int = 0):
    """The product's sync step (rank 0's and the workers' step cores over the loopback transport) on a
    logistic model of n weights; returns (codecs by rank, the final parameters, update packet bytes per step)."""
    hub = LoopbackHub(workers + 1)
    gen = torch.Generator().manual_seed(seed)

    def replica() -> Replica:
        model = FlatModel(_Logistic(n))
        return Replica(model, torch.optim.SGD(model.module.parameters(), lr=0.1), np, compress_buffers=cfg.enabled)

    codecs = [GradientCodec(n, cfg, seed=seed, rank=r) for r in range(workers + 1)]
    server = ServerCore(hub.endpoints[0], codecs[0], Combiner(AggregationConfig(weighting="uniform"), workers, seed),
                        replica(), make_assignment(workers, workers, "cyclic"), "wait-all", workers, 8,
                        Schedule(steps, 0), NoStop())
    cores = {r: WorkerCore(hub.endpoints[r], codecs[r], replica(),
                           {r - 1: (torch.randn(64, n, generator=gen), torch.randint(0, 2, (64,), generator=gen))},
                           8, seed, Faults(FaultsConfig(), seed, r)) for r in range(1, workers + 1)}
    sizes = []
    for step in range(1, steps + 1):
        due = {c.kernel_due(step) for c in codecs}
        assert len(due) == 1                                                 # every rank agrees on refreshes
        for core in cores.values():
            core.upload(step)
        server.run_step(step)
        for core in cores.values():
            core.receive()
            assert core.take()[0] == step
        packet = codecs[0].payload_nbytes(step)
        assert server.update.field("length") >= packet and server.update.field("version") == codecs[0].version - (
            server.update.field("length") > packet)                         # a kernel rides along only on refreshes
        sizes.append(packet)
    params = server.replica.model.params.numpy()
    assert all(np.array_equal(core.replica.model.params.numpy(), params) for core in cores.values())
    return codecs, params.copy(), sizes


def test_lossless_settings_round_trip() -> None:
    cfg = dataclasses.replace(CFG, keep=1.0, bits=16, error_feedback=False)
    grad = _grads(1000, 1)[0]
    codec = GradientCodec(1000, cfg, rank=1)
    back = codec.decode(codec.encode(grad, 0), 0)
    assert np.linalg.norm(back - grad) < 1e-4 * np.linalg.norm(grad)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 700), block=st.sampled_from([2, 4, 8, 16]), bits=st.sampled_from([2, 4, 8, 16]),
       group=st.sampled_from([0, 7, 64]), warmup=st.integers(0, 2), stochastic=st.booleans())
def test_sync_loop_sizes_and_identical_replicas(n, block, bits, group, warmup, stochastic) -> None:
    cfg = dataclasses.replace(CFG, block=block, bits=bits, group=group, warmup_steps=warmup, stochastic=stochastic)
    codecs, params, sizes = _sync(cfg, n, 6)
    assert params.shape == (n,) and params.dtype == np.float32 and np.isfinite(params).all()
    assert sizes[: max(0, warmup - 1)] == [4 * n] * max(0, warmup - 1)   # steps 1 .. warmup-1 are dense
    if n < block * block:                                # only a tail: sent raw, exactly
        assert codecs[0].k == 0 and sizes[-1] == 4 * n + 1


@pytest.mark.parametrize("n", [64, 64 + 5, 10, 3 * 64])
def test_edge_sizes_and_all_zeros(n: int) -> None:
    codec = GradientCodec(n, CFG, rank=1)
    packet = codec.encode(np.zeros(n, np.float32), 0)
    assert packet.size == codec.payload_nbytes(0)
    assert np.array_equal(codec.decode(packet, 0), np.zeros(n, np.float32))


def test_error_feedback_conserves_the_gradient_sum() -> None:
    """Everything sent plus the final residual equals everything fed in (nothing is lost)."""
    n = 4 * 64 + 3
    codec = GradientCodec(n, CFG, rank=1)
    grads = _grads(n, 20, seed=3)
    sent = sum(codec.decode(codec.encode(g, s), s) for s, g in enumerate(grads))
    held = np.concatenate([inverse(codec.residual, 8, np), np.zeros(3, np.float32)])
    total = sum(grads)
    assert np.linalg.norm(sent + held - total) < 1e-4 * np.linalg.norm(total)


def test_kernel_schedule_versions_and_size() -> None:
    cfg = dataclasses.replace(CFG, warmup_steps=2, refresh_every=3)
    codecs, _, _ = _sync(cfg, 2000, 9)
    assert [s for s in range(12) if codecs[0].kernel_due(s)] == [2, 5, 8, 11]
    assert {c.version for c in codecs} == {3}
    local = codecs[1].local_kernel()
    assert local.dtype == np.uint8 and local.size < 1.5 * codecs[1].k
    with pytest.raises(HpcfedError, match="kernel version 3 received"):
        codecs[1].install_kernel(_stale(codecs[0], local))


def _stale(server: GradientCodec, local: np.ndarray) -> np.ndarray:
    server.version -= 1                                   # a payload built for the previous version
    try:
        return server.merge_kernels([local])
    finally:
        server.version += 1


def test_drift_flag_makes_every_rank_refresh_two_steps_later() -> None:
    cfg = dataclasses.replace(CFG, refresh_every=100, drift_threshold=0.99)
    codecs, _, _ = _sync(cfg, 2000, 1)
    assert {c.forced_due for c in codecs} == {3} and all(c.kernel_due(3) for c in codecs)
    assert not any(c.kernel_due(2) for c in codecs)
    quiet, _, _ = _sync(dataclasses.replace(cfg, drift_threshold=0.0), 2000, 1)
    assert not any(c.kernel_due(3) for c in quiet)


def test_same_seed_same_bytes_and_checkpoint_resume() -> None:
    cfg = dataclasses.replace(CFG, stochastic=True)
    grads = _grads(1500, 8, seed=5)
    a, b = GradientCodec(1500, cfg, seed=1, rank=2), GradientCodec(1500, cfg, seed=1, rank=2)
    first = [a.encode(g, s) for s, g in enumerate(grads[:4])]
    assert all(np.array_equal(x, b.encode(g, s)) for s, (x, g) in enumerate(zip(first, grads[:4])))
    resumed = GradientCodec(1500, cfg, seed=1, rank=2)
    resumed.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a.state_dict().items()})
    for s, g in enumerate(grads[4:], start=4):
        assert np.array_equal(a.encode(g, s), resumed.encode(g, s))


@pytest.mark.parametrize("step, bad", [(0, np.nan), (3, np.inf)])
@pytest.mark.parametrize("warmup", [0, 5])
def test_non_finite_gradient_names_step_and_rank(step: int, bad: float, warmup: int) -> None:
    codec = GradientCodec(300, dataclasses.replace(CFG, warmup_steps=warmup), rank=4)
    grad = np.ones(300, np.float32)
    grad[17] = bad
    with pytest.raises(HpcfedError, match=f"at step {step}, rank 4"):
        codec.encode(grad, step)


def test_bad_input_is_a_one_line_error() -> None:
    with pytest.raises(HpcfedError, match=r"compression.keep=1.5"):
        CompressionSettings(keep=1.5)
    codec = GradientCodec(300, CFG, rank=1)
    with pytest.raises(HpcfedError, match="expected 194"):
        codec.decode(np.zeros(5, np.uint8), 1)
    with pytest.raises(HpcfedError, match=r"expected \(300,\)"):
        codec.encode(np.zeros(299, np.float32), 0)
    with pytest.raises(HpcfedError, match="server"):
        GradientCodec(300, CFG, rank=0).local_kernel()


def test_disabled_codec_sends_raw_fp32() -> None:
    cfg = dataclasses.replace(CFG, enabled=False)
    codecs, _, sizes = _sync(cfg, 500, 3)
    assert sizes == [2000] * 3 and not codecs[0].kernel_due(3)


@pytest.mark.gpu
def test_cupy_matches_numpy() -> None:
    """The same xp code on CuPy: same packet sizes, decoded values close to NumPy's, kernel exchange runs."""
    from hpcfed.xp import cupy_or_none

    cp = cupy_or_none()
    if cp is None:
        pytest.skip("no CUDA GPU with CuPy")
    n, grads = 5000, _grads(5000, 4, seed=9)
    cfg = dataclasses.replace(CFG, bits=16, refresh_every=100, stochastic=True)
    cpu, gpu = GradientCodec(n, cfg, rank=1), GradientCodec(n, cfg, xp=cp, rank=1)
    for step, g in enumerate(grads):
        a, b = cpu.encode(g, step), gpu.encode(cp.asarray(g), step)
        assert a.size == b.size == cpu.payload_nbytes(step)
        assert np.allclose(cpu.decode(a, step), cp.asnumpy(gpu.decode(b, step)), atol=1e-3)
    gpu.install_kernel(gpu.merge_kernels([gpu.local_kernel()]))
    assert gpu.version == 1 and gpu.encode(cp.asarray(grads[0]), 4).size == gpu.payload_nbytes(4)


# ---- coefficient-domain API: unpack / densify / encode_unpacked / sizes --------------------


def _refresh(codecs: list[GradientCodec], workers: list[GradientCodec], step: int) -> None:
    """Install the next global kernel (merged from the workers' local kernels) on every codec when due."""
    if codecs[0].kernel_due(step):
        merged = codecs[0].merge_kernels([w.local_kernel() for w in workers])
        for c in codecs:
            c.install_kernel(merged)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 900), block=st.sampled_from([2, 3, 8, 16]), bits=st.sampled_from([2, 4, 8, 16]),
       group=st.sampled_from([0, 5, 64]), warmup=st.integers(0, 2), feedback=st.booleans(), seed=st.integers(0, 99))
def test_unpack_then_densify_is_decode_bit_for_bit(n, block, bits, group, warmup, feedback, seed) -> None:
    cfg = dataclasses.replace(CFG, block=block, bits=bits, group=group, warmup_steps=warmup, refresh_every=2,
                              error_feedback=feedback, drift_threshold=0.5)
    worker, a, b = (GradientCodec(n, cfg, seed=seed, rank=r) for r in (1, 0, 0))
    for step, grad in enumerate(_grads(n, 6, seed)):
        _refresh([a, b, worker], [worker], step)
        packet = worker.encode(grad, step)
        vec = b.unpack(packet, step)
        assert vec.shape == (b.unpacked_size(step),) and vec.dtype == np.float32
        assert b.unpacked_size(step) == (b.k + b.tail if b.compressed(step) else n)
        assert np.array_equal(b.densify(vec, step, np.empty(n, np.float32)), a.decode(packet, step))
        assert a.min_share == b.min_share                   # unpack reads the meta byte as decode does
        assert np.array_equal(a.encode(grad, step), b.encode(grad, step))
        assert a.forced_due == b.forced_due


def _aggregate_both_ways(cfg: CompressionSettings, n: int, steps: int, workers: int = 3):
    """Two rank-0 codecs fed the same packets: one encodes densify(mean), the other encode_unpacked(mean)."""
    ranks = [GradientCodec(n, cfg, seed=4, rank=r) for r in range(1, workers + 1)]
    dense, unpacked = GradientCodec(n, cfg, seed=4, rank=0), GradientCodec(n, cfg, seed=4, rank=0)
    rng = np.random.default_rng(11)
    for step in range(steps):
        _refresh([dense, unpacked, *ranks], ranks, step)
        packets = [w.encode(rng.standard_normal(n).astype(np.float32), step) for w in ranks]
        mean = np.mean([unpacked.unpack(p, step) for p in packets], axis=0, dtype=np.float32)
        for p in packets:
            dense.unpack(p, step)                                # same meta bookkeeping on both servers
        a = dense.encode(dense.densify(mean, step), step)
        b = unpacked.encode_unpacked(mean, step)
        yield step, dense, unpacked, a, b


@pytest.mark.parametrize("feedback", [True, False])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("group", [64, 0])
def test_encode_unpacked_equals_encode_of_densify(feedback: bool, stochastic: bool, group: int) -> None:
    """Aggregating in the coefficient domain sends what the dense path sends, up to float rounding."""
    cfg = dataclasses.replace(CFG, bits=4, group=group, refresh_every=2, warmup_steps=1,
                              error_feedback=feedback, stochastic=stochastic)
    n, versions = 64 * 40 + 7, set()
    for step, dense, unpacked, a, b in _aggregate_both_ways(cfg, n, 7):
        versions.add(unpacked.version)
        assert a.size == b.size == unpacked.payload_nbytes(step) and a[-1] == b[-1]
        decoded_a, decoded_b = dense.decode(a, step), unpacked.decode(b, step)
        scale = np.abs(decoded_a).max()
        assert np.allclose(decoded_a, decoded_b, rtol=0, atol=1e-5 * scale)
        if step < cfg.warmup_steps:
            assert np.array_equal(a, b)                          # dense step: the same bytes
        if feedback:
            assert np.allclose(dense.residual, unpacked.residual, rtol=0, atol=1e-5 * scale)
        else:
            assert dense.residual is None and unpacked.residual is None
    assert len(versions) >= 3                                    # kernels changed along the way


def test_encode_unpacked_is_order_k() -> None:
    """Off the kernel the residual is untouched, and the packet's tail is the vector's tail."""
    n = 64 * 50 + 5
    server = GradientCodec(n, CFG, rank=0)
    server.residual[:] = np.random.default_rng(0).standard_normal(server.n_coef).astype(np.float32)
    before = server.residual.copy()
    vec = np.random.default_rng(1).standard_normal(server.unpacked_size(0)).astype(np.float32)
    packet = server.encode_unpacked(vec, 0)
    off = np.ones(server.n_coef, bool)
    off[server.kernel] = False
    assert np.array_equal(server.residual[off], before[off])
    back = server.unpack(packet, 0)
    assert np.array_equal(back[server.k:], vec[server.k:])
    assert np.allclose(back[: server.k] + server.residual[server.kernel], vec[: server.k] + before[server.kernel],
                       atol=1e-6)


def test_dense_steps_in_the_unpacked_domain() -> None:
    n = 700
    for cfg in (dataclasses.replace(CFG, warmup_steps=3), dataclasses.replace(CFG, enabled=False)):
        server, twin = GradientCodec(n, cfg, rank=0), GradientCodec(n, cfg, rank=0)
        grad = _grads(n, 1)[0]
        assert server.unpacked_size(0) == n and server.payload_nbytes(0) == 4 * n
        packet = server.encode_unpacked(grad, 0)
        assert np.array_equal(packet, twin.encode(grad, 0))
        assert np.array_equal(server.unpack(packet, 0), grad) and np.array_equal(server.densify(grad, 0), grad)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3000), block=st.sampled_from([2, 4, 8]), keep=st.floats(0.01, 1.0),
       bits=st.sampled_from([2, 4, 8, 16]), group=st.sampled_from([0, 1, 7, 256]), warmup=st.integers(0, 2),
       enabled=st.booleans())
def test_max_payload_bounds_every_step(n, block, keep, bits, group, warmup, enabled) -> None:
    cfg = dataclasses.replace(CFG, block=block, keep=keep, bits=bits, group=group, warmup_steps=warmup,
                              enabled=enabled, refresh_every=1)
    codecs, _, sizes = _sync(cfg, n, 5, workers=2)
    bound = codecs[0].max_payload_nbytes()
    assert max(sizes) <= bound
    if group and enabled and warmup != 1:     # fixed groups: the bound is attained (steps count from 1, so
        assert bound == max(sizes)            # warmup_steps=1 leaves no dense step to attain the dense bound)
    spread = GradientCodec(n, cfg, rank=0)    # a kernel touching min(k, n_blocks) blocks is the worst case
    spread._install(1, np.sort(np.arange(spread.n_blocks)[: spread.k] * block * block)
                    if spread.k <= spread.n_blocks else np.arange(spread.k))
    assert spread.payload_nbytes(warmup) <= bound


def test_bad_sizes_are_one_line_errors() -> None:
    n = 64 * 10 + 3
    server, worker = GradientCodec(n, CFG, rank=0), GradientCodec(n, CFG, rank=1)
    packet = worker.encode(_grads(n, 1)[0], 0)
    size = server.unpacked_size(0)
    cases = [
        (lambda: server.unpack(packet[:-1], 0), "packet of"),
        (lambda: server.unpack(np.concatenate([packet, packet[:1]]), 0), "packet of"),
        (lambda: server.unpack(packet, 0, out=np.empty(size + 1, np.float32)), f"expected \\({size},\\)"),
        (lambda: server.densify(np.zeros(size - 1, np.float32), 0), f"expected \\({size},\\)"),
        (lambda: server.densify(np.zeros(size, np.float32), 0, np.empty(n - 1, np.float32)), f"expected \\({n},\\)"),
        (lambda: server.encode_unpacked(np.zeros(n, np.float32), 0), f"expected \\({size},\\)"),
        (lambda: worker.encode_unpacked(np.zeros(size, np.float32), 0), "worker"),
        (lambda: server.encode(np.zeros(n, np.float32), 0, out=np.empty(3, np.uint8)), "need"),
        (lambda: server.encode_unpacked(np.full(size, np.nan, np.float32), 0), "NaN/Inf values at step 0, rank 0"),
    ]
    for call, match in cases:
        with pytest.raises(HpcfedError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_encode_into_a_given_buffer() -> None:
    n = 64 * 20 + 1
    a, b = GradientCodec(n, CFG, rank=1), GradientCodec(n, CFG, rank=1)
    buffer = np.zeros(a.max_payload_nbytes() + 10, np.uint8)
    for step, grad in enumerate(_grads(n, 3)):
        packet = a.encode(grad, step, out=buffer)
        assert np.shares_memory(packet, buffer) and np.array_equal(packet, b.encode(grad, step))


def test_project_is_the_kernel_part_of_a_gradient() -> None:
    n = 64 * 30 + 9
    codec = GradientCodec(n, CFG, rank=0)
    grad = _grads(n, 1)[0]
    vec = codec.project(grad, 0)
    coef = np.zeros(codec.n_coef, np.float32)
    coef[codec.kernel] = vec[: codec.k]
    assert np.allclose(vec[: codec.k], forward_dct(grad[: codec.n_coef])[codec.kernel], atol=1e-5)
    assert np.allclose(codec.densify(vec, 0), np.concatenate([inverse(coef, 8, np), grad[codec.n_coef:]]), atol=1e-5)
    lossless = GradientCodec(n, dataclasses.replace(CFG, keep=1.0), rank=0)
    assert np.allclose(lossless.densify(lossless.project(grad, 0), 0), grad, atol=1e-5)
    assert np.array_equal(GradientCodec(n, dataclasses.replace(CFG, warmup_steps=1), rank=0).project(grad, 0), grad)


def forward_dct(x: np.ndarray) -> np.ndarray:
    from hpcfed.codec.dct import forward

    return forward(x, 8, np).reshape(-1)


def test_chunked_encoder_matches_one_chunk(monkeypatch) -> None:
    """The fused chunk loop (NumPy) gives the packets and state of a single pass over the vector."""
    import hpcfed.codec.codec as codec_module

    n, cfg = 64 * 300 + 11, dataclasses.replace(CFG, refresh_every=2, stochastic=True)
    monkeypatch.setattr(codec_module, "_CPU_CHUNK", 64 * 7)
    small = GradientCodec(n, cfg, seed=2, rank=1)
    monkeypatch.setattr(codec_module, "_CPU_CHUNK", 1 << 30)
    whole = GradientCodec(n, cfg, seed=2, rank=1)
    assert len(small._chunks) == 43 and len(whole._chunks) == 1
    for step, grad in enumerate(_grads(n, 5, seed=8)):
        for c in (small, whole):
            if c.kernel_due(step):
                c.install_kernel(c.merge_kernels([c.local_kernel()]))
        assert np.allclose(small.decode(small.encode(grad, step), step), whole.decode(whole.encode(grad, step), step),
                           atol=1e-4)
        assert np.allclose(small.residual, whole.residual, atol=1e-4) and np.allclose(small.energy, whole.energy,
                                                                                      rtol=1e-4)


def test_decode_without_the_sparse_inverse(monkeypatch) -> None:
    """The scatter + dense inverse fallback decodes the same vector as the CSR path."""
    from hpcfed.codec import dct

    n = 64 * 40 + 3
    worker = GradientCodec(n, CFG, rank=1)
    packet = worker.encode(_grads(n, 1)[0], 0)
    fast = GradientCodec(n, CFG, rank=0).decode(packet, 0)
    monkeypatch.setattr(dct, "_csr_matvecs", None)
    slow = GradientCodec(n, CFG, rank=0)
    assert not slow._inverse.sparse
    assert np.allclose(slow.decode(packet, 0), fast, atol=1e-6)


def test_no_per_call_allocation_of_order_n() -> None:
    """After the first call, encode/decode/unpack/densify/encode_unpacked reuse their buffers."""

    n = 1 << 18
    cfg = dataclasses.replace(CFG, keep=0.02, bits=4, group=256, refresh_every=2)
    worker, server = GradientCodec(n, cfg, rank=1), GradientCodec(n, cfg, rank=0)
    grads = _grads(n, 2)
    dst, vec = np.empty(n, np.float32), np.empty(server.unpacked_size(1), np.float32)
    packet_buffer = np.empty(server.max_payload_nbytes(), np.uint8)

    def step_once() -> None:
        packet = worker.encode(grads[1], 1)
        server.unpack(packet, 1, out=vec)
        server.densify(vec, 1, dst)
        server.decode(packet, 1, out=dst)
        server.encode_unpacked(vec, 1, out=packet_buffer)

    step_once()
    buffers = [id(x) for x in (worker.residual, worker.energy, server.residual, *worker._scratch.values(),
                               *server._scratch.values())]
    peak = _peak_bytes(step_once)
    assert peak < n                           # bytes: under a quarter of one fp32 gradient (k = 0.02 n)
    assert buffers == [id(x) for x in (worker.residual, worker.energy, server.residual, *worker._scratch.values(),
                                       *server._scratch.values())]


def _peak_bytes(call) -> int:
    """Peak bytes Python allocates while ``call()`` runs (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_no_per_call_allocation_at_dense_steps() -> None:
    """Warm-up steps too: with a packet buffer, nothing of order n is allocated per call."""

    n = 1 << 16
    cfg = dataclasses.replace(CFG, warmup_steps=5, refresh_every=2)
    worker, server = GradientCodec(n, cfg, rank=1), GradientCodec(n, cfg, rank=0)
    grad, dst = _grads(n, 1)[0], np.empty(n, np.float32)
    buffer = np.empty(server.max_payload_nbytes(), np.uint8)

    def step_once() -> None:
        packet = worker.encode(grad, 3, out=buffer)          # a history step: energy accumulates
        server.decode(packet, 3, out=dst)
        server.unpack(packet, 3, out=dst)
        server.densify(dst, 3, dst)
        server.encode_unpacked(dst, 3, out=buffer)

    step_once()
    peak = _peak_bytes(step_once)
    assert peak < n // 4


@pytest.mark.gpu
def test_cupy_coefficient_domain_matches_numpy() -> None:
    """unpack / densify / encode_unpacked on CuPy agree with NumPy."""
    from hpcfed.xp import cupy_or_none

    cp = cupy_or_none()
    if cp is None:
        pytest.skip("no CUDA GPU with CuPy")
    n, cfg = 5000, dataclasses.replace(CFG, bits=16, group=0)
    worker = GradientCodec(n, cfg, rank=1)
    cpu, gpu = GradientCodec(n, cfg, rank=0), GradientCodec(n, cfg, xp=cp, rank=0)
    for step, g in enumerate(_grads(n, 3, seed=2)):
        packet = worker.encode(g, step)
        a, b = cpu.unpack(packet, step), gpu.unpack(cp.asarray(packet), step)
        assert np.allclose(a, cp.asnumpy(b), atol=1e-6)
        assert np.allclose(cpu.densify(a, step), cp.asnumpy(gpu.densify(b, step)), atol=1e-5)
        pa, pb = cpu.encode_unpacked(a, step), gpu.encode_unpacked(b, step)
        assert pa.size == pb.size == cpu.payload_nbytes(step) <= cpu.max_payload_nbytes()
        assert np.allclose(cpu.decode(pa, step), cp.asnumpy(gpu.decode(pb, step)), atol=1e-4)


def test_kernel_order_residual_of_rank_0_is_exact() -> None:
    """Rank 0 keeping its kernel residual in kernel order gives the bytes and state of writing it back each step."""
    n, cfg = 64 * 60 + 5, dataclasses.replace(CFG, refresh_every=2, stochastic=True)
    ranks = [GradientCodec(n, cfg, seed=1, rank=r) for r in (1, 2)]
    lazy, eager = GradientCodec(n, cfg, seed=1, rank=0), GradientCodec(n, cfg, seed=1, rank=0)
    rng = np.random.default_rng(5)
    for step in range(7):
        _refresh([lazy, eager, *ranks], ranks, step)
        packets = [w.encode(rng.standard_normal(n).astype(np.float32), step) for w in ranks]
        mean = np.mean([lazy.unpack(p, step) for p in packets], axis=0, dtype=np.float32)
        for p in packets:
            eager.unpack(p, step)
        a = lazy.encode_unpacked(mean, step)
        b = eager.encode_unpacked(mean, step)
        assert eager.residual is not None                        # reading it writes the kernel part back
        assert not eager._kept_live and np.array_equal(a, b)
        if step == 4:                                            # a checkpoint in between restores exactly
            restored = GradientCodec(n, cfg, seed=1, rank=0)
            restored.load_state_dict(lazy.state_dict())
            assert np.array_equal(restored.residual, eager.residual)
            lazy = restored
    assert np.array_equal(lazy.residual, eager.residual)
    grad = rng.standard_normal(n).astype(np.float32)             # a dense-domain encode after it sees the same
    assert np.array_equal(lazy.encode(grad, 7), eager.encode(grad, 7))


def test_the_array_module_generic_path_matches_numpy() -> None:
    """The code CuPy runs (one chunk, scatter + dense inverse, sort-based group absmax, add after the GEMM),
    exercised through a NumPy stand-in module: same sizes, values equal up to rounding."""
    import types

    generic = types.ModuleType("numpy_standin")
    generic.__dict__.update({k: v for k, v in np.__dict__.items() if not k.startswith("__")})
    n = 64 * 300 + 7
    for cfg in (dataclasses.replace(CFG, group=0, refresh_every=2), dataclasses.replace(CFG, block=16, group=64)):
        ours = [GradientCodec(n, cfg, rank=r) for r in (1, 0)]
        theirs = [GradientCodec(n, cfg, xp=generic, rank=r) for r in (1, 0)]
        assert theirs[0]._chunk == theirs[0].n_coef and not theirs[1]._inverse.sparse
        for step, grad in enumerate(_grads(n, 5, seed=6)):
            for codecs in (ours, theirs):
                if codecs[1].kernel_due(step):
                    merged = codecs[1].merge_kernels([codecs[0].local_kernel()])
                    for c in codecs:
                        c.install_kernel(merged)
            a, b = ours[0].encode(grad, step), theirs[0].encode(grad, step)
            assert a.size == b.size == ours[1].payload_nbytes(step)
            va, vb = ours[1].unpack(a, step), theirs[1].unpack(b, step)
            assert np.allclose(va, vb, atol=1e-5)
            assert np.allclose(ours[1].densify(va, step), theirs[1].densify(vb, step), atol=1e-5)
            pa, pb = ours[1].encode_unpacked(va, step), theirs[1].encode_unpacked(vb, step)
            assert np.allclose(ours[1].decode(pa, step), theirs[1].decode(pb, step), atol=1e-4)


def test_the_gemm_path_without_the_compiled_pass_matches_it(monkeypatch) -> None:
    """Without the C extension (no compiler) the encode runs the NumPy GEMM: the same packets' content,
    residual and energy up to float rounding."""
    from hpcfed.codec import dct

    compiled = dct._forward_fused
    if compiled is None:
        pytest.skip(dct.fused_kind())
    n, cfg = 64 * 300 + 11, dataclasses.replace(CFG, refresh_every=2)
    codecs = {True: GradientCodec(n, cfg, seed=3, rank=1), False: GradientCodec(n, cfg, seed=3, rank=1)}
    server = GradientCodec(n, cfg, seed=3, rank=0)
    for step, grad in enumerate(_grads(n, 6, seed=4)):
        decoded = {}
        for fused, codec in codecs.items():
            monkeypatch.setattr(dct, "_forward_fused", compiled if fused else None)
            assert dct.fused(8, np) == fused
            if codec.kernel_due(step):
                codec.install_kernel(codec.merge_kernels([codec.local_kernel()]))
            decoded[fused] = server.decode(codec.encode(grad, step), step)
        assert np.allclose(decoded[True], decoded[False], atol=1e-4)
        assert np.allclose(codecs[True].residual, codecs[False].residual, atol=1e-4)
        assert np.allclose(codecs[True].energy, codecs[False].energy, rtol=1e-4, atol=1e-5)
    assert dct.fused_kind() == "compiled 8x8 pass (" + dct._isa() + ")"
