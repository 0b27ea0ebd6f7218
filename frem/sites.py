"""Where FREM acts: a module's output (or input), and which tensor of it.

A layer may return (or take) a list, tuple or dict; an *entry* is the path
of keys and indices to one tensor inside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Site:
    """Where FREM acts: a module's output (or input), and which entry of it.

    ``entry`` is the path into a list/tuple/dict output, ``()`` for a tensor,
    ``None`` to pick the deepest feature map at the first training call.
    ``dim`` is where the tensor's channels are: 1 for (N, C, *spatial), -1 for
    channels-last maps (N, *spatial, C) and tokens (N, L, C).
    """
    layer: str
    at: str = "output"
    entry: tuple | None = ()
    channels: int | None = None
    dim: int = 1

    def describe(self) -> str:
        layout = "" if self.dim == 1 else f" (channels in dim {self.dim})"
        return f"{self.layer or '<model>'} {self.at}{format_entry(self.entry)}{layout}"


def format_entry(entry) -> str:
    if not entry:
        return ""
    return "".join(f"[{key!r}]" for key in entry)


def tensor_entries(value, path=()):
    """(path, tensor) for a tensor or every tensor inside nested lists/tuples/dicts."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensor_entries(item, path + (key,))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from tensor_entries(item, path + (index,))


def get_entry(value, entry):
    for key in entry:
        value = value[key]
    return value


def replace_entry(value, entry, new):
    """``value`` with the tensor at ``entry`` replaced, containers rebuilt as their own type."""
    if not entry:
        return new
    key, rest = entry[0], entry[1:]
    if isinstance(value, dict):
        return type(value)({**value, key: replace_entry(value[key], rest, new)})
    items = list(value)
    items[key] = replace_entry(items[key], rest, new)
    if hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*items)
    return type(value)(items)


def deepest_entry(value, dim: int = 1) -> tuple | None:
    """The entry holding the deepest feature map: lowest resolution, most channels, last
    (channels in ``dim``, the spatial dims every other one but the batch)."""
    maps = [(path, t) for path, t in tensor_entries(value) if t.dim() >= 3]
    if not maps:
        entries = list(tensor_entries(value))
        return entries[-1][0] if entries else None
    # A plain loop, not min(key=...): this runs inside torch.compile at the first training call, and
    # Dynamo in torch 2.13 cannot trace min with a key ("invalid call to builtin op handler").
    best, best_rank = None, None
    for index, (path, t) in enumerate(maps):
        channel = dim % t.dim()
        rank = (math.prod(t.shape[1:channel] + t.shape[channel + 1:]), -t.shape[channel], -index)
        if best_rank is None or rank < best_rank:
            best, best_rank = path, rank
    return best
