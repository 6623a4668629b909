"""A small model zoo (MLP, CNN) built deterministically from the seed."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from hpcfed.config import ModelConfig
from hpcfed.seeding import torch_seed


def build_model(cfg: ModelConfig, sample_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """The model named by ``cfg`` for samples of ``sample_shape`` (C, L) or (C, H, W)."""
    torch.manual_seed(torch_seed(seed, "model-init"))
    if cfg.name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(sample_shape), cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, num_classes),
        )
    return _cnn(sample_shape, cfg.hidden, num_classes)


def _cnn(sample_shape: tuple[int, ...], hidden: int, num_classes: int) -> nn.Module:
    """Two 3x3 (or 3-tap) convolutions, 2x max-pool, two dense layers; 1-D or 2-D by the sample shape."""
    channels, *spatial = sample_shape
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(spatial) == 1 else (nn.Conv2d, nn.MaxPool2d)
    pooled = math.prod(s // 2 for s in spatial)
    return nn.Sequential(
        conv(channels, 32, 3, padding=1), nn.ReLU(),
        conv(32, 64, 3, padding=1), nn.ReLU(),
        pool(2), nn.Flatten(),
        nn.Linear(64 * pooled, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def save_model(path: str | Path, module: nn.Module, attrs: dict[str, str | int | float]) -> None:
    """Parameters as HDF5 datasets named like ``state_dict`` keys under /params, plus attributes.

    Readable without hpcfed: ``{k: f["params"][k][()] for k in f["params"]}``.
    """
    import h5py

    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with h5py.File(temporary, "w") as file:
        for name, tensor in module.state_dict().items():
            file[f"params/{name}"] = tensor.detach().cpu().numpy()
        file.attrs.update(attrs)
    os.replace(temporary, path)


def load_parameters(path: str | Path, module: nn.Module) -> None:
    """Load parameters written by :func:`save_model` into a model of the same architecture."""
    import h5py

    with h5py.File(path, "r") as file:
        state = {name: torch.from_numpy(file["params"][name][()]) for name in file["params"]}
    module.load_state_dict(state)


class FlatModel:
    """A model whose parameters and gradients are views into two flat fp32 vectors.

    Gradients land in ``grads`` during backward, and an update written into ``grads``
    is what the optimizer applies: no per-step flatten/unflatten copies.
    """

    def __init__(self, model: nn.Module) -> None:
        self.module = model
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        device = params[0].device   # the flat vectors live where the model was placed (CPU or its GPU)
        self.params = torch.zeros(total, dtype=torch.float32, device=device)
        self.grads = torch.zeros(total, dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            n = p.numel()
            self.params[offset:offset + n].copy_(p.data.reshape(-1))
            p.data = self.params[offset:offset + n].view_as(p)
            p.grad = self.grads[offset:offset + n].view_as(p)
            offset += n

    @property
    def size(self) -> int:
        return self.params.numel()

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward + backward of the mean cross-entropy into ``grads``; returns the loss."""
        self.grads.zero_()
        self.module.train()
        loss = nn.functional.cross_entropy(self.module(x), y)
        loss.backward()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(mean loss, accuracy) on a labelled set."""
        self.module.eval()
        logits = self.module(x)
        loss = nn.functional.cross_entropy(logits, y)
        return float(loss), float((logits.argmax(1) == y).float().mean())
