"""Post-run analysis: summaries and plots from a run's HDF5 trace (:mod:`.report`)."""
