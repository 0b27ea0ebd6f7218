"""frem: the Feature Random Enhancement Module as a one-line regularizer.

    import frem
    handle = frem.attach(model, layer="bottleneck", B=8, X=250)
    for epoch in range(epochs):
        frem.resample(model, epoch)
        ...train...
"""

from frem.bottleneck import find_bottleneck
from frem.hooks import attach, attached, detach, resample
from frem.kernels.scale_channels import scale_channels
from frem.module import FREM
from frem.selection import select_channels

__version__ = "0.1.0"

__all__ = ["FREM", "attach", "attached", "detach", "find_bottleneck", "resample",
           "scale_channels", "select_channels"]
