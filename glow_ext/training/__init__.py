"""The training application of glow_ext: `glow-ext train`, `sample`, `evaluate`, `ablate`."""
