"""Algorithm ``fedavg``: federated rounds with server-side adjustment on a shared dataset.

Each round rank 0 samples a fraction of the N simulated clients (spread round-robin over
the worker ranks), sends the global model to the ranks hosting them, and each client trains
locally for ``local_steps`` steps from it and uploads its delta. Rank 0 aggregates the deltas
(weighted by sample count or uniformly) and then ADJUSTS the aggregate by training it on a
small globally shared dataset that only rank 0 holds (optionally with a proximal pull to the
aggregate and early stopping on a held-out slice). The adjusted model is the next global model.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from hpcfed.aggregation.combiner import Combiner
from hpcfed.coding import block_batch
from hpcfed.config import ServerAdjustConfig
from hpcfed.data.datasets import Dataset, carve
from hpcfed.models import FlatModel, save_model
from hpcfed.optim import make_optimizer, state_tensors
from hpcfed import checkpointing
from hpcfed.checkpointing import LocalState
from hpcfed.runtime.comm import HEADER, SERVER, Flag, Frame, Kind, Tag
from hpcfed.runtime.stop import EXIT_RESUMABLE, StopRequest
from hpcfed.runtime.log import Progress
from hpcfed.seeding import rng
from hpcfed.session import Session, finish
from hpcfed.tracing import open_trace

STEP_COLUMNS = ["step", "loss", "accuracy", "accuracy_before_adjust", "test_loss", "bytes_up", "bytes_down",
                "wall_s", "t_clients", "t_adjust"]
WORKER_COLUMNS = ["bytes", "used", "weight"]


def run(session: Session) -> dict | None:
    return server(session) if session.is_server else worker(session)


def host_of(client: int, n_workers: int) -> int:
    """The worker rank that simulates ``client``."""
    return 1 + client % n_workers


def sample_clients(seed: int, round_: int, clients: int, fraction: float) -> np.ndarray:
    """The round's clients: a seeded choice without replacement, sorted."""
    count = max(1, int(round(fraction * clients)))
    return np.sort(rng(seed, "clients", round_).choice(clients, size=count, replace=False))


def round_flags(session: Session, stop: StopRequest, completed: int, first: int) -> int:
    """Collective, the same on every rank: checkpoint (and stop) after round ``completed``?

    Rounds run in lockstep, so one allreduce of the ranks' stop signals agrees on a stop.
    """
    every, last = session.cfg.checkpoint.every, session.cfg.federated.rounds
    stopping = session.channel.comm.allreduce(int(stop.requested), op=MPI.MAX) and completed < last
    flags = Flag.STOP | Flag.CHECKPOINT if stopping else 0
    if completed == last or (every > 0 and completed % every == 0 and completed > first):
        flags |= Flag.CHECKPOINT
    return flags


def local_state(session: Session, kept: dict[int, list[torch.Tensor]], combiner: Combiner | None) -> LocalState:
    """This rank's own state: clients' kept optimizer state (workers), the combiner (rank 0), fault RNGs."""
    arrays = {f"clients/{c}/{i}": t.numpy() for c, tensors in kept.items() for i, t in enumerate(tensors)}
    values = {"bytes_sent": session.channel.bytes_sent, "faults": session.faults.state()}
    for key, value in (combiner.state_dict() if combiner else {}).items():
        (arrays if isinstance(value, np.ndarray) else values)[f"combiner/{key}"] = value
    return LocalState(arrays, values)


def load_local_state(session: Session, local: LocalState, kept: dict[int, list[torch.Tensor]],
                     combiner: Combiner | None) -> None:
    for name, array in sorted(local.arrays.items(), key=lambda item: int(item[0].split("/")[-1])
                              if item[0].startswith("clients/") else 0):
        if name.startswith("clients/"):
            kept.setdefault(int(name.split("/")[1]), []).append(torch.from_numpy(array))
    if combiner is not None:
        flat = {**local.arrays, **local.values}
        combiner.load_state_dict({k.removeprefix("combiner/"): v for k, v in flat.items() if k.startswith("combiner/")})
    session.channel.bytes_sent = int(local.values["bytes_sent"])
    session.faults.load_state(local.values["faults"])


def server(session: Session) -> dict | int:
    cfg, fed, model, channel = session.cfg, session.cfg.federated, session.model, session.channel
    plan = Frame(8 * fed.clients)
    outbox = Frame(4 * model.size)
    inbox = [Frame(4 * model.size) for _ in range(fed.clients)]
    x_test, y_test = torch.from_numpy(session.test.x), torch.from_numpy(session.test.y)
    combiner = Combiner(cfg.aggregation, fed.clients, cfg.seed)
    first = 0
    if session.checkpoint is not None:
        first, local = checkpointing.restore(session, session.checkpoint)
        load_local_state(session, local, {}, combiner)
    trace = open_trace(session, STEP_COLUMNS, WORKER_COLUMNS, first if session.checkpoint else None)
    stop = StopRequest()
    validation = None if session.validation is None else (torch.from_numpy(session.validation.x),
                                                          torch.from_numpy(session.validation.y))
    progress = Progress(fed.rounds, initial=first, unit="round")
    rounds: list[dict] = []
    start = time.monotonic()
    for round_ in range(first + 1, fed.rounds + 1):
        flags = round_flags(session, stop, round_ - 1, first)
        if flags & Flag.CHECKPOINT:
            path = checkpointing.save(session, round_ - 1, local_state(session, {}, combiner))
            trace.event(round_ - 1, "checkpoint", path.name)
        if flags & Flag.STOP:
            trace.event(round_ - 1, "stop", f"resume with --resume {session.run_dir}")
            session.log.warning("stopped after round %d; checkpoint written; resume with: hpcfed run --resume %s",
                                round_ - 1, session.run_dir)
            trace.close()
            progress.close()
            return EXIT_RESUMABLE
        round_start, sent_before = time.monotonic(), channel.bytes_sent
        chosen = sample_clients(cfg.seed, round_, fed.clients, fed.fraction)
        plan.write(chosen.astype(np.int64), step=round_, kind=Kind.PLAN, sender=SERVER)
        channel.bcast(plan, plan.buffer.size)   # fixed size: a collective needs the same count everywhere
        nbytes = outbox.write(model.params.numpy(), step=round_, kind=Kind.MODEL, sender=SERVER)
        hosts = sorted({host_of(c, session.n_workers) for c in chosen})
        sends = [channel.isend(outbox, nbytes, rank) for rank in hosts]
        receives = [channel.irecv(inbox[c], host_of(c, session.n_workers), Tag.UPLINK) for c in chosen]
        MPI.Request.Waitall(sends + receives)
        delta, weights = combiner.combine(list(chosen), [inbox[c].payload(np.float32) for c in chosen],
                                          [session.block_sizes[c] for c in chosen])   # client order: reproducible
        before = model.evaluate(*validation)[0] if combiner.learns else 0.0
        model.params.add_(torch.from_numpy(np.asarray(delta, dtype=np.float32)))
        if combiner.learns:
            combiner.feedback(before - model.evaluate(*validation)[0])
        client_loss = float(np.mean([inbox[c].field("metric") for c in chosen]))
        loss_before, acc_before = model.evaluate(x_test, y_test)
        record = {"round": round_, "clients": chosen.tolist(), "client_loss": client_loss,
                  "test_loss_before_adjust": loss_before, "accuracy_before_adjust": acc_before}
        t_clients, clock = time.monotonic() - round_start, time.monotonic()
        if session.shared is not None:
            record.update(server_adjust(model, session.shared, fed.server_adjust, cfg.seed, round_))
        loss, accuracy = model.evaluate(x_test, y_test) if session.shared is not None else (loss_before, acc_before)
        record.update(test_loss=loss, accuracy=accuracy)
        rounds.append(record)
        received, used = np.zeros(session.n_workers), np.zeros(session.n_workers)
        share = np.zeros(session.n_workers)
        for weight, c in zip(weights, chosen):
            host = host_of(c, session.n_workers) - 1
            received[host] += inbox[c].field("length") + HEADER.itemsize
            used[host], share[host] = 1, share[host] + weight   # NaN for rules without weights
        trace.append_step({"step": round_, "loss": client_loss, "accuracy": accuracy, "accuracy_before_adjust":
                           acc_before, "test_loss": loss, "bytes_up": received.sum(),
                           "bytes_down": channel.bytes_sent - sent_before, "wall_s": time.monotonic() - session.started,
                           "t_clients": t_clients, "t_adjust": time.monotonic() - clock},
                          {"bytes": received, "used": used.astype(np.int8), "weight": share})
        progress.advance(accuracy=accuracy)
        progress.report(round_, client_loss=client_loss, acc_aggregate=acc_before, accuracy=accuracy)
    progress.close()
    round_flags(session, stop, fed.rounds, first)
    path = checkpointing.save(session, fed.rounds, local_state(session, {}, combiner))
    trace.event(fed.rounds, "checkpoint", path.name)
    trace.close()
    final_loss, final_accuracy = model.evaluate(x_test, y_test)
    save_model(session.run_dir / "model.h5", model.module, {"config": cfg.to_yaml(), "rounds": fed.rounds})
    train_time_s = time.monotonic() - start
    return finish(session, {
        "steps": fed.rounds,
        "rounds": fed.rounds,
        "final_accuracy": final_accuracy,
        "final_test_loss": final_loss,
        "train_time_s": train_time_s,
        "dense_bytes_per_step": 4 * model.size,
        "shared_samples": 0 if session.shared is None else len(session.shared),
        "resumed_from_round": first,
        "per_round": rounds,
    })


def worker(session: Session) -> int | None:
    fed, model, channel = session.cfg.federated, session.model, session.channel
    plan = Frame(8 * fed.clients)
    global_model = Frame(4 * model.size)
    outbox = Frame(4 * model.size)
    kept: dict[int, list[torch.Tensor]] = {}
    first = 0
    if session.checkpoint is not None:
        first, local = checkpointing.restore(session, session.checkpoint)
        load_local_state(session, local, kept, None)
    open_trace(session, STEP_COLUMNS, WORKER_COLUMNS, None)
    stop = StopRequest()
    for round_ in range(first + 1, fed.rounds + 1):
        flags = round_flags(session, stop, round_ - 1, first)
        if flags & Flag.CHECKPOINT:
            checkpointing.save(session, round_ - 1, local_state(session, kept, None))
        if flags & Flag.STOP:
            return EXIT_RESUMABLE
        channel.bcast(plan, plan.buffer.size)
        mine = [int(c) for c in plan.payload(np.int64) if host_of(int(c), session.n_workers) == session.rank]
        if not mine:
            continue
        channel.recv(global_model, SERVER, Tag.DOWNLINK)
        start = torch.from_numpy(global_model.payload(np.float32))
        for client in mine:
            loss = train_client(session, client, start, round_, kept)
            delta = (model.params - start).numpy()
            session.faults.update(delta)
            channel.send(outbox, outbox.write(delta, step=round_, kind=Kind.DELTA, sender=session.rank,
                                              block=client, metric=loss), SERVER)
    round_flags(session, stop, fed.rounds, first)
    checkpointing.save(session, fed.rounds, local_state(session, kept, None))
    finish(session, {})
    return None


def train_client(session: Session, client: int, start: torch.Tensor, round_: int,
                 kept: dict[int, list[torch.Tensor]]) -> float:
    """Local training of one client from the global parameters; returns its mean loss."""
    cfg, model = session.cfg, session.model
    data = session.blocks[client]
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    model.params.copy_(start)
    optimizer = make_optimizer(cfg.train, model)
    if cfg.federated.keep_optimizer_state and client in kept:
        for tensor, saved in zip(state_tensors(optimizer), kept[client]):
            tensor.copy_(saved)
    losses = []
    for local in range(cfg.federated.local_steps):
        rows = torch.from_numpy(block_batch(len(y), cfg.train.batch_size, cfg.seed, client,
                                            (round_ - 1) * cfg.federated.local_steps + local))
        losses.append(model.backward(x[rows], y[rows]))
        optimizer.step()
    if cfg.federated.keep_optimizer_state:
        kept[client] = [t.clone() for t in state_tensors(optimizer)]
    return float(np.mean(losses))


def server_adjust(model: FlatModel, shared: Dataset, cfg: ServerAdjustConfig, seed: int, round_: int) -> dict:
    """Fine-tune the aggregate on the shared set (rank 0 only); it sees no client or test data.

    The proximal term (mu/2)||w - w_aggregate||^2 keeps the small shared set from being
    overfitted; with early stopping, the parameters of the step with the lowest loss on a
    held-out slice of the shared set are kept (the aggregate itself is a candidate).
    """
    anchor = model.params.clone()
    train, holdout = shared, None
    if cfg.early_stop and len(shared) >= 2:
        holdout, train = carve(shared, cfg.holdout_fraction, seed, "holdout")
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    optimizer = torch.optim.SGD(model.module.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    pick = rng(seed, "server-adjust", round_)
    best_loss, best, best_step = float("inf"), anchor.clone(), 0
    if holdout is not None:
        best_loss = model.evaluate(torch.from_numpy(holdout.x), torch.from_numpy(holdout.y))[0]
    losses = []
    for step in range(1, cfg.steps + 1):
        rows = torch.from_numpy(pick.choice(len(y), size=min(cfg.batch_size, len(y)), replace=False))
        losses.append(model.backward(x[rows], y[rows]))
        if cfg.prox > 0:
            model.grads.add_(model.params - anchor, alpha=cfg.prox)
        optimizer.step()
        if holdout is not None:
            loss = model.evaluate(torch.from_numpy(holdout.x), torch.from_numpy(holdout.y))[0]
            if loss < best_loss:
                best_loss, best, best_step = loss, model.params.clone(), step
    if holdout is not None:
        model.params.copy_(best)
    return {"adjust_loss": float(np.mean(losses)), "adjust_steps_kept": best_step if holdout is not None else cfg.steps}
