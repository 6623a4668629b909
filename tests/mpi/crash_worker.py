"""Test program: the worker on rank 1 raises at step 5; the whole job must end promptly."""

import sys

from hpcfed import cli
from hpcfed.algorithms import sync_core

original = sync_core.WorkerCore.upload


def failing(self, step, stop_requested=False):
    if self.rank == 1 and step == 5:
        raise RuntimeError("injected failure at step 5")
    return original(self, step, stop_requested)


sync_core.WorkerCore.upload = failing
sys.exit(cli.main(sys.argv[1:]))
