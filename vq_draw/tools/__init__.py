"""Tools around the library, not part of it: the benchmark, figure regeneration, and the
comparison of a run with the original implementation's training logs."""
