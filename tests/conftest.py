"""Test set-up: without a GPU, the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before
frem is imported, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
