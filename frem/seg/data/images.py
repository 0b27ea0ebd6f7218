"""Reading the images microscopists have: 8/16-bit and float TIFF stacks, PNG, JPEG.

TIFF goes through tifffile (16-bit and 32-bit float kept as they are,
multi-page stacks page by page), everything else through Pillow. Every read
error names the file. Intensities are never squeezed into 8 bits: the model
sees each image standardised with its own mean and standard deviation
(``fit_normalization``; the training split's instead for calibrated units),
the choice stored in each checkpoint and reused by ``frem predict``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from frem.seg.data.base import DataError

TIFF_SUFFIXES = {".tif", ".tiff"}
IMAGE_SUFFIXES = TIFF_SUFFIXES | {".png", ".jpg", ".jpeg", ".bmp"}
INTENSITY_DTYPES = (np.uint8, np.uint16, np.float32)


def read_pages(path, *, mask: bool = False) -> list[np.ndarray]:
    """The pages of an image file, each (H, W, C) for images or (H, W) for masks.

    A 2-D image is one page; a TIFF stack (several pages, or Z/T/Q/I axes) is
    one page per plane. Images keep 8-bit or 16-bit integers, or become
    float32; masks must hold integer class indices.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no image at {path}")
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                array, axes = series.asarray(), series.axes
        else:
            with Image.open(path) as image:
                if not mask and image.mode not in ("L", "RGB", "I;16", "I;16B", "I", "F"):
                    image = image.convert("RGB" if image.mode in ("RGBA", "P", "CMYK") else "L")  # LA: grey
                array = np.array(image)
            axes = "YXS" if array.ndim == 3 else "YX"
    except DataError:
        raise
    except Exception as error:  # truncated, not an image, an unknown TIFF layout...
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read {path}: {reason}") from None
    if "S" not in axes:
        array = array[..., None]  # one sample (channel) per pixel
    elif axes.index("S") != len(axes) - 1:
        array = np.moveaxis(array, axes.index("S"), -1)
    if array.ndim < 3:
        raise DataError(f"{path} is not an image (shape {array.shape})")
    pages = array.reshape((-1,) + array.shape[-3:])
    if mask:
        if pages.shape[-1] != 1:
            raise DataError(f"{path} must be a single-channel image of class indices, "
                            f"it has {pages.shape[-1]} channels")
        if not np.issubdtype(pages.dtype, np.integer) and pages.dtype != np.bool_:
            raise DataError(f"{path} holds {pages.dtype} values; a mask holds integer class indices")
        return [page[..., 0].astype(np.int64) for page in pages]
    if pages.shape[-1] not in (1, 3):
        raise DataError(f"{path} has {pages.shape[-1]} channels per pixel; frem reads greyscale or RGB")
    return [_intensity(page, path) for page in pages]


def _intensity(page: np.ndarray, path: Path) -> np.ndarray:
    if page.dtype == np.bool_:
        return page.astype(np.uint8)
    if page.dtype in INTENSITY_DTYPES:
        return page
    if np.issubdtype(page.dtype, np.floating):
        return page.astype(np.float32)
    if np.issubdtype(page.dtype, np.integer) and page.min() >= 0 and page.max() <= np.iinfo(np.uint16).max:
        return page.astype(np.uint16)
    raise DataError(f"{path} holds {page.dtype} values that do not fit 16 bits; convert it to "
                    "uint16 or float32")


NORMALIZATIONS = ("image", "dataset")


def fit_normalization(split, mode: str = "image") -> dict:
    """How the model sees intensities, stored in every checkpoint.

    ``image`` (the default): each image standardised with its own per-channel
    mean and std, whatever its bit depth or gain. ``dataset``: the training
    split's mean and std in its own units, for calibrated intensities whose
    absolute value means something.
    """
    if mode == "image":
        return {"mode": "image"}
    if mode != "dataset":
        raise ValueError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")
    values = split.images.double()
    std = float(values.std())
    return {"mode": "dataset", "units": "raw", "mean": float(values.mean()), "std": std if std > 0 else 1.0}


def normalize(images: torch.Tensor, normalization: dict, stats: torch.Tensor | None = None) -> torch.Tensor:
    """Raw intensities -> standardised float32.

    ``stats`` (N, C, 2): each image's own mean and std, for ``mode="image"``.
    Checkpoints from before per-image normalisation hold the training split's
    statistics (in raw units, or older still of intensities / 255).
    """
    x = images.float()
    if normalization.get("mode") == "image":
        if stats is None:
            raise ValueError("per-image normalisation needs each image's statistics")
        stats = stats.to(x.device)
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        return (x - stats[..., 0].reshape(shape)) / stats[..., 1].reshape(shape)
    if normalization.get("units") != "raw":
        x = x / 255.0
    return (x - normalization["mean"]) / normalization["std"]


def display_range(image: np.ndarray) -> np.ndarray:
    """8-bit for overlays: the 1st-99.8th percentile range stretched over 0-255."""
    if image.dtype == np.uint8:
        return image
    low, high = np.percentile(image, (1.0, 99.8))
    scaled = (image.astype(np.float64) - low) / max(high - low, 1e-12)
    return (scaled.clip(0, 1) * 255).round().astype(np.uint8)
