"""Models built deterministically from the seed: a small zoo (MLP, CNN, ResNet, the MNIST-1D CNN) or any
factory named by an import path ``package.module:function``; and :class:`FlatModel`, which keeps
parameters and gradients in two flat fp32 vectors."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hpcfed.config import BUILTIN_MODELS, ModelConfig
from hpcfed.data.plugins import call, one_line, resolve
from hpcfed.errors import HpcfedError
from hpcfed.seeding import torch_seed


def build_model(cfg: ModelConfig, sample_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """The model named by ``cfg`` for samples of ``sample_shape`` (C, L) or (C, H, W), checked by
    :func:`check_model`; HpcfedError (one line naming model.name) when it cannot be built or does not fit."""
    sample_shape = tuple(int(s) for s in sample_shape)
    torch.manual_seed(torch_seed(seed, "model-init"))
    if ":" in cfg.name:
        factory = resolve("model.name", cfg.name)
        module = call("model.name", cfg.name, factory, dict(cfg.kwargs),
                      {"sample_shape": sample_shape, "num_classes": int(num_classes)})
    elif cfg.name in _BUILTIN:
        module = _BUILTIN[cfg.name](cfg, sample_shape, num_classes)
    else:
        raise HpcfedError(f"model.name: '{cfg.name}' is not one of {', '.join(BUILTIN_MODELS)} "
                          "nor an import path 'package.module:function'")
    check_model(module, sample_shape, num_classes, name=cfg.name)
    return module


def check_model(module: object, sample_shape: tuple[int, ...], num_classes: int, name: str = "model") -> None:
    """HpcfedError unless ``module`` is an nn.Module with trainable parameters that maps one sample
    (1, *sample_shape) to logits (1, num_classes); the forward runs in eval mode without gradients,
    so buffers (e.g. BatchNorm running statistics) are left untouched."""
    where = f"model.name '{name}'"
    if not isinstance(module, nn.Module):
        raise HpcfedError(f"{where}: the factory returned a {type(module).__name__}, not a torch.nn.Module")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise HpcfedError(f"{where}: the model has no trainable parameters")
    shape = (1, *sample_shape)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(shape, dtype=torch.float32, device=params[0].device))
    except Exception as err:
        raise HpcfedError(f"{where}: the forward pass on an input of shape {shape} failed: {one_line(err)}") from None
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise HpcfedError(f"{where}: an input of shape {shape} gave output {got}; "
                          f"expected logits of shape (1, {num_classes})")


def _spatial(name: str, sample_shape: tuple[int, ...], dims: tuple[int, ...] = (1, 2)) -> int:
    """The number of spatial dimensions of (C, L) / (C, H, W) samples, checked against ``dims``."""
    spatial = len(sample_shape) - 1
    if spatial not in dims:
        allowed = " or ".join(("(C, L)", "(C, H, W)")[d - 1] for d in dims)
        raise HpcfedError(f"model.name '{name}': needs samples of shape {allowed} (got {sample_shape})")
    return spatial


def _mlp(cfg: ModelConfig, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(sample_shape), cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, num_classes),
    )


def _cnn(cfg: ModelConfig, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 (or 3-tap) convolutions, 2x max-pool, two dense layers; 1-D or 2-D by the sample shape."""
    channels, *spatial = sample_shape
    one_d = _spatial("cnn", sample_shape) == 1
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if one_d else (nn.Conv2d, nn.MaxPool2d)
    pooled = math.prod(s // 2 for s in spatial)
    return nn.Sequential(
        conv(channels, 32, 3, padding=1), nn.ReLU(),
        conv(32, 64, 3, padding=1), nn.ReLU(),
        pool(2), nn.Flatten(),
        nn.Linear(64 * pooled, cfg.hidden), nn.ReLU(),
        nn.Linear(cfg.hidden, num_classes),
    )


def _cnn1d_small(cfg: ModelConfig, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The MNIST-1D paper's CNN: three 25-channel Conv1d (kernels 5, 3, 3; stride 2; padding 1) with ReLU,
    then one linear layer (5,210 parameters on 1x40 samples with 10 classes)."""
    _spatial("cnn1d_small", sample_shape, (1,))
    channels, length = sample_shape
    layers: list[nn.Module] = []
    for kernel in (5, 3, 3):
        layers += [nn.Conv1d(channels, 25, kernel, stride=2, padding=1), nn.ReLU()]
        channels, length = 25, (length + 2 - kernel) // 2 + 1
    if length < 1:
        raise HpcfedError(f"model.name 'cnn1d_small': samples of length {sample_shape[1]} are too short")
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(25 * length, num_classes))


class _BasicBlock(nn.Module):
    """Two 3-tap / 3x3 convolutions with BatchNorm and a shortcut (a 1x1 convolution where the shape changes)."""

    def __init__(self, conv: type, norm: type, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv(cin, cout, 3, stride, 1, bias=False), norm(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3, 1, 1, bias=False), norm(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet(cfg: ModelConfig, sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A CIFAR-style ResNet (He et al. 2016, sec. 4.2) of ``cfg.depth`` = 6n+2 layers: a stem convolution,
    three stages of n basic blocks with widths w, 2w, 4w (w = hidden // 8, so 16/32/64 at hidden 128;
    stages 2 and 3 halve the resolution), global average pooling and a linear head; 1-D or 2-D."""
    one_d = _spatial("resnet", sample_shape) == 1
    conv, norm, pool = ((nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d) if one_d
                        else (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d))
    width, blocks = max(1, cfg.hidden // 8), (cfg.depth - 2) // 6
    layers: list[nn.Module] = [conv(sample_shape[0], width, 3, 1, 1, bias=False), norm(width), nn.ReLU()]
    cin = width
    for stage in range(3):
        for block in range(blocks):
            cout = width << stage
            layers.append(_BasicBlock(conv, norm, cin, cout, 2 if stage and not block else 1))
            cin = cout
    return nn.Sequential(*layers, pool(1), nn.Flatten(), nn.Linear(cin, num_classes))


_BUILTIN: dict[str, Callable[[ModelConfig, tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp, "cnn": _cnn, "resnet": _resnet, "cnn1d_small": _cnn1d_small}


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; folders that cannot be fsynced are skipped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def save_model(path: str | Path, module: nn.Module, attrs: dict[str, str | int | float]) -> None:
    """The state_dict (parameters and buffers) as HDF5 datasets under /params named like its keys, plus
    attributes; written to a temporary name, fsynced, then renamed (readers never see half a file).

    Readable without hpcfed: ``{k: f["params"][k][()] for k in f["params"]}``.
    """
    import h5py

    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with h5py.File(temporary, "w") as file:
        for name, tensor in module.state_dict().items():
            file[f"params/{name}"] = tensor.detach().cpu().numpy()
        file.attrs.update(attrs)
    _fsync(temporary)
    os.replace(temporary, path)
    _fsync(path.parent)


def load_parameters(path: str | Path, module: nn.Module) -> None:
    """Load parameters (and buffers) written by :func:`save_model` into a model of the same architecture."""
    import h5py

    with h5py.File(path, "r") as file:
        state = {name: torch.from_numpy(np.asarray(file["params"][name][()])) for name in file["params"]}
    module.load_state_dict(state)


class FlatModel:
    """A model whose parameters and gradients are views into two flat fp32 vectors.

    Gradients land in ``grads`` during backward, and an update written into ``grads``
    is what the optimizer applies: no per-step flatten/unflatten copies. Buffers (e.g.
    BatchNorm running statistics) stay in the module; :meth:`export_buffers` and
    :meth:`import_buffers` move them as one flat fp32 vector.
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

    @property
    def buffer_size(self) -> int:
        """Elements of all buffers, in ``named_buffers()`` order."""
        return sum(b.numel() for b in self.module.buffers())

    def export_buffers(self) -> torch.Tensor:
        """A flat fp32 copy of every buffer (integer buffers cast; exact up to 2**24), on the model's device."""
        buffers = [b.detach().reshape(-1).to(device=self.params.device, dtype=torch.float32)
                   for b in self.module.buffers()]
        return torch.cat(buffers) if buffers else torch.zeros(0, dtype=torch.float32, device=self.params.device)

    @torch.no_grad()
    def import_buffers(self, flat: torch.Tensor) -> None:
        """Write every buffer from a vector of :meth:`export_buffers` (integer buffers rounded back)."""
        if flat.numel() != self.buffer_size:
            raise ValueError(f"import_buffers: got {flat.numel()} values for {self.buffer_size} buffer elements")
        offset = 0
        for buffer in self.module.buffers():
            n = buffer.numel()
            part = flat[offset:offset + n].reshape(buffer.shape)
            buffer.copy_(part if buffer.is_floating_point() else part.round())
            offset += n

    def digest(self) -> str:
        """SHA-256 of the parameter bytes followed by the :meth:`export_buffers` bytes."""
        sha = hashlib.sha256(self.params.detach().cpu().numpy().tobytes())
        sha.update(self.export_buffers().cpu().numpy().tobytes())
        return sha.hexdigest()

    def backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward + backward of the mean cross-entropy into ``grads``; returns the loss (x cast to fp32)."""
        self.grads.zero_()
        self.module.train()
        loss = nn.functional.cross_entropy(self.module(x.to(dtype=torch.float32)), y)
        loss.backward()
        return float(loss.detach())

    @torch.no_grad()
    def train_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The loss :meth:`backward` would return (train mode), without the backward; buffers may change."""
        self.module.train()
        return float(nn.functional.cross_entropy(self.module(x.to(dtype=torch.float32)), y))

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) on a labelled set, in eval mode, ``batch_size`` samples per forward pass
        (default: all); each batch is cast to fp32 and moved to the model's device as it is formed."""
        self.module.eval()
        n = len(y)
        if n == 0:
            return float("nan"), float("nan")
        step = batch_size or n
        device = self.params.device
        loss = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for start in range(0, n, step):
            xb = x[start:start + step].to(device=device, dtype=torch.float32)
            yb = y[start:start + step].to(device=device)
            logits = self.module(xb)
            loss += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
            correct += (logits.argmax(1) == yb).sum()
        return float(loss) / n, int(correct) / n
