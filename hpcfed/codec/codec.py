"""GradientCodec: error feedback + block DCT + shared kernel + quantization <-> bytes.

One instance per role: each worker encodes its gradient; rank 0 has ONE server
instance that reads the workers' packets, encodes the aggregate (with its own
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

The *unpacked* vector of a step (length :meth:`GradientCodec.unpacked_size`) is, at a
compressed step, the k dequantized kernel values (kernel order) followed by the raw
tail; at a dense step, the raw fp32 gradient. ``unpack`` reads a packet into it in
O(k + tail); ``densify`` scatters it into coefficients and runs the one inverse DCT;
``decode`` is both. Rank 0 combines unpacked vectors (a combination of kernel-position
vectors is zero off the kernel) and ``encode_unpacked`` adds its residual at the kernel,
quantizes and keeps the rest, in O(k + tail): the same as ``encode(densify(vec))`` up to
float rounding (DCT(IDCT(x)) = x).

Cost: every O(n) pass works in preallocated buffers (no O(n) allocation per call). On
NumPy the encoder walks the coefficients in fixed cache-sized chunks (DCT GEMM, + residual,
energy, sums and kernel gathers while a chunk sits in L2) and the inverse is a CSR product
over the kept values (``dct.KernelInverse``); on other array modules (CuPy) one chunk is
the whole vector. Chunk boundaries are fixed, so results are bit-identical across runs.
Rank 0 keeps its residual at the kernel in kernel order between installs while it only
uses ``encode_unpacked`` (sequential O(k) work instead of a gather and a scatter over the
coefficient vector each step); ``residual`` writes it back whenever it is read.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

from hpcfed.codec import dct, kernel as kern, quant
from hpcfed.errors import HpcfedError
from hpcfed.xp import to_numpy

KERNEL_TIERS = 2      # vote weights in a local kernel (see kernel.py)
_SERVER = 0x80
_CPU_CHUNK = 1 << 16  # coefficients per chunk of the fused encoder pass on NumPy


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
    swap: float = 0.05             # delta refreshes: fraction of k swapped per refresh (0 = full local kernels)

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
            ("swap", self.swap, 0.0 <= self.swap <= 1.0, "a fraction in [0, 1], 0 = full kernel exchanges"),
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
        self._residual = xp.zeros(self.n_coef, dtype=xp.float32) if cfg.error_feedback else None
        # rank 0: the residual at the kernel in kernel order, while encode_unpacked keeps it there (O(k) per step
        # without touching the coefficient vector; written back at a kernel install or any other use)
        self._kept = xp.empty(self.k, dtype=xp.float32) if cfg.error_feedback and self.is_server else None
        self._kept_live = False
        self.energy = None if self.is_server else xp.zeros(self.n_coef, dtype=xp.float32)
        # delta refreshes: positions swapped per refresh; rank 0's energy of the values it encoded, per kernel slot
        self.m = min(self.n_coef - self.k, max(1, round(cfg.swap * self.k))) if cfg.swap > 0 and self.k else 0
        self.kernel_energy = xp.zeros(self.k, dtype=xp.float32) if self.is_server else None
        nn = cfg.block * cfg.block
        self._chunk = self.n_coef if xp is not np else min(self.n_coef, max(1, _CPU_CHUNK // nn) * nn)
        self._scratch: dict[str, Any] = {}          # fp32 buffers, allocated on first use, then reused
        self._values = xp.empty(self.k, dtype=xp.float32)              # the kernel values of a step
        self._inverse = dct.KernelInverse(self.n_blocks, cfg.block, xp)
        self.forced_due = -1        # a step every rank refreshes at (drift flag of the last aggregate)
        self.min_share = 1.0        # server: lowest carried-energy share among this step's worker packets
        self._install(0, kern.lowfreq_kernel(self.n_blocks, cfg.block, self.k))

    @property
    def residual(self) -> Any:
        """The error-feedback residual (fp32, n_coef, coefficient domain), or None without error feedback."""
        self._settle()
        return self._residual

    def _settle(self) -> None:
        """Write rank 0's kernel-order residual back into the coefficient vector."""
        if self._kept_live:
            self._residual[self.kernel] = self._kept
            self._kept_live = False

    def _buffer(self, name: str, size: int) -> Any:
        """A reusable fp32 scratch buffer (one per name and codec)."""
        if name not in self._scratch:
            self._scratch[name] = self.xp.empty(size, dtype=self.xp.float32)
        return self._scratch[name]

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

    # ---- sizes ----------------------------------------------------------------------------

    def payload_nbytes(self, step: int) -> int:
        """Exact size of :meth:`encode`'s output at ``step`` (after any kernel install of that step)."""
        if not self.compressed(step):
            return 4 * self.n_params
        return 4 * (self.groups.n_groups + self.tail) + quant.packed_nbytes(self.k, self.cfg.bits) + 1

    def max_payload_nbytes(self) -> int:
        """An upper bound of :meth:`payload_nbytes` over every step and kernel of the run."""
        dense = 4 * self.n_params
        if not self.cfg.enabled:
            return dense
        groups = -(-self.k // self.cfg.group) if self.cfg.group else min(self.k, self.n_blocks)
        packed = 4 * (groups + self.tail) + quant.packed_nbytes(self.k, self.cfg.bits) + 1
        return max(packed, dense) if self.cfg.warmup_steps > 0 else packed

    def unpacked_size(self, step: int) -> int:
        """Length of :meth:`unpack`'s vector at ``step``: k + tail when compressed, else n_params."""
        return self.k + self.tail if self.compressed(step) else self.n_params

    # ---- checks ---------------------------------------------------------------------------

    def _check(self, array: Any, step: int, what: str, size: int | None = None) -> None:
        size = self.n_params if size is None else size
        if array.ndim != 1 or array.size != size:
            raise HpcfedError(f"{what} at step {step} has shape {tuple(array.shape)}; expected ({size},)")

    def _check_payload(self, payload: Any, step: int) -> None:
        expected = self.payload_nbytes(step)
        if payload.ndim != 1 or payload.size != expected:
            raise HpcfedError(f"packet of {payload.size} bytes at step {step}; expected {expected} "
                              f"(kernel version {self.version})")

    def _target(self, out: Any, size: int, step: int, what: str) -> Any:
        """``out`` checked to hold exactly ``size`` fp32 values, or a new array."""
        if out is None:
            return self.xp.empty(size, dtype=self.xp.float32)
        self._check(out, step, what, size)
        return out

    def _nonfinite(self, array: Any, step: int) -> HpcfedError:
        bad = int((~self.xp.isfinite(array)).sum())
        where = f"step {step}, rank {self.rank}"
        if bad:
            return HpcfedError(f"gradient has {bad} NaN/Inf values at {where}; "
                               "lower the learning rate or check the data")
        return HpcfedError(f"gradient energy overflows float32 at {where}; lower the learning rate")

    # ---- encoding -------------------------------------------------------------------------

    def encode(self, grad: Any, step: int, out: Any = None) -> Any:
        """Packet bytes (uint8 xp array) for ``grad`` (+ residual) at ``step``; updates the residual.

        ``out`` (optional, uint8, at least :meth:`payload_nbytes` long) receives the packet; the
        returned array is then ``out[:payload_nbytes(step)]``. A NaN/Inf gradient raises HpcfedError
        (a fatal error: the residual and energy are then left partly updated).
        """
        xp, cfg = self.xp, self.cfg
        grad = xp.asarray(grad, dtype=xp.float32)
        self._check(grad, step, "gradient")
        self._settle()
        history = self.energy is not None and cfg.enabled and self._in_history(step)
        if not self.compressed(step):
            if not math.isfinite(float(grad.min()) + float(grad.max())):
                raise self._nonfinite(grad, step)
            if history:
                self._transform(grad, None, False, True)
            packet = self._packet(out, step)
            packet[...] = grad.view(xp.uint8)
            return packet
        tail = grad[self.n_coef:]
        total = self._transform(grad, self._values, self._residual is not None, history) + float(xp.dot(tail, tail))
        if not math.isfinite(total):
            raise self._nonfinite(grad, step)
        return self._finish(self._values, tail, total, step, out, kept=False)

    def encode_unpacked(self, vec: Any, step: int, out: Any = None) -> Any:
        """Rank 0: packet bytes for an aggregate given as an unpacked vector (O(k + tail) at compressed steps).

        Compressed step: the kernel values ``vec[:k]`` plus the residual there are quantized, the
        residual keeps what they did not carry (elsewhere it is unchanged: an aggregate of kernel
        vectors is zero off the kernel), the tail travels raw. Equals ``encode(densify(vec))`` up to
        float rounding; at a dense step it is exactly ``encode(vec)``. ``out`` as in :meth:`encode`.
        """
        xp = self.xp
        if not self.is_server:
            raise HpcfedError(f"rank {self.rank} is a worker; encode_unpacked encodes rank 0's aggregate")
        vec = xp.asarray(vec, dtype=xp.float32)
        self._check(vec, step, "unpacked aggregate", self.unpacked_size(step))
        if not self.compressed(step):
            return self.encode(vec, step, out)
        values, tail = self._values, vec[self.k:]
        if self._residual is not None:
            if not self._kept_live:
                xp.take(self._residual, self.kernel, out=self._kept)
                self._kept_live = True
            xp.add(self._kept, vec[: self.k], out=values)
        else:
            values[...] = vec[: self.k]
        total = float(xp.dot(values, values)) + float(xp.dot(tail, tail))
        if not math.isfinite(total):
            raise self._nonfinite(vec, step)
        return self._finish(values, tail, total, step, out, kept=True)

    def project(self, grad: Any, step: int, out: Any = None) -> Any:
        """A dense gradient in the unpacked domain (no residual, no state change): its DCT coefficients at
        the kernel and its tail at a compressed step, a copy at a dense step. ``densify`` maps it back to
        the gradient's part that packets can carry."""
        xp = self.xp
        grad = xp.asarray(grad, dtype=xp.float32)
        self._check(grad, step, "gradient")
        out = self._target(out, self.unpacked_size(step), step, "unpacked vector")
        if not self.compressed(step):
            out[...] = grad
            return out
        self._transform(grad, out[: self.k], False, False)
        out[self.k:] = grad[self.n_coef:]
        return out

    def _transform(self, grad: Any, values: Any, add_residual: bool, history: bool) -> float:
        """One chunked pass over the coefficients of ``grad``: coef = DCT(grad) (+ residual, stored as the
        residual when ``add_residual``); ``values`` (if given) receives coef at the kernel; ``energy +=
        coef**2`` when ``history``. Returns the sum of coef**2 when ``values`` is given."""
        xp, n = self.xp, self.cfg.block
        total = 0.0
        if not self.n_coef:
            return total
        size = self._chunk
        tmp = self._buffer("dct", size)
        work = self._buffer("work", size) if n > 8 else None
        fused = dct.fused(n, xp)
        square = self._buffer("square", size) if history and not fused else None
        for start, stop, a, b in self._chunks:
            coef = self._residual[start:stop] if add_residual else tmp[: stop - start]
            kept = (self._local[a:b], values[a:b]) if values is not None else (None, None)
            if fused:
                total += dct.forward_fused(grad[start:stop], coef, self.energy[start:stop] if history else None,
                                           add_residual, *kept)
                continue
            if add_residual:
                dct.forward(grad[start:stop], n, xp, out=coef, work=tmp[: stop - start], add=True)
            else:
                coef = dct.forward(grad[start:stop], n, xp, out=coef, work=work).reshape(-1)
            if values is not None:
                values[a:b] = coef[kept[0]]
                total += float(xp.dot(coef, coef))
            if history:
                self.energy[start:stop] += xp.multiply(coef, coef, out=square[: stop - start])
        return total

    def _finish(self, values: Any, tail: Any, total: float, step: int, out: Any, kept: bool) -> Any:
        """Quantize the kernel ``values``, update the residual there (kernel-order copy when ``kept``), write
        the packet."""
        xp, bits = self.xp, self.cfg.bits
        codes, scales = quant.quantize(values, self.groups, bits, xp, self._rng(step))
        if self.kernel_energy is not None:         # rank 0 ranks its kernel slots by what it sends (O(k))
            self.kernel_energy += xp.multiply(values, values, out=self._buffer("slot_square", self.k))
        meta = self._meta(float(xp.dot(values, values)), total, step)
        if self._residual is not None:
            values -= quant.dequantize(codes, scales, self.groups, bits, xp)
            if kept:
                self._kept[...] = values
            else:
                self._residual[self.kernel] = values
        packet = self._packet(out, step)
        s, t = self.groups.n_groups, self.tail
        packet[: 4 * s].view(xp.float32)[...] = scales
        packet[4 * s: 4 * (s + t)].view(xp.float32)[...] = tail
        quant.pack(codes, bits, xp, out=packet[4 * (s + t): -1])
        packet[-1] = meta
        return packet

    def _packet(self, out: Any, step: int) -> Any:
        size = self.payload_nbytes(step)
        if out is None:
            return self.xp.empty(size, dtype=self.xp.uint8)
        if out.ndim != 1 or out.size < size or out.dtype != self.xp.uint8:
            raise HpcfedError(f"packet buffer of {out.size} {out.dtype} at step {step}; need {size} uint8")
        return out[:size]

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

    # ---- decoding -------------------------------------------------------------------------

    def decode(self, payload: Any, step: int, out: Any = None) -> Any:
        """fp32 vector (length n_params) from packet bytes of ``step``: ``densify(unpack(payload))``; deterministic.

        ``out`` (optional, contiguous fp32, n_params) receives it without a new allocation.
        """
        out = self._target(out, self.n_params, step, "decoded gradient")
        if not self.compressed(step):
            return self.unpack(payload, step, out=out)
        vec = self.unpack(payload, step, out=self._buffer("unpacked", self.k + self.tail))
        return self.densify(vec, step, out)

    def unpack(self, payload: Any, step: int, out: Any = None) -> Any:
        """The unpacked vector (fp32, :meth:`unpacked_size`) of a packet: O(k + tail) at compressed steps.

        Compressed: the k dequantized kernel values (kernel order), then the raw tail; dense: the raw
        fp32 vector. Reads the meta byte (rank 0 tracks the lowest carried share, workers take the
        drift flag). ``out`` (optional, contiguous fp32) receives it without a new allocation.
        """
        xp = self.xp
        self._check_payload(payload, step)
        out = self._target(out, self.unpacked_size(step), step, "unpacked vector")
        if not self.compressed(step):
            out[...] = payload.view(xp.float32)
            return out
        s, t, k = self.groups.n_groups, self.tail, self.k
        quant.unpack_values(payload[4 * (s + t): -1], payload[: 4 * s].view(xp.float32), self.groups,
                            self.cfg.bits, xp, out=out[:k])
        out[k:] = payload[4 * s: 4 * (s + t)].view(xp.float32)
        self._read_meta(int(payload[-1]), step)
        return out

    def densify(self, vec: Any, step: int, out: Any = None) -> Any:
        """The full gradient (fp32, n_params, into ``out``) of an unpacked vector: kernel values scattered
        into coefficients, one inverse DCT, the tail copied; a copy at a dense step."""
        vec = self.xp.asarray(vec, dtype=self.xp.float32)
        self._check(vec, step, "unpacked vector", self.unpacked_size(step))
        out = self._target(out, self.n_params, step, "decoded gradient")
        if not self.compressed(step):
            if out is not vec:
                out[...] = vec
            return out
        if self.n_coef:
            self._inverse(vec[: self.k], out[: self.n_coef])
        out[self.n_coef:] = vec[self.k:]
        return out

    def _read_meta(self, meta: int, step: int) -> None:
        if meta & _SERVER:
            if meta & 1:
                self.forced_due = step + 2
        elif self.is_server:
            self.min_share = min(self.min_share, meta / 127)

    # ---- kernel exchange ------------------------------------------------------------------

    def delta_refresh(self) -> bool:
        """Whether the next kernel exchange is a delta (``swap`` > 0, after the first refresh; same on all ranks)."""
        return self.m > 0 and self.version > 0

    def local_kernel(self) -> Any:
        """This worker's kernel proposal (uint8): top positions of history energy + residual energy; for a
        delta refresh only the top ``m`` positions outside the current kernel."""
        if self.energy is None:
            raise HpcfedError(f"rank {self.rank} is the server; local kernels come from workers (rank >= 1)")
        delta = self.delta_refresh()
        score = self.energy
        if self.residual is not None:      # residual**2 + energy in a reused buffer (no O(n) allocation)
            score = self.xp.multiply(self.residual, self.residual, out=self._buffer("score", self.n_coef))
            score += self.energy
        elif delta:
            score = self._buffer("score", self.n_coef)
            score[...] = self.energy
        if delta:
            score[self.kernel] = -1.0      # energies are >= 0: kernel positions rank last
        return self.xp.asarray(kern.local_kernel(score, self.m if delta else self.k, KERNEL_TIERS, self.xp))

    def merge_kernels(self, payloads: list) -> Any:
        """Rank 0: the next global kernel (uint8) from the workers' local kernels (a delta when
        :meth:`delta_refresh`: rank 0's weakest slots out, the best-voted proposals in)."""
        if self.delta_refresh():
            removed, added = kern.merge_delta([to_numpy(p) for p in payloads], to_numpy(self.kernel),
                                              to_numpy(self.kernel_energy), self.m, self.n_coef, self.version + 1)
            return self.xp.asarray(kern.delta_payload(self.version + 1, removed, added))
        merged = kern.merge([to_numpy(p) for p in payloads], self.n_blocks, self.cfg.block, self.k, self.version + 1)
        return self.xp.asarray(kern.global_payload(self.version + 1, merged))

    def install_kernel(self, payload: Any, *, any_version: bool = False) -> None:
        """All ranks: adopt the global kernel from rank 0 (its version is the current one + 1).

        ``any_version``: a worker rejoining after missed steps takes whatever version is current.
        """
        version, indices = kern.read_global_payload(to_numpy(payload), self.n_coef, self.k, to_numpy(self.kernel))
        if version != self.version + 1 and not any_version:
            raise HpcfedError(f"kernel version {version} received on rank {self.rank}; expected {self.version + 1}")
        self._install(version, indices)

    def kernel_payload(self) -> Any:
        """The installed global kernel as rank 0 would send it (for workers that rejoin)."""
        return self.xp.asarray(kern.global_payload(self.version, to_numpy(self.kernel)))

    def max_kernel_nbytes(self) -> int:
        """An upper bound of any local or global kernel payload (varint gaps of < 2**35, plus headers)."""
        return 5 * max(self.k, 2 * self.m) + 64

    def _install(self, version: int, indices: np.ndarray) -> None:
        xp, cfg = self.xp, self.cfg
        self._settle()                      # with the outgoing kernel
        indices = np.asarray(indices, dtype=np.int64)
        self.version = version
        self.kernel = xp.asarray(indices)
        if cfg.group:
            self.groups = quant.fixed_groups(self.k, cfg.group, xp)
        else:
            self.groups = quant.groups_by_label(self.kernel // (cfg.block * cfg.block), xp)
        self._inverse.set_indices(self.kernel)
        if self.n_coef:       # chunks of the encoder pass and the kernel entries each one holds
            starts = np.arange(0, self.n_coef, self._chunk)
            cuts = np.append(np.searchsorted(indices, starts), self.k).tolist()
            self._chunks = [(int(s), min(int(s) + self._chunk, self.n_coef), cuts[i], cuts[i + 1])
                            for i, s in enumerate(starts)]
            self._local = self.kernel % self._chunk
        if self.energy is not None:
            self.energy[:] = 0
        if self.kernel_energy is not None:
            self.kernel_energy[:] = 0

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
            "kernel_energy": empty if self.kernel_energy is None else to_numpy(self.kernel_energy),
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
            self.residual[...] = xp.asarray(state["residual"], dtype=xp.float32)
        if self.energy is not None:
            self.energy[...] = xp.asarray(state["energy"], dtype=xp.float32)
        self.forced_due = int(state["forced_due"])
        self.min_share = float(state["min_share"])
        if self.kernel_energy is not None and "kernel_energy" in state:   # older checkpoints: start from zero
            saved = np.asarray(state["kernel_energy"], dtype=np.float32)
            if saved.shape != (self.k,):
                raise HpcfedError(f"checkpoint codec kernel_energy has shape {saved.shape}; expected ({self.k},)")
            self.kernel_energy[...] = xp.asarray(saved)
