"""Code the notebooks and benchmarks use that is not part of the library."""
