"""Coded sample-set blocks: which worker holds which data block, and why any k suffice.

r = s + 1 identical copies of the training set are cut into data blocks, and the
block copies are spread over W workers so that the blocks held by ANY k = W - s
workers contain every block at least once, i.e. one complete sample set. Rank 0
then forms the exact full-set gradient from the first complete set that arrives
and ignores up to s stragglers. With k == W (s = 0) the same code is plain
uncoded data parallelism: W blocks, one per worker.

Workers are numbered 0..W-1 here (MPI rank = worker + 1).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from hpcfed.errors import HpcfedError

SCHEMES = ("cyclic", "fractional")


@dataclass(frozen=True)
class Assignment:
    """Holders of every data block (``holders[b]``) and, derived, the blocks of every worker."""

    n_workers: int
    target: int
    scheme: str
    holders: tuple[tuple[int, ...], ...]
    blocks: tuple[tuple[int, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.target <= self.n_workers:
            raise ValueError(f"target {self.target} outside 1..{self.n_workers}")
        for b, hs in enumerate(self.holders):
            if len(set(hs)) != len(hs) or any(not 0 <= w < self.n_workers for w in hs):
                raise ValueError(f"block {b}: holders {hs} must be distinct workers in 0..{self.n_workers - 1}")
        per_worker = tuple(
            tuple(b for b, hs in enumerate(self.holders) if w in hs) for w in range(self.n_workers)
        )
        object.__setattr__(self, "blocks", per_worker)

    @property
    def n_blocks(self) -> int:
        return len(self.holders)

    @property
    def stragglers(self) -> int:
        """s = W - k: how many workers rank 0 may leave out."""
        return self.n_workers - self.target

    def holders_of(self, block: int) -> tuple[int, ...]:
        return self.holders[block]

    def blocks_of(self, worker: int) -> tuple[int, ...]:
        return self.blocks[worker]


def make_assignment(n_workers: int, target: int, scheme: str) -> Assignment:
    """Build the ``scheme`` assignment tolerating s = n_workers - target stragglers.

    ``fractional``: (s+1) must divide W; W/(s+1) blocks, block g held by workers g(s+1)..g(s+1)+s.
    ``cyclic``: any W; W blocks, worker i holds blocks i..i+s (mod W).
    """
    if n_workers < 1:
        raise HpcfedError(f"coding: {n_workers} workers; need at least 1 (launch with 2 or more MPI ranks)")
    if not 1 <= target <= n_workers:
        raise HpcfedError(f"coding.target={target}: allowed 1..{n_workers} (the number of workers)")
    if scheme not in SCHEMES:
        raise HpcfedError(f"coding.scheme={scheme!r}: allowed {', '.join(SCHEMES)}")
    r = n_workers - target + 1
    if scheme == "fractional":
        if n_workers % r:
            raise HpcfedError(
                f"coding.scheme=fractional needs (workers - target + 1) = {r} to divide workers = {n_workers}; "
                f"use scheme=cyclic or another target"
            )
        holders = tuple(tuple(range(g * r, (g + 1) * r)) for g in range(n_workers // r))
    else:
        holders = tuple(tuple(sorted((b - j) % n_workers for j in range(r))) for b in range(n_workers))
    return Assignment(n_workers, target, scheme, holders)


def verify_any_k(assignment: Assignment, *, exhaustive_limit: int = 16, samples: int = 2000, seed: int = 0) -> int:
    """Check that the blocks of every k-subset of workers cover all blocks; return the subsets checked.

    Construction argument: a k-subset misses block b exactly when it avoids all holders of b, which
    is possible iff W - |holders(b)| >= k, i.e. |holders(b)| <= s. Both schemes give every block
    s + 1 distinct holders (fractional: a group of s+1; cyclic: workers b-s..b mod W), so removing
    any s workers leaves a holder of each block. The check below does not trust that argument: for
    W <= ``exhaustive_limit`` it tries every k-subset; above, ``samples`` random k-subsets plus, per
    block with at least k non-holders, k of them (such a subset exists exactly for an
    under-replicated block, so this part is exact and a correct assignment checks ``samples``). Raises HpcfedError naming a failing subset and the block it misses.
    """
    w, k, n_blocks = assignment.n_workers, assignment.target, assignment.n_blocks
    full = (1 << n_blocks) - 1
    masks = [sum(1 << b for b in assignment.blocks_of(i)) for i in range(w)]

    def subsets() -> Iterable[tuple[int, ...]]:
        if w <= exhaustive_limit:
            return itertools.combinations(range(w), k)
        rng = np.random.default_rng(seed)
        randoms = (tuple(sorted(rng.choice(w, size=k, replace=False).tolist())) for _ in range(samples))
        adversarial = []
        for b in range(n_blocks):
            outside = [i for i in range(w) if i not in assignment.holders_of(b)]
            if len(outside) >= k:
                adversarial.append(tuple(outside[:k]))
        return itertools.chain(adversarial, randoms)

    checked = 0
    for subset in subsets():
        covered = 0
        for i in subset:
            covered |= masks[i]
        if covered != full:
            missing = next(b for b in range(n_blocks) if not covered >> b & 1)
            raise HpcfedError(
                f"coding: workers {list(subset)} (k={k} of {w}) miss block {missing}, "
                f"held only by {list(assignment.holders_of(missing))}"
            )
        checked += 1
    return checked


def block_indices(n_samples: int, n_blocks: int, *, seed: int | None = None, min_size: int = 1) -> list[np.ndarray]:
    """Cut sample indices 0..n_samples-1 into ``n_blocks`` contiguous near-equal blocks.

    With ``seed`` the indices are shuffled once first (blocks then hold sorted random indices);
    without it the given order is kept. ``min_size`` (e.g. the per-block batch) is the smallest
    block allowed; a data set too small for that raises HpcfedError naming the sizes.
    """
    if n_blocks < 1:
        raise HpcfedError(f"coding: {n_blocks} blocks; need at least 1")
    if n_samples // n_blocks < max(min_size, 1):
        raise HpcfedError(
            f"coding: data set of {n_samples} samples is too small for {n_blocks} blocks of at least "
            f"{max(min_size, 1)} samples (need {n_blocks * max(min_size, 1)})"
        )
    order = np.arange(n_samples) if seed is None else np.random.default_rng(seed).permutation(n_samples)
    parts = np.array_split(order, n_blocks)
    return [np.sort(p) if seed is not None else p for p in parts]


def block_batch(block_size: int, batch: int, seed: int, block: int, step: int) -> np.ndarray:
    """Indices into block ``block`` for step ``step``: the same on every holder, no communication.

    Sampling is without replacement within an epoch of the block: epoch e = step // (block_size //
    b) draws one permutation from (seed, block, e) and step takes its next b entries, where
    b = min(batch, block_size); the tail that does not fill a batch is skipped that epoch.
    """
    if block_size < 1 or batch < 1 or step < 0 or block < 0 or seed < 0:
        raise ValueError(f"block_batch: need block_size, batch >= 1 and seed, block, step >= 0; got "
                         f"{block_size}, {batch}, {seed}, {block}, {step}")
    b = min(batch, block_size)
    per_epoch = block_size // b
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, block, epoch]).permutation(block_size)
    return perm[pos * b : (pos + 1) * b]


def combine_block_gradients(block_grads: Mapping[int, Any], weights: Mapping[int, float] | Sequence[float]) -> Any:
    """Weighted mean of block gradients, summed in ascending block order (bit-reproducible).

    With mean losses and ``weights[b]`` = the batch size used on block b, the result equals the
    gradient of the mean loss over the union of all blocks' batches. Works on anything with
    ``*`` and ``+`` (NumPy, CuPy, torch); arrival order does not matter.
    """
    if not block_grads:
        raise ValueError("combine_block_gradients: no block gradients")
    order = sorted(block_grads)
    total = float(sum(weights[b] for b in order))
    out = None
    for b in order:
        term = block_grads[b] * (float(weights[b]) / total)
        out = term if out is None else out + term
    return out
