"""frem: the Feature Random Enhancement Module as a one-line regularizer.

    import frem
    handle = frem.attach(model, layer="bottleneck", B=8, X=250)
    for epoch in range(epochs):
        frem.resample(model, epoch)
        ...train...

The library needs torch (and triton for the CUDA kernel) and nothing else;
``frem.integrations`` holds the glue for Lightning, MONAI, nnU-Net, the Hugging
Face Trainer and Cellpose; the cell-segmentation application lives in ``frem.seg``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the module that defines it. They load when first used (PEP 562), so
# `import frem` costs nothing and the `frem` command answers --help and --version without
# waiting for torch; `frem.attach` imports torch and the library as before.
_NAMES = {
    "FREM": "frem.module", "select_channels": "frem.selection", "scale_channels": "frem.kernels.scale_channels",
    "attach": "frem.hooks", "attached": "frem.hooks", "detach": "frem.hooks", "resample": "frem.hooks",
    "disabled": "frem.hooks", "status": "frem.monitor",
    "Site": "frem.bottleneck", "candidates": "frem.bottleneck", "find_bottleneck": "frem.bottleneck",
    "locate_bottleneck": "frem.bottleneck",
}
# The framework glue (frem.integrations: Lightning, MONAI, nnU-Net, the Hugging Face Trainer, Cellpose)
# imports its framework, so it loads when first named: frem.integrations.lightning.FREMResample() works
# after `import frem`. frem.diagnostics and frem.search load when first named too.
SUBMODULES = ("integrations", "diagnostics", "search", "reach")

__all__ = sorted(_NAMES)

if TYPE_CHECKING:  # what type checkers and IDEs see
    from frem.bottleneck import Site, candidates, find_bottleneck, locate_bottleneck
    from frem.hooks import attach, attached, detach, disabled, resample
    from frem.monitor import status
    from frem.kernels.scale_channels import scale_channels
    from frem.module import FREM
    from frem.selection import select_channels


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value  # once: later lookups are plain attribute reads
        return value
    if name in SUBMODULES:
        return importlib.import_module(f"frem.{name}")
    raise AttributeError(f"module 'frem' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | set(SUBMODULES))
