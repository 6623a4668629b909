"""Aggregation rules in real runs: actor-critic weights in the trace, fault injection, bad combinations."""

import json

import h5py
import numpy as np
import pytest

from conftest import run_mpi

pytestmark = pytest.mark.mpi
AC = ["--set", "aggregation.weighting=actor_critic", "--set", "train.steps=60", "--set", "faults.grad_scale.ranks=[2]"]


def weights_of(tmp_path, name):
    out = tmp_path / name
    result = run_mpi(4, ["run", *AC, "--set", f"output.dir={out}"], timeout=180)
    assert result.returncode == 0, result.stderr
    with h5py.File(out / "trace.h5", "r") as trace:
        return trace["workers/weight"][:]


def test_actor_critic_weights_are_probabilities_reproducible_and_shun_a_faulty_worker(tmp_path):
    first, again = weights_of(tmp_path, "a"), weights_of(tmp_path, "b")
    assert np.array_equal(first, again)                       # same seed, same probabilities
    assert np.isfinite(first).all() and np.allclose(first.sum(axis=1), 1.0)
    later = first[20:]                                         # after the warm-up
    assert later[:, 1].mean() < 0.5 / 3                        # rank 2 sends -5x gradients


def test_node_level_rules_refuse_coded_blocks(tmp_path):
    result = run_mpi(4, ["run", "--set", "aggregation.weighting=median", "--set", "coding.enabled=true",
                         "--set", f"output.dir={tmp_path}"], timeout=60)
    assert result.returncode == 2 and "weighs whole workers" in result.stderr


def test_fltrust_in_fedavg_trains_with_a_client_sized_reference_update(tmp_path):
    """Rank 0's reference is trained like a client's delta (local_steps steps), so FLTrust's rescaling
    to its norm keeps the clients' step size (with a one-gradient-step reference: 9.5% after 15 rounds)."""
    result = run_mpi(4, ["run", "--set", "algorithm=fedavg", "--set", "federated.clients=12", "--set",
                         "federated.rounds=15", "--set", "federated.local_steps=10", "--set",
                         "federated.server_adjust.enabled=false", "--set", "aggregation.weighting=fltrust",
                         "--set", f"output.dir={tmp_path}"], timeout=240)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_accuracy"] >= 0.85 and summary["replicas_identical"], summary["final_accuracy"]
