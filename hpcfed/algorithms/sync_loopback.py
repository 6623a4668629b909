"""Algorithm ``sync`` with rank 0 and every worker in one process, over the loopback transport.

The real step cores (:mod:`hpcfed.algorithms.sync_core`) exchange the real frames through a
:class:`~hpcfed.runtime.loopback.LoopbackHub`; a deterministic scheduler decides who moves
next, so tests can make a worker late at a chosen step, or send a stop signal, with no sleep.
Tests and benchmarks (codec and actor-critic simulations) drive the product's step this way.

Scheduling: answers are taken as soon as they arrive, and the on-time workers of a step upload
together. A worker is late (a straggler) at step s when ``(rank, s)`` is in ``late``: before rank 0
closes step s it uploads only when nothing else can move (so ``wait-all`` waits for it); once the
step has closed without it, its stale upload comes first, so it is resynced and rejoins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hpcfed.aggregation.combiner import Combiner
from hpcfed.algorithms.sync_core import (Replica, Schedule, ServerCore, WorkerCore, completion_rule,
                                         validation_pass)
from hpcfed.codec.codec import GradientCodec
from hpcfed.config import Config
from hpcfed.data.datasets import Dataset, load_dataset, train_test_split
from hpcfed.faults import Faults
from hpcfed.models import FlatModel, build_model
from hpcfed.optim import make_optimizer
from hpcfed.runtime.comm import SERVER, Flag, Tag
from hpcfed.runtime.loopback import LoopbackHub


class NoStop:
    """A stop request that never comes (rank 0's, in process)."""

    requested = False
    signal_name = ""


@dataclass
class _Worker:
    core: WorkerCore
    step: int = 1
    waiting: bool = False   # uploaded; waiting for rank 0's answer
    done: bool = False


@dataclass
class LoopbackSync:
    """One in-process ``sync`` run: ``server`` and ``workers`` (by rank) over ``hub``."""

    hub: LoopbackHub
    server: ServerCore
    workers: dict[int, WorkerCore]
    steps: int
    late: set[tuple[int, int]] = field(default_factory=set)     # (rank, step): held back at that step
    stop_at: dict[int, int] = field(default_factory=dict)       # rank -> step whose upload carries a stop signal
    rows: list[dict] = field(default_factory=list)
    columns: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = {rank: _Worker(core) for rank, core in self.workers.items()}
        self.hub.pump = self._pump

    def _priority(self, rank: int) -> int | None:
        """Who moves next, most urgent first: 0 = take an answer that has arrived, 1 = a late upload whose
        step rank 0 has closed (the straggler finally sends), 2 = upload on time, 3 = a late upload rank 0
        still waits for; None = cannot move."""
        worker = self.state[rank]
        if worker.done:
            return None
        if worker.waiting:
            box = self.hub.boxes[rank]
            arrived = any(src == SERVER and tag == int(Tag.DOWNLINK) for src, tag, _ in box.unexpected)
            return 0 if arrived else None
        if (rank, worker.step) not in self.late:
            return 2
        return 1 if self.server.completed >= worker.step else 3

    def _move(self, rank: int) -> None:
        worker = self.state[rank]
        if worker.waiting:
            worker.core.receive()
            completed, flags = worker.core.take()
            worker.waiting, worker.step = False, completed + 1
            worker.done = bool(flags & Flag.STOP) or worker.step > self.steps
        else:
            worker.core.upload(worker.step, self.stop_at.get(rank) == worker.step)
            worker.waiting = True

    def _pump(self, waiting_rank: int) -> bool:
        """Move every worker of the most urgent kind (see :meth:`_priority`) together, in rank order:
        on-time workers of a step upload at once, as if equally fast."""
        movable = {rank: p for rank in sorted(self.state) if (p := self._priority(rank)) is not None}
        if not movable:
            return False
        best = min(movable.values())
        for rank in [r for r, p in movable.items() if p == best]:
            self._move(rank)
        return True

    def run(self) -> "LoopbackSync":
        """Run every step (stopping early on a stop flag), then let every worker take its last answer."""
        for step in range(self.server.completed + 1, self.steps + 1):
            row, columns = self.server.run_step(step)
            self.rows.append(row)
            self.columns.append(columns)
            if self.server.flags & (Flag.CHECKPOINT | Flag.STOP):
                self.server.bring_all_to(step)
            if self.server.flags & Flag.STOP:
                break
        while self._pump(SERVER):
            pass
        self.server.close()
        return self

    def replicas_identical(self) -> bool:
        """Whether every worker holds rank 0's parameters and buffers, bit for bit."""
        digest = self.server.replica.model.digest()
        return all(core.replica.model.digest() == digest for core in self.workers.values())


def build(cfg: Config, n_workers: int, data: Dataset | None = None) -> LoopbackSync:
    """An in-process run of ``cfg`` (algorithm ``sync``) with ``n_workers`` workers, on the CPU.

    Data, blocks, models, codecs, faults and the combiner are made as the MPI start-up makes
    them (every replica is built from the same seed instead of broadcast from rank 0)."""
    from hpcfed.algorithms.sync_ps import block_batch_size_for
    from hpcfed.session import carve_validation, data_layout

    full = data if data is not None else load_dataset(cfg.data, cfg.seed)
    train, _ = train_test_split(full, cfg.data.test_fraction, cfg.seed)
    validation, train = carve_validation(cfg, train)
    assignment, blocks, _ = data_layout(cfg, train, n_workers)
    hub = LoopbackHub(n_workers + 1)
    batch = block_batch_size_for(n_workers, cfg.train.batch_size, assignment.n_blocks)

    def replica(rank: int) -> tuple[Replica, GradientCodec]:
        model = FlatModel(build_model(cfg.model, full.sample_shape, full.num_classes, cfg.seed))
        return (Replica(model, make_optimizer(cfg.train, model), np, compress_buffers=cfg.compression.enabled),
                GradientCodec(model.size, cfg.compression, np, seed=cfg.seed, rank=rank))

    server_replica, server_codec = replica(SERVER)
    check = None
    if validation is not None:
        check = validation_pass(server_replica, server_codec, torch.from_numpy(validation.x),
                                torch.from_numpy(validation.y), cfg.aggregation.validation_batch, cfg.seed)
    mode, wait_for = completion_rule(cfg.coding, n_workers)
    server = ServerCore(hub.endpoints[SERVER], server_codec, Combiner(cfg.aggregation, n_workers, cfg.seed),
                        server_replica, assignment, mode, wait_for, batch,
                        Schedule(cfg.train.steps, cfg.checkpoint.every), NoStop(), validation=check)
    workers = {}
    for rank in range(1, n_workers + 1):
        faults = Faults(cfg.faults, cfg.seed, rank)
        held = {b: faults.labels(blocks[b]) for b in assignment.blocks_of(rank - 1)}
        rep, codec = replica(rank)
        tensors = {b: (torch.from_numpy(d.x), torch.from_numpy(d.y)) for b, d in held.items()}
        workers[rank] = WorkerCore(hub.endpoints[rank], codec, rep, tensors, batch, cfg.seed, faults)
    return LoopbackSync(hub, server, workers, cfg.train.steps)


def accuracy_of(run: LoopbackSync, cfg: Config, data: Dataset | None = None) -> float:
    """Rank 0's accuracy on the run's test split."""
    full = data if data is not None else load_dataset(cfg.data, cfg.seed)
    _, test = train_test_split(full, cfg.data.test_fraction, cfg.seed)
    return run.server.replica.model.evaluate(torch.from_numpy(test.x), torch.from_numpy(test.y),
                                             cfg.train.eval_batch_size)[1]

