"""Training algorithms: each module has server() and worker() entry points."""
