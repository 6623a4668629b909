"""Algorithm ``sync``: parameter-server data-parallel SGD.

Each step every worker sends the gradient of its batch to rank 0; rank 0 averages
them in a fixed worker order, broadcasts the aggregate, and every rank applies the
same bytes with the same optimizer, so all replicas stay bit-identical.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from hpcfed.data.batches import BatchSampler
from hpcfed.errors import HpcfedError
from hpcfed.runtime.comm import HEADER, SERVER, Frame, Kind
from hpcfed.runtime.log import Progress
from hpcfed.session import Session, finish


def run(session: Session) -> dict | None:
    """Train for ``train.steps`` steps; rank 0 returns the summary."""
    return server(session) if session.is_server else worker(session)


def apply_update(session: Session, update: Frame) -> None:
    """Every rank: take the aggregate's bytes as the gradient and step the optimizer."""
    session.model.grads.copy_(torch.from_numpy(update.payload(np.float32)))
    session.optimizer.step()


def server(session: Session) -> dict:
    cfg, channel, model = session.cfg, session.channel, session.model
    n_params, n_workers = model.size, session.n_workers
    inbox = [Frame(4 * n_params) for _ in range(n_workers)]
    update = Frame(4 * n_params)
    aggregate = np.zeros(n_params, dtype=np.float32)
    x_test, y_test = torch.from_numpy(session.data.x), torch.from_numpy(session.data.y)
    progress = Progress(cfg.train.steps)
    history: list[dict] = []
    wait_s = 0.0
    for step in range(1, cfg.train.steps + 1):
        start = time.monotonic()
        MPI.Request.Waitall([channel.irecv(frame, w, Kind.GRADIENT) for w, frame in enumerate(inbox, 1)])
        wait_s += time.monotonic() - start
        aggregate[:] = 0.0
        for frame in inbox:  # fixed order: the sum is bit-reproducible
            if frame.field("step") != step:
                raise RuntimeError(f"rank {frame.field('sender')} sent step {frame.field('step')} during step {step}")
            aggregate += frame.payload(np.float32)
        aggregate /= n_workers
        train_loss = float(np.mean([frame.field("metric") for frame in inbox]))
        nbytes = update.write(aggregate, step=step, kind=Kind.UPDATE, sender=SERVER)
        channel.bcast(update, nbytes)
        apply_update(session, update)
        progress.advance(loss=train_loss)
        if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
            test_loss, accuracy = model.evaluate(x_test, y_test)
            history.append({"step": step, "train_loss": train_loss, "test_loss": test_loss, "accuracy": accuracy})
            progress.report(step, loss=train_loss, test_loss=test_loss, accuracy=accuracy)
    progress.close()
    last = history[-1]
    return finish(session, {
        "steps": cfg.train.steps,
        "final_accuracy": last["accuracy"],
        "final_test_loss": last["test_loss"],
        "final_train_loss": last["train_loss"],
        "dense_bytes_per_step": HEADER.itemsize + 4 * n_params,
        "server_wait_s": wait_s,
        "evaluations": history,
    })


def worker(session: Session) -> None:
    cfg, channel, model = session.cfg, session.channel, session.model
    x, y = torch.from_numpy(session.data.x), torch.from_numpy(session.data.y)
    sampler = BatchSampler(len(y), cfg.train.batch_size, cfg.seed, session.rank)
    outbox = Frame(4 * model.size)
    update = Frame(4 * model.size)
    update_bytes = HEADER.itemsize + 4 * model.size
    for step in range(1, cfg.train.steps + 1):
        batch = torch.from_numpy(sampler.next())
        loss = compute_gradient(session, x[batch], y[batch], step)
        nbytes = outbox.write(model.grads.numpy(), step=step, kind=Kind.GRADIENT, sender=session.rank, metric=loss)
        channel.send(outbox, nbytes, SERVER)
        channel.bcast(update, update_bytes)
        apply_update(session, update)
    finish(session, {})


def compute_gradient(session: Session, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
    """Forward/backward into the flat gradient; a non-finite result is a clear error naming step and rank."""
    loss = session.model.backward(x, y)
    if not (np.isfinite(loss) and torch.isfinite(session.model.grads).all()):
        raise HpcfedError(f"non-finite loss or gradient at step {step} on rank {session.rank} "
                          f"(loss {loss}); try a smaller train.lr")
    return loss
