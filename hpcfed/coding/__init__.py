"""Coded sample-set blocks: assignments that let any k of W workers supply one full data set."""

from hpcfed.coding.assignment import (
    SCHEMES,
    Assignment,
    block_batch,
    block_indices,
    combine_block_gradients,
    make_assignment,
    verify_any_k,
)
from hpcfed.coding.tracker import CompletionTracker

__all__ = [
    "SCHEMES",
    "Assignment",
    "CompletionTracker",
    "block_batch",
    "block_indices",
    "combine_block_gradients",
    "make_assignment",
    "verify_any_k",
]
