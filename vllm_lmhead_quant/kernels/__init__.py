"""GPU kernels of the LM-head methods; each module imports its compiler lazily so CPU-only installs work."""
