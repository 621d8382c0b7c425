"""Linearization (jvp/vjp), empirical NTK and merge kernels. Filled by the kernels and merge stages."""
