"""What every data set becomes: uint8 image tiles and class-index masks per split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class DataError(ValueError):
    """A data problem, with the file and how to fix it in the message."""


@dataclass
class Split:
    images: torch.Tensor  # (N, channels, H, W) uint8
    masks: torch.Tensor   # (N, H, W) uint8 class indices
    names: list[str]      # where each tile came from

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.masks.to(device), self.names)


@dataclass
class SegmentationData:
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    source: str

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}


def tile_grid(height: int, width: int, crop: int | None, limit: int | None = None
              ) -> list[tuple[int, int]]:
    """Top-left corners of non-overlapping ``crop`` tiles (the remainder is dropped).

    ``limit`` keeps that many tiles spread evenly over the grid, so a small run
    still sees every part of a section.
    """
    if crop is None:
        return [(0, 0)]
    if crop > min(height, width):
        raise DataError(f"crop {crop} is larger than the {height}x{width} image")
    corners = [(r, c) for r in range(0, height - crop + 1, crop)
               for c in range(0, width - crop + 1, crop)]
    if limit is not None and limit < len(corners):
        keep = np.linspace(0, len(corners) - 1, limit).round().astype(int)
        corners = [corners[i] for i in keep]
    return corners


def make_split(pairs, crop, limit, label) -> Split:
    """Tile (name, image HxWxC uint8, mask HxW uint8) triples into a Split."""
    images, masks, names = [], [], []
    for name, image, mask in pairs:
        for r, c in tile_grid(*mask.shape, crop, limit):
            size = crop or mask.shape[0], crop or mask.shape[1]
            images.append(image[r:r + size[0], c:c + size[1]])
            masks.append(mask[r:r + size[0], c:c + size[1]])
            names.append(f"{name}@{r},{c}")
    if not images:
        raise DataError(f"the {label} split has no images")
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise DataError(f"the {label} split mixes image sizes {sorted(shapes)}: pass a crop size")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return Split(stacked, torch.from_numpy(np.stack(masks)), names)
