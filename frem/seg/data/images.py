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
from typing import TYPE_CHECKING

import numpy as np
import tifffile
from PIL import Image

from frem.seg.data.base import DataError, row_blocks

if TYPE_CHECKING:
    import torch

TIFF_SUFFIXES = {".tif", ".tiff"}
# Images may be JPEG (lossy compression blurs intensities a little); masks may not (below).
IMAGE_SUFFIXES = TIFF_SUFFIXES | {".png", ".jpg", ".jpeg", ".bmp"}
MASK_FORMATS = "PNG, TIFF (uncompressed or lossless: LZW, deflate, zstd ...) or BMP"
# Pillow formats and TIFF compressions that may be lossy. A mask holds labels: lossy compression
# rewrites pixels near every edge, many into classes never drawn (4.4% of one JPEG'd mask).
LOSSY_FORMATS = {"JPEG", "MPO", "JPEG2000", "WEBP", "JXL", "AVIF", "HEIF"}
LOSSY_TIFF_COMPRESSIONS = ("JPEG", "WEBP", "JXL", "LERC")  # in the names of tifffile's COMPRESSION values
INTENSITY_DTYPES = (np.uint8, np.uint16, np.float32)


class Pages(list):
    """The pages of one file; ``stored`` names what the file held where frem read it as something else
    (``"RGBA, its alpha opaque"``)."""
    stored = ""


def read_pages(path, *, mask: bool = False) -> Pages:
    """The pages of an image file, each (H, W, C) for images or (H, W) for masks.

    A 2-D image is one page; a TIFF stack (several pages, or Z/T/Q/I axes) is
    one page per plane. Images keep 8-bit or 16-bit integers, or become
    float32; masks must hold integer class indices, in a lossless format.
    An alpha channel is dropped only where it is opaque everywhere (it then
    holds nothing); a transparent one is refused, since dropping it changes
    what the image shows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no image at {path}")
    stored = ""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                first = series.keyframe  # a TiffPage: its tags stand for every page of the series
                compression = getattr(first.compression, "name", str(first.compression))
                if mask and any(kind in compression for kind in LOSSY_TIFF_COMPRESSIONS):
                    raise _lossy_mask(path, f"a TIFF with {compression} compression")
                array, axes = series.asarray(), series.axes
                extra = first.extrasamples
        else:
            with Image.open(path) as image:
                if mask and image.format in LOSSY_FORMATS:
                    raise _lossy_mask(path, f"a {image.format} file")
                if mask or image.mode in ("L", "RGB", "I;16", "I;16B", "I", "F"):
                    array = np.array(image)
                else:
                    array, stored = _as_grey_or_rgb(image, path)
            axes, extra = ("YXS" if array.ndim == 3 else "YX"), ()
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
    if pages.shape[-1] in (2, 4) and len(extra) == 1:  # a TIFF with an alpha sample (RGBA, grey + alpha)
        pages, stored = _drop_opaque_alpha(pages, path, "RGBA" if pages.shape[-1] == 4 else "greyscale with alpha")
    if pages.shape[-1] not in (1, 3):
        raise DataError(f"{path} has {pages.shape[-1]} channels per pixel; frem reads greyscale or RGB")
    result = Pages(_intensity(page, path) for page in pages)
    result.stored = stored
    return result


def _lossy_mask(path: Path, kind: str) -> DataError:
    return DataError(f"{path} is {kind}, a lossy format: masks are class labels, and lossy compression "
                     f"rewrites pixels near every edge, some into classes never drawn. Save the masks as {MASK_FORMATS}")


def _as_grey_or_rgb(image: Image.Image, path: Path):
    """A Pillow image of another mode as an L or RGB array, and what it was stored as (or "")."""
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        mode, kind = ("LA", "greyscale with alpha") if image.mode in ("LA", "La") else ("RGBA", "RGBA")
        pages, stored = _drop_opaque_alpha(np.array(image.convert(mode))[None], path, kind)
        return pages[0], stored
    return np.array(image.convert("RGB" if image.mode in ("P", "CMYK", "YCbCr", "HSV", "LAB") else "L")), ""


def _drop_opaque_alpha(pages: np.ndarray, path: Path, kind: str):
    """``pages`` (..., C) without their last (alpha) channel, which must be opaque everywhere."""
    alpha = pages[..., -1]
    opaque = np.iinfo(alpha.dtype).max if np.issubdtype(alpha.dtype, np.integer) else 1.0
    if not (alpha == opaque).all():
        share = float((alpha != opaque).mean())
        raise DataError(f"{path} is {kind} and {share:.1%} of its pixels are not opaque: dropping the alpha channel "
                        "would change what the image shows. Save it without alpha (flattened onto the background "
                        "you mean) as greyscale or RGB")
    return pages[..., :-1], f"{kind}, its alpha opaque"


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


DISPLAY_PERCENTILES = (1.0, 99.8)


def display_window(image: np.ndarray) -> tuple[float, float] | None:
    """The intensities shown as 0 and 255 in overlays: the 1st and 99.8th percentiles (as
    ``np.percentile``'s linear method gives them), ``None`` for 8-bit images, which are shown as they are.

    16-bit images are counted in a histogram (exact, no copy); float images are partitioned in a
    copy of their own type, never widened to float64.
    """
    if image.dtype == np.uint8:
        return None
    n = image.size
    ranks = [q / 100 * (n - 1) for q in DISPLAY_PERCENTILES]
    needed = sorted({k for r in ranks for k in (int(np.floor(r)), int(np.ceil(r)))})
    if image.dtype == np.uint16:
        counts = np.zeros(1 << 16, np.int64)
        for _, rows in row_blocks(image):
            counts += np.bincount(rows.ravel(), minlength=1 << 16)
        at = dict(zip(needed, np.searchsorted(np.cumsum(counts), np.array(needed) + 1).astype(np.float64)))
    else:
        flat = image.flatten()  # a copy in the image's own dtype: 4 bytes a pixel for float32
        flat.partition(needed)
        at = {k: float(flat[k]) for k in needed}
        del flat
    low, high = (at[int(np.floor(r))] + (r - np.floor(r)) * (at[int(np.ceil(r))] - at[int(np.floor(r))])
                 for r in ranks)
    return low, high


def display_range(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """8-bit for overlays: ``window`` (by default ``display_window(image)``) stretched over 0-255,
    block by block (a tile of a larger image takes the whole image's window)."""
    window = display_window(image) if window is None else window
    if window is None:
        return image
    low, high = window
    shown = np.empty(image.shape, np.uint8)
    for top, rows in row_blocks(image):
        scaled = (rows.astype(np.float64) - low) / max(high - low, 1e-12)
        shown[top:top + rows.shape[0]] = (scaled.clip(0, 1) * 255).round()
    return shown
