"""Data sets (shipped, HDF5 files, synthetic) and partitioners."""
