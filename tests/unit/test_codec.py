"""GradientCodec: packets, sizes, error feedback, kernel exchange, drift, checkpoints, bad input."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hpcfed.codec import CompressionSettings, GradientCodec
from hpcfed.codec.dct import inverse
from hpcfed.errors import HpcfedError

CFG = CompressionSettings(block=8, keep=0.05, bits=8, history=2, refresh_every=3, warmup_steps=0, group=64)


def _grads(n: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]


def _sync(cfg: CompressionSettings, n: int, steps: int, workers: int = 3, seed: int = 0):
    """The product's sync loop in one process; returns (codecs, per-step update, bytes per step)."""
    codecs = [GradientCodec(n, cfg, seed=seed, rank=r) for r in range(workers + 1)]
    rng = np.random.default_rng(seed)
    updates, sizes = [], []
    for step in range(steps):
        due = [c.kernel_due(step) for c in codecs]
        assert len(set(due)) == 1
        if due[0]:
            merged = codecs[0].merge_kernels([c.local_kernel() for c in codecs[1:]])
            for c in codecs:
                c.install_kernel(merged)
        packets = [c.encode(rng.standard_normal(n).astype(np.float32), step) for c in codecs[1:]]
        assert {p.size for p in packets} == {codecs[0].payload_nbytes(step)}
        mean = np.mean([codecs[0].decode(p, step) for p in packets], axis=0)
        aggregate = codecs[0].encode(mean, step)
        assert aggregate.dtype == np.uint8 and aggregate.size == codecs[0].payload_nbytes(step)
        decoded = [c.decode(aggregate, step) for c in codecs]
        assert all(np.array_equal(d, decoded[0]) for d in decoded)          # replicas stay identical
        updates.append(decoded[0])
        sizes.append(aggregate.size)
    return codecs, updates, sizes


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
    codecs, updates, sizes = _sync(cfg, n, 6)
    assert all(u.shape == (n,) and u.dtype == np.float32 for u in updates)
    assert sizes[: warmup] == [4 * n] * warmup
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
    assert {c.forced_due for c in codecs} == {2} and all(c.kernel_due(2) for c in codecs)
    assert not any(c.kernel_due(1) for c in codecs)
    quiet, _, _ = _sync(dataclasses.replace(cfg, drift_threshold=0.0), 2000, 1)
    assert not any(c.kernel_due(2) for c in quiet)


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
    codecs, updates, sizes = _sync(cfg, 500, 3)
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
