"""The sync step's state machine, driven in one process over the loopback transport (no MPI, no sleep)."""

from __future__ import annotations

import numpy as np
import pytest

from hpcfed.algorithms import sync_loopback
from hpcfed.config import load_config
from hpcfed.runtime.comm import HEADER

BASE = ["data.name=synthetic", "data.samples=400", "model.name=mlp", "model.hidden=16", "train.steps=8",
        "train.batch_size=8", "checkpoint.every=0"]


def run(*overrides: str, workers: int = 3, late=(), stop_at=None) -> sync_loopback.LoopbackSync:
    cfg = load_config(None, [*BASE, *overrides])
    sim = sync_loopback.build(cfg, workers)
    sim.late, sim.stop_at = set(late), dict(stop_at or {})
    return sim.run()


def params(sim: sync_loopback.LoopbackSync) -> np.ndarray:
    return sim.server.replica.model.params.numpy().copy()


def test_wait_all_keeps_replicas_identical_and_counts_every_byte():
    sim = run()
    assert len(sim.rows) == 8 and sim.replicas_identical() and sim.server.resyncs == 0
    n = sim.server.replica.model.size
    per_frame = HEADER.itemsize + 4 * n   # raw fp32 packets, no buffers in an MLP
    assert all(row["bytes_up"] == 3 * per_frame for row in sim.rows)
    assert all(row["bytes_down"] == 3 * per_frame for row in sim.rows)
    assert sum(w.transport.bytes_sent for w in sim.workers.values()) == 8 * 3 * per_frame


def test_a_late_worker_is_resynced_and_a_coded_step_stays_exact():
    coded = ["coding.enabled=true", "coding.mode=coded", "coding.target=2"]
    straight = run(*coded)
    late = run(*coded, late=[(2, 3)])
    assert late.server.resyncs == 1 and straight.server.resyncs == 0
    assert any("rank 2 missed step 3" in text for _, kind, text in late.server.events if kind == "straggler")
    assert late.columns[2]["used"][1] == 0            # step 3 closed without rank 2
    assert late.replicas_identical()
    assert np.array_equal(params(late), params(straight))   # coded: the exact gradient whoever was late


def test_wait_all_waits_for_the_late_worker():
    sim = run(late=[(2, 3)])
    assert sim.server.resyncs == 0 and sim.columns[2]["used"].tolist() == [1, 1, 1]
    assert np.array_equal(params(sim), params(run()))


def test_drop_stragglers_skips_the_late_worker_and_resyncs_it():
    sim = run("coding.enabled=true", "coding.mode=drop-stragglers", "coding.target=2", late=[(3, 5)])
    assert sim.columns[4]["used"].tolist() == [1, 1, 0] and sim.server.resyncs == 1
    assert sim.replicas_identical()


def test_a_stop_signal_on_a_worker_ends_every_rank_after_that_step():
    sim = run(stop_at={2: 4})
    assert len(sim.rows) == 4 and sim.server.stop_from == "rank 2"
    assert all(state.done and state.step == 5 for state in sim.state.values())
    assert sim.replicas_identical()


def test_kernel_refreshes_install_new_versions_everywhere():
    sim = run("compression.enabled=true", "compression.refresh_every=2", "compression.keep=0.05")
    versions = [row["kernel_version"] for row in sim.rows]
    assert versions == sorted(versions) and versions[-1] >= 3
    assert sim.server.kernel_bytes > 0 and sim.replicas_identical()
    assert {core.codec.version for core in sim.workers.values()} == {sim.server.codec.version}
    assert sim.rows[-1]["bytes_up"] < 3 * (HEADER.itemsize + 4 * sim.server.replica.model.size) / 10


def test_batchnorm_buffers_are_synchronised_and_hashed():
    sim = run("model.name=resnet", "model.depth=8", "model.hidden=16", "data.name=digits", "train.steps=4",
              workers=2)
    model = sim.server.replica.model
    assert model.buffer_size > 0 and sim.replicas_identical()
    buffers = model.export_buffers().numpy()
    fresh = sync_loopback.build(load_config(None, [*BASE, "model.name=resnet", "model.depth=8", "model.hidden=16",
                                                   "data.name=digits"]), 2).server.replica.model
    assert not np.array_equal(buffers, fresh.export_buffers().numpy())   # statistics moved from their start
    assert sim.rows[0]["bytes_up"] == 2 * (HEADER.itemsize + 4 * (model.size + model.buffer_size))


def test_compressed_runs_send_batchnorm_buffers_as_fp16_changes_and_stay_identical():
    resnet = ["model.name=resnet", "model.depth=8", "model.hidden=16", "data.name=digits", "train.steps=6"]
    sim = run(*resnet, "compression.enabled=true", "compression.refresh_every=2", workers=2)
    model, coding = sim.server.replica.model, sim.server.replica.buffer_coding
    assert coding.lossy and coding.nbytes == 4 + 2 * model.buffer_size and sim.replicas_identical()
    exact = run(*resnet, workers=2).server.replica.model.export_buffers().numpy()
    buffers = model.export_buffers().numpy()
    assert not np.array_equal(buffers, exact) and np.allclose(buffers, exact, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("weighting", ["uniform", "median", "fltrust", "actor_critic"])
def test_every_weighting_runs_in_the_coefficient_domain(weighting):
    sim = run("compression.enabled=true", f"aggregation.weighting={weighting}", "aggregation.validation_size=40",
              "train.steps=6")
    assert sim.replicas_identical() and all(np.isfinite(row["loss"]) for row in sim.rows)


def test_delta_kernel_refreshes_keep_replicas_identical_and_cost_fewer_bytes():
    full = run("compression.enabled=true", "compression.refresh_every=2", "compression.keep=0.05",
               "compression.swap=0")
    delta = run("compression.enabled=true", "compression.refresh_every=2", "compression.keep=0.05",
                "compression.swap=0.1")
    assert delta.replicas_identical() and delta.rows[-1]["kernel_version"] == full.rows[-1]["kernel_version"]
    assert {core.codec.version for core in delta.workers.values()} == {delta.server.codec.version}
    assert delta.server.kernel_bytes < 0.5 * full.server.kernel_bytes


@pytest.mark.parametrize("batch", [8, 40])
def test_the_validation_reward_compares_one_draw_before_and_after(batch):
    """validation(step, reward=True)'s first loss is taken on the previous step's draw: with the model
    unchanged in between it equals that step's loss exactly (on all 40 samples: the same loss)."""
    sim = sync_loopback.build(load_config(None, [*BASE, "aggregation.weighting=actor_critic",
                                                 "aggregation.validation_size=40",
                                                 f"aggregation.validation_batch={batch}"]), 3)
    validation = sim.server.validation
    losses = [validation(step, True) for step in range(1, 5)]
    assert all(before == previous[1] for previous, (before, _, _) in zip(losses, losses[1:]))
    assert len({loss for _, loss, _ in losses}) == (4 if batch < 40 else 1)   # fresh draws, or the whole set
    buffers_and_params = sim.server.replica.model.digest()
    validation(5, True)
    assert sim.server.replica.model.digest() == buffers_and_params
