"""Per-step bookkeeping on rank 0: which block gradients arrived, and is one full set there yet."""

from __future__ import annotations

from hpcfed.coding.assignment import Assignment


class CompletionTracker:
    """Records (worker, block) arrivals of one step and keeps the first copy of each block.

    Rank 0 calls :meth:`reset` at the start of a step, :meth:`add` after every Waitany, and stops
    waiting once :meth:`complete` is True; :meth:`chosen` says whose copy of each block to use.
    Duplicates (a second holder's copy, or a repeat) are ignored.
    """

    def __init__(self, assignment: Assignment) -> None:
        self.assignment = assignment
        self.step = -1
        self._chosen: dict[int, int] = {}

    def reset(self, step: int) -> None:
        self.step = step
        self._chosen = {}

    def add(self, worker: int, block: int) -> bool:
        """Record one arrival; True when this copy is the one chosen for ``block``."""
        if block not in self.assignment.blocks_of(worker):
            raise ValueError(f"step {self.step}: worker {worker} does not hold block {block}")
        if block in self._chosen:
            return False
        self._chosen[block] = worker
        return True

    def add_worker(self, worker: int) -> list[int]:
        """Record all blocks of ``worker`` at once; return the blocks it newly supplied."""
        return [b for b in self.assignment.blocks_of(worker) if self.add(worker, b)]

    def complete(self) -> bool:
        return len(self._chosen) == self.assignment.n_blocks

    def missing(self) -> list[int]:
        return [b for b in range(self.assignment.n_blocks) if b not in self._chosen]

    def chosen(self) -> dict[int, int]:
        """block -> worker whose copy arrived first, in ascending block order."""
        return dict(sorted(self._chosen.items()))

    def used_workers(self) -> tuple[int, ...]:
        """Workers that supplied at least one chosen block (sorted)."""
        return tuple(sorted(set(self._chosen.values())))
