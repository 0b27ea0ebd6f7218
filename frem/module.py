"""FREM, the Feature Random Enhancement Module (Ando & Hotta, VISAPP 2021).

In training it multiplies B chosen channels by X; in eval it returns its input
object unchanged. ``mode="random"`` re-draws the channels on every
``resample(epoch)``; ``mode="fixed"`` keeps the epoch-0 draw (paper Table 3).
Its buffers are non-persistent, so it never changes a model's state_dict.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

from frem.kernels.scale_channels import scale_channels
from frem.selection import resolve_count, select_channels, validate_count_spec

MODES = ("random", "fixed")


class FREM(nn.Module):
    """Multiply B channels of dim 1 by X while training; identity in eval.

    Args:
        B: channels to enhance, an int count or a float fraction in (0, 1].
        X: the enhancement factor, finite and > 0.
        mode: ``"random"`` (re-drawn each epoch) or ``"fixed"`` (drawn once).
        seed: the draw is a pure function of (seed, epoch).
        layer: name of the hooked layer, used in error messages.
    """

    def __init__(self, B: int | float, X: float, mode: str = "random", seed: int = 0,
                 layer: str | None = None):
        super().__init__()
        self._B_spec = validate_count_spec(B)
        if isinstance(X, bool) or not isinstance(X, Real) or not math.isfinite(X) or X <= 0:
            raise ValueError(f"X must be a finite number > 0, got X={X!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.X = float(X)
        self.mode = mode
        self.seed = int(seed)
        self.layer = layer
        self.epoch = 0
        self.num_channels: int | None = None
        # Set by frem.attach: the hook applies an attached FREM, so a container
        # that iterates its children (nn.Sequential, timm feature nets) and
        # calls it again gets the identity.
        self.applied_by_hook = False
        self.register_buffer("scale", torch.ones(0), persistent=False)
        self.register_buffer("channels", torch.zeros(0, dtype=torch.long), persistent=False)

    @property
    def B(self) -> int | float:
        """The channel count once the layer's width is known, else B as given."""
        return self.channels.numel() if self.num_channels is not None else self._B_spec

    def bind(self, num_channels: int, device: torch.device | None = None) -> "FREM":
        """Fix the channel count (checking B against it) and draw the channels."""
        self._count = resolve_count(self._B_spec, num_channels, self.layer)
        self.num_channels = int(num_channels)
        device = self.scale.device if device is None else device
        self.scale = torch.ones(num_channels, device=device)
        self.channels = torch.zeros(self._count, dtype=torch.long, device=device)
        return self._draw()

    def resample(self, epoch: int) -> "FREM":
        """Draw the channels for ``epoch`` (``mode="fixed"`` keeps its first draw)."""
        self.epoch = int(epoch)
        return self._draw() if self.num_channels is not None else self

    @torch.no_grad()
    def _draw(self) -> "FREM":
        epoch = self.epoch if self.mode == "random" else 0
        chosen = select_channels(self.num_channels, self._count, self.seed, epoch)
        # In place, so compiled graphs and DDP buffer views stay valid.
        self.channels.copy_(chosen)
        self.scale.fill_(1.0).index_fill_(0, self.channels, self.X)
        return self

    def enhance(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        where = f"layer {self.layer!r}" if self.layer is not None else "FREM's input"
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where} has no channel dimension (output {shape}); "
                             "FREM needs (N, C, *spatial) feature maps")
        if x.dtype == torch.float16:
            # Features near 10 times X=632 already pass float16's max of 65504:
            # the run would go inf/NaN silently. Checking the dtype costs no sync.
            raise RuntimeError(
                f"FREM at {where} got float16 features: multiplying by X={self.X:g} overflows "
                "float16 (max 65504). Train with bfloat16 autocast "
                "(torch.autocast('cuda', dtype=torch.bfloat16)) or float32.")
        if self.num_channels is None:
            self.bind(x.shape[1], device=x.device)
        elif x.shape[1] != self.num_channels:
            raise ValueError(f"{where} has {x.shape[1]} channels, but this FREM was bound to "
                             f"{self.num_channels}")
        return scale_channels(x, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.applied_by_hook else self.enhance(x)

    def remove(self) -> None:
        """Undo ``frem.attach``: remove the hook and this submodule."""
        attachment = getattr(self, "_attachment", None)
        if attachment is None:
            raise RuntimeError("this FREM was not attached with frem.attach (or was removed already)")
        attachment.undo(self)

    def extra_repr(self) -> str:
        parts = [f"B={self.B}", f"X={self.X:g}", f"mode={self.mode!r}", f"seed={self.seed}"]
        if self.layer is not None:
            parts.append(f"layer={self.layer!r}")
        parts.append(f"channels={self.num_channels if self.num_channels is not None else '?'}")
        parts.append(f"epoch={self.epoch}")
        return ", ".join(parts)
