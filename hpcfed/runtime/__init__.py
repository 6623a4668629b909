"""MPI runtime: roles, framed buffer messages, abort handling, device selection."""
