"""frem: the Feature Random Enhancement Module as a one-line regularizer.

    import frem
    handle = frem.attach(model, layer="bottleneck", B=8, X=250)
    for epoch in range(epochs):
        frem.resample(model, epoch)
        ...train...

The library needs torch (and triton for the CUDA kernel) and nothing else;
the cell-segmentation application lives in ``frem.seg``.
"""

from frem.bottleneck import Site, candidates, find_bottleneck, locate_bottleneck
from frem.hooks import attach, attached, detach, resample
from frem.kernels.scale_channels import scale_channels
from frem.module import FREM
from frem.selection import select_channels

__version__ = "0.1.0"

__all__ = ["FREM", "Site", "attach", "attached", "candidates", "detach", "find_bottleneck",
           "locate_bottleneck", "resample", "scale_channels", "select_channels"]
