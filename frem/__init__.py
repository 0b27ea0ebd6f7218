"""frem: the Feature Random Enhancement Module as a one-line regularizer.

    import frem
    handle = frem.attach(model, layer="bottleneck", B=8, X=250)
    for epoch in range(epochs):
        frem.resample(model, epoch)
        ...train...

The library needs torch (and triton for the CUDA kernel) and nothing else;
``frem.lightning`` and ``frem.monai`` hold the callbacks for those frameworks;
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

# The framework glue imports its framework, so it loads when first named:
# frem.lightning.FREMResample() and frem.monai.FREMResample() work after `import frem`.
FRAMEWORKS = ("lightning", "monai")


def __getattr__(name):
    if name in FRAMEWORKS:
        import importlib
        return importlib.import_module(f"frem.{name}")
    raise AttributeError(f"module 'frem' has no attribute {name!r}")
