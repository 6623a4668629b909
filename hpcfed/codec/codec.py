"""GradientCodec: error feedback + block DCT + shared kernel + quantization <-> bytes.

One instance per role: each worker encodes its gradient; rank 0 has ONE server
instance that decodes the workers' packets, encodes the aggregate (with its own
residual) and decodes that packet like everybody else.

Packet payload at a compressed step (sizes follow from the installed kernel):

    scales   fp32 x n_groups        one per quantization group of kernel values
    tail     fp32 x (n_params mod n*n)   raw, not transformed
    codes    ceil(k * bits / 8) bytes     kernel values in kernel order, packed
    meta     1 byte   worker: round(127 * share of energy the kernel carried)
                      server: 0x80 | drift flag (1 = every rank refreshes before step + 2;
                      the local kernels travel with the packets of step + 1)

Warm-up (``step < warmup_steps``) and disabled compression send raw fp32 (4 bytes a
parameter). Error feedback lives in the coefficient domain (the DCT is orthonormal):
``acc = DCT(grad) + residual``; what the packet carried is subtracted, the rest is
the next residual. The tail is exact, so it has no residual.
"""

from __future__ import annotations

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from hpcfed.codec import dct, kernel as kern, quant
from hpcfed.errors import HpcfedError
from hpcfed.xp import to_numpy

KERNEL_TIERS = 2      # vote weights in a local kernel (see kernel.py)
_SERVER = 0x80


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class CompressionSettings:
    """The ``compression`` config section (defaults: the measured >100x setting; ``enabled`` is off in configs)."""

    enabled: bool = True
    block: int = 8                 # DCT block edge n (blocks of n*n values)
    keep: float = 0.02             # fraction of coefficients in the kernel
    bits: int = 4                  # 2, 4, 8 or 16
    history: int = 2               # gradients whose energy a local kernel sums
    refresh_every: int = 2         # steps between kernel exchanges
    warmup_steps: int = 0          # first steps sent dense
    error_feedback: bool = True
    stochastic: bool = False       # stochastic (unbiased) rounding instead of nearest
    group: int = 256               # values per quantization scale; 0 = one scale per DCT block
    drift_threshold: float = 0.0   # refresh early when a worker's carried energy share falls below; 0 = off

    def __post_init__(self) -> None:
        checks = [
            ("block", self.block, self.block >= 2, "an integer >= 2"),
            ("keep", self.keep, 0.0 < self.keep <= 1.0, "a fraction in (0, 1]"),
            ("bits", self.bits, self.bits in quant.BITS, f"one of {list(quant.BITS)}"),
            ("history", self.history, self.history >= 1, "an integer >= 1"),
            ("refresh_every", self.refresh_every, self.refresh_every >= 1, "an integer >= 1"),
            ("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "an integer >= 0"),
            ("group", self.group, self.group >= 0, "an integer >= 0 (0 = per block)"),
            ("drift_threshold", self.drift_threshold, 0.0 <= self.drift_threshold < 1.0, "in [0, 1), 0 = off"),
        ]
        for key, value, ok, allowed in checks:
            if not ok:
                raise HpcfedError(f"compression.{key}={value!r} is not allowed; use {allowed}")


class GradientCodec:
    """Encoder/decoder state of one rank: residual, energy history, kernel and its version."""

    def __init__(self, n_params: int, cfg: CompressionSettings, xp: ModuleType = np, seed: int = 0,
                 rank: int = 0) -> None:
        if n_params < 1:
            raise HpcfedError(f"codec needs at least one parameter, got n_params={n_params}")
        self.n_params, self.cfg, self.xp, self.seed, self.rank = n_params, cfg, xp, seed, rank
        self.n_blocks, self.tail = dct.block_layout(n_params, cfg.block)
        self.n_coef = n_params - self.tail
        self.k = min(self.n_coef, max(1, round(cfg.keep * self.n_coef))) if self.n_coef else 0
        self.is_server = rank == 0
        self.residual = xp.zeros(self.n_coef, dtype=xp.float32) if cfg.error_feedback else None
        self.energy = None if self.is_server else xp.zeros(self.n_coef, dtype=xp.float32)
        self._spare = xp.empty(self.n_coef, dtype=xp.float32)   # reused for the next acc (swapped with the residual)
        self._zeros = xp.zeros(self.n_coef, dtype=xp.float32)   # all-zero between decodes
        self._square = None if self.is_server else xp.empty(self.n_coef, dtype=xp.float32)
        self.forced_due = -1        # a step every rank refreshes at (drift flag of the last aggregate)
        self.min_share = 1.0        # server: lowest carried-energy share among this step's worker packets
        self._install(0, kern.lowfreq_kernel(self.n_blocks, cfg.block, self.k))

    # ---- schedule -------------------------------------------------------------------------

    def compressed(self, step: int) -> bool:
        """Whether packets at ``step`` are compressed (else raw fp32)."""
        return self.cfg.enabled and step >= self.cfg.warmup_steps

    def _scheduled(self, step: int) -> bool:
        w, r = self.cfg.warmup_steps, self.cfg.refresh_every
        return step >= max(w, 1) and (step - w) % r == 0

    def kernel_due(self, step: int) -> bool:
        """Whether every rank exchanges kernels before encoding ``step`` (same answer on all ranks)."""
        if not (self.cfg.enabled and self.n_coef and step >= self.cfg.warmup_steps):
            return False
        return self._scheduled(step) or step == self.forced_due

    def _in_history(self, step: int) -> bool:
        """Whether ``step`` is one of the last ``history`` steps before the next scheduled refresh."""
        w, r = self.cfg.warmup_steps, self.cfg.refresh_every
        nxt = max(step + 1, w, 1)
        nxt += (w - nxt) % r
        return nxt - step <= self.cfg.history

    # ---- packets --------------------------------------------------------------------------

    def payload_nbytes(self, step: int) -> int:
        """Exact size of :meth:`encode`'s output at ``step`` (after any kernel install of that step)."""
        if not self.compressed(step):
            return 4 * self.n_params
        return 4 * (self.groups.n_groups + self.tail) + quant.packed_nbytes(self.k, self.cfg.bits) + 1

    def _check(self, array: Any, step: int, what: str) -> None:
        if array.ndim != 1 or array.size != self.n_params:
            raise HpcfedError(f"{what} at step {step} has shape {tuple(array.shape)}; expected ({self.n_params},)")

    def _nonfinite(self, grad: Any, step: int) -> HpcfedError:
        bad = int((~self.xp.isfinite(grad)).sum())
        where = f"step {step}, rank {self.rank}"
        if bad:
            return HpcfedError(f"gradient has {bad} NaN/Inf values at {where}; "
                               "lower the learning rate or check the data")
        return HpcfedError(f"gradient energy overflows float32 at {where}; lower the learning rate")

    def encode(self, grad: Any, step: int) -> Any:
        """Packet bytes (uint8 xp array) for ``grad`` (+ residual) at ``step``; updates the residual."""
        xp, cfg = self.xp, self.cfg
        grad = xp.asarray(grad, dtype=xp.float32)
        self._check(grad, step, "gradient")
        history = self.energy is not None and cfg.enabled and self._in_history(step)
        if not self.compressed(step):
            if not bool(xp.isfinite(grad).all()):
                raise self._nonfinite(grad, step)
            if history and self.n_coef:
                self.energy += dct.forward(grad[: self.n_coef], cfg.block, xp).reshape(-1) ** 2
            return grad.view(xp.uint8).copy()
        acc = dct.forward(grad[: self.n_coef], cfg.block, xp, out=self._spare).reshape(-1)
        if self.residual is not None:
            acc += self.residual
        tail = grad[self.n_coef:]
        total = float(xp.dot(acc, acc)) + float(xp.dot(tail, tail))
        if not np.isfinite(total):
            raise self._nonfinite(grad, step)
        values = acc[self.kernel]
        codes, scales = quant.quantize(values, self.groups, cfg.bits, xp, self._rng(step))
        sent = quant.dequantize(codes, scales, self.groups, cfg.bits, xp)
        if history:
            self.energy += xp.multiply(acc, acc, out=self._square)
        if self.residual is not None:
            acc[self.kernel] = values - sent
            self.residual, self._spare = acc, self.residual
        meta = self._meta(float(xp.dot(values, values)), total, step)
        return xp.concatenate([scales.view(xp.uint8), xp.ascontiguousarray(tail).view(xp.uint8),
                               quant.pack(codes, cfg.bits, xp), xp.asarray([meta], dtype=xp.uint8)])

    def _rng(self, step: int) -> Any:
        """Stochastic-rounding generator derived from (seed, rank, step): nothing to checkpoint."""
        if not self.cfg.stochastic:
            return None
        seed = np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1)[0]
        return self.xp.random.default_rng(int(seed))

    def _meta(self, carried: float, total: float, step: int) -> int:
        if not self.is_server:
            return round(127 * (carried / total if total > 0 else 1.0))
        drift = self.min_share < self.cfg.drift_threshold
        self.min_share = 1.0
        if drift:
            self.forced_due = step + 2
        return _SERVER | int(drift)

    def decode(self, payload: Any, step: int, out: Any = None) -> Any:
        """fp32 vector (length n_params) from packet bytes of ``step``; deterministic.

        ``out`` (optional, contiguous fp32, n_params) receives it without a new allocation.
        """
        xp = self.xp
        expected = self.payload_nbytes(step)
        if payload.ndim != 1 or payload.size != expected:
            raise HpcfedError(f"packet of {payload.size} bytes at step {step}; expected {expected} "
                              f"(kernel version {self.version})")
        out = xp.empty(self.n_params, dtype=xp.float32) if out is None else out
        if not self.compressed(step):
            out[:] = payload.view(xp.float32)
            return out
        s, t, k = self.groups.n_groups, self.tail, self.k
        scales = payload[: 4 * s].view(xp.float32)
        codes = quant.unpack(payload[4 * (s + t): -1], self.cfg.bits, k, xp)
        self._zeros[self.kernel] = quant.dequantize(codes, scales, self.groups, self.cfg.bits, xp)
        dct.inverse(self._zeros, self.cfg.block, xp, out=out[: self.n_coef])
        self._zeros[self.kernel] = 0
        out[self.n_coef:] = payload[4 * s: 4 * (s + t)].view(xp.float32)
        self._read_meta(int(payload[-1]), step)
        return out

    def _read_meta(self, meta: int, step: int) -> None:
        if meta & _SERVER:
            if meta & 1:
                self.forced_due = step + 2
        elif self.is_server:
            self.min_share = min(self.min_share, meta / 127)

    # ---- kernel exchange ------------------------------------------------------------------

    def local_kernel(self) -> Any:
        """This worker's kernel proposal (uint8): top positions of history energy + residual energy."""
        if self.energy is None:
            raise HpcfedError(f"rank {self.rank} is the server; local kernels come from workers (rank >= 1)")
        score = self.energy if self.residual is None else self.energy + self.residual * self.residual
        return self.xp.asarray(kern.local_kernel(score, self.k, KERNEL_TIERS, self.xp))

    def merge_kernels(self, payloads: list) -> Any:
        """Rank 0: the next global kernel (uint8) from the workers' local kernels."""
        merged = kern.merge([to_numpy(p) for p in payloads], self.n_blocks, self.cfg.block, self.k, self.version + 1)
        return self.xp.asarray(kern.global_payload(self.version + 1, merged))

    def install_kernel(self, payload: Any, *, any_version: bool = False) -> None:
        """All ranks: adopt the global kernel from rank 0 (its version is the current one + 1).

        ``any_version``: a worker rejoining after missed steps takes whatever version is current.
        """
        version, indices = kern.read_global_payload(to_numpy(payload), self.n_coef, self.k)
        if version != self.version + 1 and not any_version:
            raise HpcfedError(f"kernel version {version} received on rank {self.rank}; expected {self.version + 1}")
        self._install(version, indices)

    def kernel_payload(self) -> Any:
        """The installed global kernel as rank 0 would send it (for workers that rejoin)."""
        return self.xp.asarray(kern.global_payload(self.version, to_numpy(self.kernel)))

    def max_kernel_nbytes(self) -> int:
        """An upper bound of any local or global kernel payload (varint gaps of < 2**35, plus headers)."""
        return 5 * self.k + 64

    def _install(self, version: int, indices: np.ndarray) -> None:
        xp, cfg = self.xp, self.cfg
        self.version = version
        self.kernel = xp.asarray(indices, dtype=xp.int64)
        if cfg.group:
            self.groups = quant.fixed_groups(self.k, cfg.group, xp)
        else:
            self.groups = quant.groups_by_label(self.kernel // (cfg.block * cfg.block), xp)
        if self.energy is not None:
            self.energy[:] = 0

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Arrays and scalars that restore this codec bit-identically."""
        empty = np.zeros(0, dtype=np.float32)
        return {
            "residual": empty if self.residual is None else to_numpy(self.residual),
            "energy": empty if self.energy is None else to_numpy(self.energy),
            "kernel": to_numpy(self.kernel),
            "version": self.version,
            "forced_due": self.forced_due,
            "min_share": self.min_share,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (of a codec with the same n_params and settings)."""
        xp = self.xp
        for key, mine in (("residual", self.residual), ("energy", self.energy)):
            if mine is not None and np.shape(state[key]) != (self.n_coef,):
                raise HpcfedError(f"checkpoint codec {key} has shape {np.shape(state[key])}; expected ({self.n_coef},)")
        kernel = np.asarray(state["kernel"], dtype=np.int64)
        if kernel.shape != (self.k,):
            raise HpcfedError(f"checkpoint codec kernel has {kernel.size} indices; this codec keeps {self.k}")
        self._install(int(state["version"]), kernel)
        if self.residual is not None:
            self.residual = xp.asarray(state["residual"], dtype=xp.float32)
        if self.energy is not None:
            self.energy = xp.asarray(state["energy"], dtype=xp.float32)
        self.forced_due = int(state["forced_due"])
        self.min_share = float(state["min_share"])
