"""Test program: the worker on rank 1 raises at step 5; the whole job must end promptly."""

import sys

from mpi4py import MPI

from hpcfed import cli
from hpcfed.algorithms import sync_ps

original = sync_ps.compute_gradient


def failing(session, x, y, step):
    if MPI.COMM_WORLD.Get_rank() == 1 and step == 5:
        raise RuntimeError("injected failure at step 5")
    return original(session, x, y, step)


sync_ps.compute_gradient = failing
sys.exit(cli.main(sys.argv[1:]))
