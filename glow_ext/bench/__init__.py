"""The benchmarks of glow_ext: `glow-ext bench-ops`, `bench`, `bench-reversible`."""
