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

from hpcfed.aggregation.combiner import Combiner
from hpcfed.coding import block_batch
from hpcfed.config import Config, ServerAdjustConfig
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

STEP_COLUMNS = ["step", "loss", "accuracy", "accuracy_before_adjust", "adjust_accepted", "test_loss", "bytes_up",
                "bytes_down", "wall_s", "t_clients", "t_adjust"]
WORKER_COLUMNS = ["bytes", "used", "weight"]


def run(session: Session) -> dict | None:
    return server(session) if session.is_server else worker(session)


def host_of(client: int, n_workers: int) -> int:
    """The worker rank that simulates ``client``."""
    return 1 + client % n_workers


def model_floats(model: FlatModel) -> int:
    """Floats of a model frame: the parameters, then the buffers (BatchNorm statistics)."""
    return model.size + model.buffer_size


def mean_buffers(reported: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """The clients' buffers averaged by sample count, in client order (the same bytes on every run)."""
    total = np.zeros_like(reported[0])
    for buffers, count in zip(reported, counts):
        total += np.float32(count) * buffers
    return total / np.float32(sum(counts))


def validation_delta(cfg: Config, model: FlatModel, validation: tuple[torch.Tensor, torch.Tensor],
                     round_: int) -> np.ndarray:
    """Rank 0's reference update, trained as a client trains (FLTrust's server update): ``local_steps``
    steps of a fresh optimizer on its validation set from the global model; the model is put back."""
    start, buffers = model.params.clone(), model.export_buffers()
    local_training(cfg, model, make_optimizer(cfg.train, model), *validation, cfg.federated.clients, round_)
    delta = (model.params - start).numpy().copy()
    model.params.copy_(start)
    model.import_buffers(buffers)
    return delta


def clients_per_round(clients: int, fraction: float) -> int:
    return max(1, int(round(fraction * clients)))


def sample_clients(seed: int, round_: int, clients: int, fraction: float) -> np.ndarray:
    """The round's clients: a seeded choice without replacement, sorted."""
    count = clients_per_round(clients, fraction)
    return np.sort(rng(seed, "clients", round_).choice(clients, size=count, replace=False))


def round_flags(session: Session, stop: StopRequest, completed: int, first: int) -> int:
    """Collective, the same on every rank: checkpoint (and stop) after round ``completed``?

    Rounds run in lockstep, so one allreduce of the ranks' stop signals agrees on a stop.
    """
    every, last = session.cfg.checkpoint.every, session.cfg.federated.rounds
    stopping = session.transport.allreduce_max(int(stop.requested)) and completed < last
    flags = Flag.STOP | Flag.CHECKPOINT if stopping else 0
    if completed == last or (every > 0 and completed % every == 0 and completed > first):
        flags |= Flag.CHECKPOINT
    return flags


def local_state(session: Session, kept: dict[int, list[torch.Tensor]], combiner: Combiner | None) -> LocalState:
    """This rank's own state: clients' kept optimizer state (workers), the combiner (rank 0), fault RNGs."""
    arrays = {f"clients/{c}/{i}": t.numpy() for c, tensors in kept.items() for i, t in enumerate(tensors)}
    values = {"bytes_sent": session.transport.bytes_sent, "faults": session.faults.state()}
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
    session.transport.bytes_sent = int(local.values["bytes_sent"])
    session.faults.load_state(local.values["faults"])


def server(session: Session) -> dict | int:
    cfg, fed, model, transport = session.cfg, session.cfg.federated, session.model, session.transport
    plan = Frame(8 * fed.clients)
    outbox = Frame(4 * model_floats(model))
    inbox = [Frame(4 * model_floats(model)) for _ in range(fed.clients)]
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
        round_start, sent_before = time.monotonic(), transport.bytes_sent
        chosen = sample_clients(cfg.seed, round_, fed.clients, fed.fraction)
        plan.write(chosen.astype(np.int64), step=round_, kind=Kind.PLAN, sender=SERVER)
        transport.bcast_frame(plan, plan.buffer.size)   # fixed size: a collective needs the same count everywhere
        nbytes = outbox.write([model.params.numpy(), model.export_buffers().numpy()], step=round_, kind=Kind.MODEL,
                              sender=SERVER)
        hosts = sorted({host_of(c, session.n_workers) for c in chosen})
        sends = [transport.isend(outbox, nbytes, rank) for rank in hosts]
        receives = [transport.irecv(inbox[c], host_of(c, session.n_workers), Tag.UPLINK) for c in chosen]
        reference = None   # rank 0's own work on the global model runs while the clients train
        if combiner.learns or combiner.wants_reference:
            reference = validation_delta(cfg, model, validation, round_)
        before = model.evaluate(*validation)[0] if combiner.learns else 0.0
        transport.wait_all(sends + receives)
        uploads = [inbox[c].payload(np.float32) for c in chosen]   # client order: reproducible
        counts = [session.block_sizes[c] for c in chosen]
        delta, weights = combiner.combine(list(chosen), [u[:model.size] for u in uploads], counts,
                                          reference=reference)
        model.params.add_(torch.from_numpy(np.asarray(delta, dtype=np.float32)))
        model.import_buffers(torch.from_numpy(mean_buffers([u[model.size:] for u in uploads], counts)))
        if combiner.learns:
            combiner.feedback(before - model.evaluate(*validation)[0])
        client_loss = float(np.mean([inbox[c].field("metric") for c in chosen]))
        loss_before, acc_before = model.evaluate(x_test, y_test, cfg.train.eval_batch_size)
        record = {"round": round_, "clients": chosen.tolist(), "client_loss": client_loss,
                  "test_loss_before_adjust": loss_before, "accuracy_before_adjust": acc_before}
        t_clients, clock = time.monotonic() - round_start, time.monotonic()
        if session.shared is not None:
            record.update(server_adjust(model, session.shared, fed.server_adjust, cfg.seed, round_))
        adjusted = session.shared is not None and record["adjust_accepted"]
        loss, accuracy = model.evaluate(x_test, y_test, cfg.train.eval_batch_size) if adjusted else (loss_before,
                                                                                                     acc_before)
        record.update(test_loss=loss, accuracy=accuracy)
        rounds.append(record)
        received, used = np.zeros(session.n_workers), np.zeros(session.n_workers)
        share = np.zeros(session.n_workers)
        for weight, c in zip(weights, chosen):
            host = host_of(c, session.n_workers) - 1
            received[host] += inbox[c].field("length") + HEADER.itemsize
            used[host], share[host] = 1, share[host] + weight   # NaN for rules without weights
        trace.append_step({"step": round_, "loss": client_loss, "accuracy": accuracy, "accuracy_before_adjust":
                           acc_before, "adjust_accepted": record.get("adjust_accepted", 0), "test_loss": loss,
                           "bytes_up": received.sum(),
                           "bytes_down": transport.bytes_sent - sent_before, "wall_s": time.monotonic() - session.started,
                           "t_clients": t_clients, "t_adjust": time.monotonic() - clock},
                          {"bytes": received, "used": used.astype(np.int8), "weight": share})
        progress.advance(accuracy=accuracy)
        progress.report(round_, client_loss=client_loss, acc_aggregate=acc_before, accuracy=accuracy)
    progress.close()
    round_flags(session, stop, fed.rounds, first)
    path = checkpointing.save(session, fed.rounds, local_state(session, {}, combiner))
    trace.event(fed.rounds, "checkpoint", path.name)
    trace.close()
    final_loss, final_accuracy = model.evaluate(x_test, y_test, cfg.train.eval_batch_size)
    save_model(session.run_dir / "model.h5", model.module, {"config": cfg.to_yaml(), "rounds": fed.rounds})
    train_time_s = time.monotonic() - start
    share_global_model(session)
    return finish(session, {
        "steps": fed.rounds,
        "rounds": fed.rounds,
        "final_accuracy": final_accuracy,
        "final_test_loss": final_loss,
        "train_time_s": train_time_s,
        "dense_bytes_per_step": (HEADER.itemsize + 4 * model_floats(model)) * clients_per_round(fed.clients, fed.fraction)
                                / session.n_workers,
        "shared_samples": 0 if session.shared is None else len(session.shared),
        "resumed_from_round": first,
        "per_round": rounds,
    })


def worker(session: Session) -> int | None:
    fed, model, transport = session.cfg.federated, session.model, session.transport
    plan = Frame(8 * fed.clients)
    global_model = Frame(4 * model_floats(model))
    outbox = Frame(4 * model_floats(model))
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
        transport.bcast_frame(plan, plan.buffer.size)
        mine = [int(c) for c in plan.payload(np.int64) if host_of(int(c), session.n_workers) == session.rank]
        if not mine:
            continue
        transport.recv(global_model, SERVER, Tag.DOWNLINK)
        start = torch.from_numpy(global_model.payload(np.float32))
        for client in mine:
            loss = train_client(session, client, start, round_, kept)
            delta = (model.params - start[:model.size]).numpy()
            session.faults.update(delta)
            transport.send(outbox, outbox.write([delta, model.export_buffers().numpy()], step=round_,
                                                kind=Kind.DELTA, sender=session.rank, block=client, metric=loss),
                           SERVER)
    round_flags(session, stop, fed.rounds, first)
    checkpointing.save(session, fed.rounds, local_state(session, kept, None))
    share_global_model(session)
    finish(session, {})
    return None


def share_global_model(session: Session) -> None:
    """Collective, at the end: every rank takes rank 0's final global model (parameters and buffers).

    Between rounds workers hold their last client's weights; after this, the summary's
    ``replicas_identical`` checks that every rank ends with the same global model."""
    model = session.model
    flat = torch.cat([model.params, model.export_buffers()]).numpy()
    session.transport.bcast_array(flat)
    model.params.copy_(torch.from_numpy(flat[:model.size]))
    model.import_buffers(torch.from_numpy(flat[model.size:]))


def train_client(session: Session, client: int, start: torch.Tensor, round_: int,
                 kept: dict[int, list[torch.Tensor]]) -> float:
    """Local training of one client from the global parameters; returns its mean loss."""
    cfg, model = session.cfg, session.model
    data = session.blocks[client]
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    model.params.copy_(start[:model.size])
    model.import_buffers(start[model.size:])
    optimizer = make_optimizer(cfg.train, model)
    if cfg.federated.keep_optimizer_state and client in kept:
        for tensor, saved in zip(state_tensors(optimizer), kept[client]):
            tensor.copy_(saved)
    loss = local_training(cfg, model, optimizer, x, y, client, round_)
    if cfg.federated.keep_optimizer_state:
        kept[client] = [t.clone() for t in state_tensors(optimizer)]
    return loss


def local_training(cfg: Config, model: FlatModel, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                   y: torch.Tensor, stream: int, round_: int) -> float:
    """``federated.local_steps`` optimizer steps on (x, y), batches drawn for ``stream`` (a client, or
    ``federated.clients`` for rank 0's reference) and the round; returns the mean loss."""
    losses = []
    for local in range(cfg.federated.local_steps):
        rows = torch.from_numpy(block_batch(len(y), cfg.train.batch_size, cfg.seed, stream,
                                            (round_ - 1) * cfg.federated.local_steps + local))
        losses.append(model.backward(x[rows], y[rows]))
        optimizer.step()
    return float(np.mean(losses))


def server_adjust(model: FlatModel, shared: Dataset, cfg: ServerAdjustConfig, seed: int, round_: int) -> dict:
    """Fine-tune the aggregate on the shared set (rank 0 only); it sees no client or test data.

    The proximal term (mu/2)||w - w_aggregate||^2 keeps the small shared set from being
    overfitted. A held-out slice of the shared set judges the result: with ``accept: better``
    (the default) the adjusted model replaces the aggregate only when its loss there is lower,
    so the adjustment never makes the held-out loss worse; with early stopping, the step with
    the lowest held-out loss is kept (the aggregate itself is a candidate). ``accept: always``
    without early stopping keeps whatever the last step gives (training on the whole shared set).
    """
    anchor, anchor_buffers = model.params.clone(), model.export_buffers()
    train, holdout = shared, None
    if (cfg.early_stop or cfg.accept == "better") and len(shared) >= 2:
        holdout, train = carve(shared, cfg.holdout_fraction, seed, "holdout")
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    optimizer = torch.optim.SGD(model.module.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    pick = rng(seed, "server-adjust", round_)

    def held_out_loss() -> float:
        return model.evaluate(torch.from_numpy(holdout.x), torch.from_numpy(holdout.y))[0]

    base_loss = best_loss = held_out_loss() if holdout is not None else float("nan")
    best, best_buffers, best_step = anchor, anchor_buffers, 0
    losses = []
    for step in range(1, cfg.steps + 1):
        rows = torch.from_numpy(pick.choice(len(y), size=min(cfg.batch_size, len(y)), replace=False))
        losses.append(model.backward(x[rows], y[rows]))
        if cfg.prox > 0:
            model.grads.add_(model.params - anchor, alpha=cfg.prox)
        optimizer.step()
        if cfg.early_stop and holdout is not None and (loss := held_out_loss()) < best_loss:
            best_loss, best, best_buffers, best_step = loss, model.params.clone(), model.export_buffers(), step
    if holdout is not None and not cfg.early_stop:   # accept: better
        final_loss = held_out_loss()
        if final_loss < base_loss:
            best_loss, best, best_buffers, best_step = final_loss, model.params.clone(), model.export_buffers(), cfg.steps
    if holdout is not None:
        model.params.copy_(best)
        model.import_buffers(best_buffers)
    kept = best_step if holdout is not None else cfg.steps
    return {"adjust_loss": float(np.mean(losses)), "adjust_steps_kept": kept, "adjust_accepted": int(kept > 0),
            "holdout_loss_before": base_loss, "holdout_loss_after": best_loss}
