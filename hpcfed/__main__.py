"""``python -m hpcfed`` (under mpiexec: ``python -m mpi4py -m hpcfed``)."""

import sys

from hpcfed.cli import main

if __name__ == "__main__":
    sys.exit(main())
