"""Triton kernels of frem, one file per op (installed as ``frem.kernels``)."""

from .scale_channels import launch_scale_channels, scale_channels

__all__ = ["launch_scale_channels", "scale_channels"]
