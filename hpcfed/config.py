"""The validated run configuration: pydantic models, YAML loading, ``--set`` overrides.

Every error becomes one :class:`HpcfedError` line that names the key (or file) and
what is allowed. The schema defaults ARE the built-in quickstart
(``configs/quickstart.yaml`` spells them out, and a test keeps the two equal).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from hpcfed.aggregation.actor_critic import ActorCriticSettings
from hpcfed.codec.codec import CompressionSettings
from hpcfed.configfile import Section, apply_override, read_yaml, validate


BUILTIN_DATA = ("digits", "mnist1d", "hdf5", "synthetic")
BUILTIN_MODELS = ("mlp", "cnn", "resnet", "cnn1d_small")
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _check_name(key: str, name: str, builtin: tuple[str, ...]) -> None:
    """A built-in name or an import path ``package.module:function``, else one line listing both."""
    if name in builtin or IMPORT_PATH.match(name):
        return
    choices = ", ".join(f"'{b}'" for b in builtin[:-1]) + f" or '{builtin[-1]}'"
    raise ValueError(f"{key}: Input should be {choices}, or an import path 'package.module:function' (got '{name}')")


class DataConfig(Section):
    name: str = Field("digits", description="digits | mnist1d | hdf5 | synthetic | package.module:function "
                                            "(a factory returning (x, y) or a map-style torch Dataset)")
    path: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict, description="import-path data.name: factory keyword arguments")
    read: Literal["ship", "index"] = Field("ship", description="hdf5: ship = rank 0 reads and sends each worker its "
                                                               "rows; index = every worker reads its own rows")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    partition: Literal["iid", "dirichlet", "shards", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0.0, description="dirichlet / quantity: concentration (smaller = more skewed)")
    classes_per_part: int = Field(2, ge=1, description="shards: classes per worker block")
    samples: int | None = Field(None, ge=10, description="synthetic (default 2000) and mnist1d (default 5000, "
                                                         "rounded down to a multiple of 10): number of samples")

    @model_validator(mode="after")
    def _path_fits_name(self) -> "DataConfig":
        _check_name("data.name", self.name, BUILTIN_DATA)
        if self.name == "hdf5" and not self.path:
            raise ValueError("data.path: required when data.name is 'hdf5' (an HDF5 file with datasets 'x' and 'y')")
        if self.path and self.name != "hdf5":
            raise ValueError(f"data.path: only used with data.name 'hdf5' (got data.name '{self.name}')")
        if self.path and not Path(self.path).is_file():
            raise ValueError(f"data.path: file '{self.path}' not found")
        if self.kwargs and ":" not in self.name:
            raise ValueError(f"data.kwargs: only used with an import-path data.name 'package.module:function' "
                             f"(got data.name '{self.name}')")
        if self.read == "index" and self.name != "hdf5":
            raise ValueError(f"data.read: 'index' needs data.name 'hdf5' (got data.name '{self.name}')")
        return self


class ModelConfig(Section):
    name: str = Field("cnn", description="mlp | cnn | resnet | cnn1d_small | package.module:function "
                                         "(a factory returning an nn.Module)")
    hidden: int = Field(128, ge=1, description="mlp, cnn: hidden units; resnet: stage widths hidden/8, hidden/4, "
                                               "hidden/2 (16/32/64 at 128)")
    depth: int = Field(8, ge=8, description="resnet: layers, 6n+2 (8, 14, 20, 32, ...)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="import-path model.name: factory keyword "
                                                                     "arguments")

    @model_validator(mode="after")
    def _name_fits(self) -> "ModelConfig":
        _check_name("model.name", self.name, BUILTIN_MODELS)
        if (self.depth - 2) % 6:
            raise ValueError(f"model.depth: must be 6n+2 (8, 14, 20, 32, ...) (got {self.depth})")
        if self.kwargs and ":" not in self.name:
            raise ValueError(f"model.kwargs: only used with an import-path model.name 'package.module:function' "
                             f"(got model.name '{self.name}')")
        return self


class TrainConfig(Section):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0.0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    eval_every: int = Field(25, ge=1)
    eval_batch_size: int = Field(1024, ge=1, description="samples per forward pass when evaluating")
    threads: int = Field(1, ge=1, description="torch threads per rank")


class CodingConfig(Section):
    enabled: bool = False
    target: int | None = Field(None, ge=1, description="k: any k workers complete a step (default: workers - 1)")
    scheme: Literal["cyclic", "fractional"] = "cyclic"
    mode: Literal["coded", "wait-all", "drop-stragglers"] = "coded"


class WorkerRanks(Section):
    """A fault's target ranks: workers only (rank 0 is the server)."""

    ranks: list[int] = Field(default_factory=list, description="worker ranks (>= 1) with this fault")

    @model_validator(mode="after")
    def _worker_ranks(self) -> "WorkerRanks":
        if any(rank < 1 for rank in self.ranks):
            raise ValueError(f"ranks must be worker ranks >= 1 (got {self.ranks})")
        return self


class StragglerFaults(WorkerRanks):
    delay_s: float = Field(0.0, ge=0.0)
    prob: float = Field(1.0, ge=0.0, le=1.0, description="chance per step that a chosen rank sleeps")
    random: bool = Field(False, description="draw each delay from an exponential with mean delay_s")


class LabelNoiseFaults(WorkerRanks):
    """Labels of the ranks' data randomly permuted."""


class GradScaleFaults(WorkerRanks):
    factor: float = -5.0


class GradNoiseFaults(WorkerRanks):
    """Updates replaced by Gaussian noise of the same norm."""


class FaultsConfig(Section):
    stragglers: StragglerFaults = StragglerFaults()
    label_noise: LabelNoiseFaults = LabelNoiseFaults()
    grad_scale: GradScaleFaults = GradScaleFaults()
    grad_noise: GradNoiseFaults = GradNoiseFaults()


class ServerAdjustConfig(Section):
    enabled: bool = True
    shared_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="of the training data, held by rank 0 only")
    steps: int = Field(20, ge=1)
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(32, ge=1)
    prox: float = Field(0.0, ge=0.0, description="mu of (mu/2)||w - w_aggregate||^2")
    early_stop: bool = Field(False, description="keep the best of the steps on a held-out slice of the shared set")
    accept: Literal["better", "always"] = Field(
        "better", description="better: the adjusted model replaces the aggregate only when its loss on a held-out "
                              "slice of the shared set is lower; always: keep it (the earlier behaviour)")
    holdout_fraction: float = Field(0.2, gt=0.0, lt=1.0)


class FederatedConfig(Section):
    clients: int = Field(20, ge=1)
    rounds: int = Field(50, ge=1)
    fraction: float = Field(0.3, gt=0.0, le=1.0, description="share of clients sampled per round")
    local_steps: int = Field(20, ge=1)
    keep_optimizer_state: bool = Field(False, description="clients keep their optimizer state between rounds")
    server_adjust: ServerAdjustConfig = ServerAdjustConfig()


class AggregationConfig(Section):
    weighting: Literal["samples", "uniform", "actor_critic", "median", "trimmed_mean", "fltrust"] = "samples"
    trim: int = Field(1, ge=0, description="trimmed_mean: updates dropped at each end, per coordinate")
    validation_size: int = Field(100, ge=1, description="actor_critic, fltrust: training samples held out at rank 0 "
                                                        "for its reference update and the actor-critic's reward "
                                                        "(validation-loss improvement)")
    validation_batch: int = Field(32, ge=1, description="sync: validation samples per step for rank 0's reference "
                                                        "gradient, a fresh seeded draw each step (the actor-critic's "
                                                        "reward compares the losses before and after an update on "
                                                        "the same draw); the whole set when >= validation_size")
    actor_critic: ActorCriticSettings = ActorCriticSettings()


class CheckpointConfig(Section):
    every: int = Field(50, ge=0, description="steps (sync) or rounds (fedavg) between checkpoints; 0 = only at "
                                              "the end and on a stop signal")
    keep: int = Field(3, ge=1, description="newest checkpoints kept")


class MpiConfig(Section):
    cuda_aware: Literal["auto", "true", "false"] = Field(
        "auto", description="whether MPI takes GPU buffers; auto: env HPCFED_CUDA_AWARE, then the MPI info key "
                            "mpi_memory_alloc_kinds, then MPIX_Query_cuda_support (agreed by every rank)")
    transfer: Literal["auto", "host", "staged", "direct"] = Field(
        "auto", description="how frames travel: auto = direct (CUDA-aware) or staged (pinned host) on GPUs, "
                            "host on CPUs; staged/direct on CPU ranks exercise those paths")
    wait: Literal["auto", "busy", "sleep"] = Field(
        "auto", description="how a rank waits for frames: busy = MPI's own wait (lowest latency, holds a core), "
                            "sleep = test and sleep up to 1 ms (leaves the CPU to ranks that compute); auto = sleep "
                            "where a node runs more ranks than the CPUs they may use")


class OutputConfig(Section):
    dir: str | None = None


class Config(Section):
    """The whole run configuration (see configs/quickstart.yaml for every key with its default)."""

    seed: int = Field(0, ge=0)
    algorithm: Literal["sync", "fedavg"] = "sync"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    compression: CompressionSettings = CompressionSettings(enabled=False)
    coding: CodingConfig = CodingConfig()
    federated: FederatedConfig = FederatedConfig()
    aggregation: AggregationConfig = AggregationConfig()
    faults: FaultsConfig = FaultsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    output: OutputConfig = OutputConfig()
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="worker ranks: one GPU each (by node-local rank) when there is one, else the CPU")
    server_device: Literal["auto", "cpu", "cuda"] = Field("auto", description="rank 0; auto: as `device`")
    mpi: MpiConfig = MpiConfig()

    def to_yaml(self) -> str:
        """The resolved config as YAML text (what is saved with every run)."""
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    def digest(self) -> str:
        """A short hash of the resolved config."""
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()[:16]


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or take the defaults when ``path`` is None), apply ``key=value`` overrides, validate."""
    raw = read_yaml(path) if path else {}
    for item in overrides:
        apply_override(raw, item)
    return validate(Config, raw)
