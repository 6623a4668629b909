"""Federated rounds under mpiexec: 20 clients on 3 worker ranks, non-IID, with and without server adjustment."""

import json
import re
import os
import signal

import h5py
import numpy as np
import pytest
import torch

from conftest import run_mpi
from hpcfed.config import ModelConfig
from hpcfed.models import build_model, load_parameters

pytestmark = pytest.mark.mpi
FED = ["--set", "algorithm=fedavg", "--set", "federated.clients=20", "--set", "federated.rounds=5",
       "--set", "federated.local_steps=5", "--set", "data.partition=dirichlet", "--set", "data.alpha=0.3"]


def run(tmp_path, name, *extra):
    out = tmp_path / name
    result = run_mpi(4, ["run", *FED, *extra, "--set", f"output.dir={out}"], timeout=240)
    assert result.returncode == 0, result.stderr
    assert re.search(r"done: \d+ rounds,", result.stderr), result.stderr   # the end line counts rounds, not steps
    return out, json.loads((out / "summary.json").read_text())


def test_fedavg_with_adjustment_is_reproducible_and_keeps_data_apart(tmp_path):
    out, first = run(tmp_path, "a")
    _, again = run(tmp_path, "b")
    assert first["param_hashes"] == again["param_hashes"] and first["per_round"] == again["per_round"]
    assert len(first["per_round"]) == 5 and all(len(r["clients"]) == 6 for r in first["per_round"])
    assert all(0 <= r["accuracy"] <= 1 and "adjust_loss" in r for r in first["per_round"])
    assert first["replicas_identical"]                     # every rank ends with the same global model
    for r in first["per_round"]:                           # accept: better never raises the held-out loss
        assert r["adjust_accepted"] in (0, 1) and r["holdout_loss_after"] <= r["holdout_loss_before"]
        assert r["adjust_accepted"] or r["accuracy"] == r["accuracy_before_adjust"]
    # the shared set (the only data server adjustment trains on) is disjoint from clients and test
    with h5py.File(out / "splits.h5", "r") as splits:
        shared = set(splits["shared"][:])
        clients = [set(splits["blocks"][str(c)][:]) for c in range(20)]
        test = set(splits["test"][:])
    assert len(shared) == first["shared_samples"] > 0
    assert not shared & test and all(not shared & c for c in clients)
    assert sum(len(c) for c in clients) == len(set().union(*clients))     # clients are disjoint too
    # the published model loads into a fresh model of the same architecture
    model = build_model(ModelConfig(), (1, 8, 8), 10, seed=123)
    load_parameters(out / "model.h5", model)
    with h5py.File(out / "trace.h5", "r") as trace:
        assert trace["steps/step"][:].tolist() == [1, 2, 3, 4, 5]
        assert np.isclose(trace["steps/accuracy"][-1], first["final_accuracy"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fedavg_without_adjustment_has_no_shared_set(tmp_path):
    out, summary = run(tmp_path, "plain", "--set", "federated.server_adjust.enabled=false")
    assert summary["shared_samples"] == 0
    assert all(r["accuracy"] == r["accuracy_before_adjust"] for r in summary["per_round"])
    with h5py.File(out / "splits.h5", "r") as splits:
        assert "shared" not in splits


def test_fedavg_stop_and_resume_is_bit_identical(tmp_path):
    from test_resume import EXIT_RESUMABLE, finish, rank_pids, start, wait_for

    longer = ["--set", "federated.rounds=8", "--set", "checkpoint.every=2", "--set", "federated.local_steps=20"]
    _, whole = run(tmp_path, "whole", *longer)
    parted = tmp_path / "parted"
    proc = start([*FED, *longer, "--set", f"output.dir={parted}"])
    wait_for(lambda: (parted / "checkpoints" / "step_00000002.h5").exists(), 120, "the first checkpoint")
    os.kill(rank_pids(parted)[-1], signal.SIGUSR1)
    status, stderr = finish(proc)
    assert status == EXIT_RESUMABLE, stderr
    resumed = run_mpi(4, ["run", "--resume", str(parted)], timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((parted / "summary.json").read_text())["param_hashes"] == whole["param_hashes"]
