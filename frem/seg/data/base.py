"""What every data set becomes: uint8 image tiles and class-index masks per split."""

from __future__ import annotations

import sys

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch


class DataError(ValueError):
    """A data problem, with the file and how to fix it in the message."""


@dataclass
class Split:
    images: torch.Tensor  # (N, channels, H, W): uint8, or float32 for 16-bit and float data
    masks: torch.Tensor   # (N, H, W) uint8 class indices
    names: list[str]      # where each tile came from
    stats: torch.Tensor   # (N, channels, 2) float32: mean and std of the whole image each tile came from

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.masks.to(device), self.names, self.stats.to(device))


_ANNOUNCED: set = set()


@dataclass
class SegmentationData:
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    source: str           # the data set by name and checksum, never by a machine's path
    root: str = ""        # the folder it was read from (a run remembers it)
    checksum: str = ""    # what identifies the content wherever it lies
    split: dict | None = None  # how the splits were made where the data does not say (a held-out val)
    notice: str = ""           # what a training run says first about the data (which images validate)

    def announce(self) -> None:
        """Say ``notice`` on stderr, once a process (a search loads the data for every trial). Training says
        it; evaluation, which only checks the data is the run's, does not."""
        if self.notice and self.notice not in _ANNOUNCED:
            _ANNOUNCED.add(self.notice)
            print(self.notice, file=sys.stderr)

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def identity(self) -> dict:
        """What a run records about its data (checkpoints and metrics.json)."""
        identity = {"source": self.source, "root": self.root, "checksum": self.checksum}
        return {**identity, "split": self.split} if self.split else identity

    def differs_from(self, recorded: dict | None) -> bool:
        """Whether the data a run recorded (its checkpoint's ``data``) is other content than this;
        a side without a checksum (older runs, unknown data) proves nothing."""
        checksum = (recorded or {}).get("checksum")
        if checksum and self.checksum and checksum != self.checksum:
            return True
        return bool(checksum) and (recorded or {}).get("split") != self.split  # the same files, split otherwise


class Sample(NamedTuple):
    """One image of a split: its name, pixels (H, W, C), class indices (H, W), and what the file stored
    where frem reads it as something else (``Pages.stored``)."""
    name: str
    image: np.ndarray
    mask: np.ndarray
    stored: str = ""


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


def colour_name(channels: int) -> str:
    return "RGB" if channels == 3 else "greyscale"


def describe(image: np.ndarray, stored: str = "") -> str:
    depth = {np.dtype(np.uint8): "8-bit", np.dtype(np.uint16): "16-bit", np.dtype(np.float32): "32-bit float"}
    kind = f"{depth.get(image.dtype, str(image.dtype))} {colour_name(image.shape[-1])}"
    return f"{kind} (stored as {stored})" if stored else kind


def largest_crop(height: int, width: int, multiple: int = 32) -> int:
    """The largest tile a ``height`` x ``width`` image holds whose side is a multiple of ``multiple``."""
    return min(height, width) // multiple * multiple


def image_stats(image: np.ndarray) -> np.ndarray:
    """Per-channel mean and standard deviation of a whole (H, W, C) image: (C, 2) float32.

    The model sees each image standardised with its own statistics (nnU-Net's
    z-score for non-CT images; Cellpose and StarDist normalise per image too),
    so the same scene stored at another bit depth gives the same input.
    """
    # In blocks of rows, each block's mean and sum of squared deviations in float64 merged as they
    # come (Chan et al.): a 20k x 20k section never gets a float64 copy (8 bytes a pixel).
    channels = image.shape[-1]
    count, mean, m2 = 0, np.zeros(channels), np.zeros(channels)
    for _, rows in row_blocks(image):
        block = rows.reshape(-1, channels).astype(np.float64)
        n, block_mean = block.shape[0], block.mean(axis=0)
        block_m2 = ((block - block_mean) ** 2).sum(axis=0)
        delta, total = block_mean - mean, count + n
        mean, m2, count = mean + delta * n / total, m2 + block_m2 + delta ** 2 * count * n / total, total
    std = np.sqrt(m2 / count)
    return np.stack([mean, np.where(std > 0, std, 1.0)], axis=-1).astype(np.float32)


BLOCK_PIXELS = 1 << 20  # what a block of rows holds at most, so work in float stays bounded


def row_blocks(image: np.ndarray, pixels: int = BLOCK_PIXELS):
    """(first row, view) for ``image`` (H, W, ...) in blocks of whole rows, about ``pixels`` pixels each."""
    step = max(1, pixels // max(image.shape[1], 1))
    for top in range(0, image.shape[0], step):
        yield top, image[top:top + step]


def make_split(samples, crop, limit, label) -> Split:
    """Tile ``Sample``s (or (name, image HxWxC, mask HxW of class indices) triples) into a Split.

    8-bit images stay uint8 (the whole data set lives on the device); 16-bit
    and float images become float32, their values unchanged. Every tile keeps
    the statistics of the whole image it was cut from.
    """
    images, masks, names, stats = [], [], [], []
    first = None
    for name, image, mask, stored in (Sample(*sample) for sample in samples):
        if first is None:
            first = (name, image, stored)
        elif describe(image) != describe(first[1]):
            raise DataError(f"the {label} split mixes images: {name} is {describe(image, stored)} but {first[0]} is "
                            f"{describe(first[1], first[2])}; convert them to one kind")
        if crop is not None and crop > min(mask.shape):
            largest = largest_crop(*mask.shape)
            fix = (f"pass --crop {largest} or less (a multiple of 32)" if largest else
                   "the U-Net needs at least 32x32 pixels: leave the image out or enlarge it")
            raise DataError(f"--crop {crop} is larger than {name} ({mask.shape[1]}x{mask.shape[0]}): {fix}")
        whole = image_stats(image)
        for r, c in tile_grid(*mask.shape, crop, limit):
            size = crop or mask.shape[0], crop or mask.shape[1]
            images.append(image[r:r + size[0], c:c + size[1]])
            masks.append(mask[r:r + size[0], c:c + size[1]])
            names.append(f"{name}@{r},{c}")
            stats.append(whole)
    if not images:
        raise DataError(f"the {label} split has no images")
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise DataError(f"the {label} split mixes image sizes {sorted(shapes)}: pass a crop size")
    import torch  # here, not at the top: the command line reads this package's facts without torch
    stacked = np.stack(images)
    if stacked.dtype != np.uint8:
        stacked = stacked.astype(np.float32)
    return Split(torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous(),
                 torch.from_numpy(np.stack(masks).astype(np.uint8)), names, torch.from_numpy(np.stack(stats)))
