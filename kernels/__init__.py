"""Triton kernels of frem, one module per op (installed as ``frem.kernels``)."""
