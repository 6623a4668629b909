"""hpcfed: communication-efficient, straggler-tolerant distributed and federated learning over MPI."""

__version__ = "0.1.0"
