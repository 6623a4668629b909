"""Optimizers whose whole state is a fixed list of tensors (for resync and checkpoints).

The state is created eagerly with the values torch would create lazily (zeros), so a
worker that has not stepped yet can load rank 0's state, and the first step is unchanged:
SGD's momentum buffer 0 * m + g == g exactly, and Adam starts from zeros anyway.
"""

from __future__ import annotations

import torch

from hpcfed.config import TrainConfig
from hpcfed.models import FlatModel


def make_optimizer(cfg: TrainConfig, model: FlatModel) -> torch.optim.Optimizer:
    params = list(model.module.parameters())
    if cfg.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        for p in params:
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
        return optimizer
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.momentum > 0:
        for p in params:
            optimizer.state[p] = {"momentum_buffer": torch.zeros_like(p)}
    return optimizer


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every state tensor, in parameter order and sorted key order (the same list on every rank)."""
    tensors = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            tensors += [state[key] for key in sorted(state)]
    return tensors


def state_size(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() for t in state_tensors(optimizer))


def export_state(model: FlatModel, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Parameters followed by the optimizer state, as one flat fp32 vector."""
    device = model.params.device   # Adam keeps its step count on the CPU even for GPU parameters
    return torch.cat([model.params, *(t.reshape(-1).float().to(device) for t in state_tensors(optimizer))])


def import_state(model: FlatModel, optimizer: torch.optim.Optimizer, flat: torch.Tensor) -> None:
    """Inverse of :func:`export_state`: overwrite parameters and optimizer state in place."""
    model.params.copy_(flat[:model.size])
    offset = model.size
    for tensor in state_tensors(optimizer):
        n = tensor.numel()
        tensor.copy_(flat[offset:offset + n].view_as(tensor))
        offset += n
