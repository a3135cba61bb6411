"""Triton kernels and their host launchers, imported as fastvq.kernels (never `import kernels`)."""
