"""Which channels FREM enhances: a pure function of (seed, epoch).

Because nothing but (seed, epoch) decides the draw, every DDP rank and every
resumed run picks the same channels without any communication.
"""

from __future__ import annotations

import hashlib
import math
from numbers import Integral, Real

import torch


def validate_count_spec(B) -> int | float:
    """Check B's type and range before the channel count is known."""
    if isinstance(B, bool) or not isinstance(B, Real):
        raise TypeError(f"B must be an int count or a float fraction of the channels, got {B!r}")
    if isinstance(B, Integral):
        if B < 1:
            raise ValueError(f"B must be at least 1 channel, got B={B}")
        return int(B)
    if not (0.0 < B <= 1.0) or math.isnan(B):
        raise ValueError(f"a float B is a fraction of the channels and must lie in (0, 1], got B={B}")
    return float(B)


def resolve_count(B: int | float, num_channels: int, layer: str | None = None) -> int:
    """B as a channel count for a layer with ``num_channels`` channels."""
    where = f"layer {layer!r}" if layer is not None else "the layer"
    B = validate_count_spec(B)
    count = max(1, round(B * num_channels)) if isinstance(B, float) else B
    if count > num_channels:
        raise ValueError(f"B={count} is larger than the {num_channels} channels of {where}")
    return count


def _generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.blake2b(f"frem:{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def select_channels(num_channels: int, B: int, seed: int, epoch: int) -> torch.Tensor:
    """The B distinct channels (sorted LongTensor) drawn for this (seed, epoch)."""
    if not 1 <= B <= num_channels:
        raise ValueError(f"B={B} must lie in [1, {num_channels}]")
    chosen = torch.randperm(num_channels, generator=_generator(seed, epoch))[:B]
    return chosen.sort().values
