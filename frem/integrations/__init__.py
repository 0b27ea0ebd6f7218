"""FREM in the training loops researchers use but do not own: one module per framework, each loading its
framework only when imported (``import frem`` loads none of them).

=====================  ===================================================================
``lightning``          ``FREMResample``, ``FREMDiagnostics``: Lightning callbacks
``monai``              ``FREMResample``, ``FREMDiagnostics``: handlers for MONAI's engines
``nnunet``             ``FREMMixin``: FREM on any nnU-Net v2 trainer class
``transformers``       ``FREMCallback``: the Hugging Face ``Trainer``
``cellpose``           ``attach``: Cellpose 3's ``train_seg`` (its CPnet U-Net)
=====================  ===================================================================

A loop with no epoch hook of its own and none of these: ``frem.attach(..., redraw="train")``
(a re-draw at every ``model.train()``) or ``redraw=N`` (every N training steps).
"""

from __future__ import annotations

import importlib

NAMES = ("lightning", "monai", "nnunet", "transformers", "cellpose")


def __getattr__(name):
    if name in NAMES:  # frem.integrations.lightning works after `import frem` alone
        return importlib.import_module(f"frem.integrations.{name}")
    raise AttributeError(f"module 'frem.integrations' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(NAMES))
