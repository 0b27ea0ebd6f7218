"""Segmenting new images with a trained run: label images and colour overlays.

Any size, in bounded memory: an image is cut into overlapping tiles (``TILE``
px, each read with a ``MARGIN`` of context that is then discarded), each tile
is standardised with the whole image's statistics (computed block by block,
as in training) and labelled, and the overlay is drawn block by block, so
nothing image-sized is ever held in float: beside the image itself, its
uint8 labels and its uint8 RGB overlay (benchmarks/test_memory.py measures
the peak). An image smaller than the network's stride is padded. A TIFF stack
gives a stack of labels, written page by page.
"""

from __future__ import annotations

import glob
from collections import Counter
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from torch.nn import functional as F

from frem.seg import checkpoint
from frem.seg.data.base import DataError, colour_name, image_stats, row_blocks
from frem.seg.data.images import display_range, display_window, normalize, read_pages
from frem.seg.distributed import resolve_device
from frem.seg.evaluate import autocast, model_from_checkpoint

# Colours follow the class, by its name in classes.txt (docs/segmentation.md, "Colours"): the names below
# get their colour wherever they stand; any other class takes the first colour of PALETTE no named class took,
# in class order. "background" stays uncoloured in overlays (dark in label images).
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
RED, GREEN, YELLOW, BLUE, ORANGE, PURPLE, CYAN = PALETTE[:7]
NAMED = {"membrane": RED, "boundary": RED, "cell boundary": RED, "edge": RED, "border": RED,
         "mitochondria": GREEN, "mitochondrion": GREEN, "synapse": YELLOW, "nucleus": BLUE, "nuclei": BLUE,
         "cell": ORANGE, "cytoplasm": PURPLE, "vesicle": CYAN}
BACKGROUND = (30, 30, 30)


def class_colours(classes) -> list:
    """The colour of each class by its name (None for background: uncoloured in an overlay)."""
    def key(name: str) -> str:
        name = str(name).strip().lower().replace("_", " ")
        return name if name in NAMED or not name.endswith("s") else name[:-1]  # membranes -> membrane
    named = [NAMED.get(key(name)) for name in classes]
    free = iter([colour for colour in PALETTE if colour not in named] + PALETTE * len(classes))
    return [None if key(name) == "background" else colour if colour is not None else next(free)
            for name, colour in zip(classes, named)]
MULTIPLE = 32  # the U-Net halves the resolution five times
TILE = 1024    # output pixels a forward pass; a multiple of MULTIPLE
MARGIN = 64    # context read around each tile and discarded


def _pad_to_multiple(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    pad = (0, -w % MULTIPLE, 0, -h % MULTIPLE)
    if not any(pad):
        return x
    # reflect needs more pixels than it pads; a tiny image repeats its edge instead
    mode = "reflect" if pad[1] < w and pad[3] < h else "replicate"
    return F.pad(x, pad, mode=mode)


@torch.no_grad()
def predict_image(model, image: np.ndarray, normalization: dict, device, tile: int = TILE,
                  margin: int = MARGIN) -> np.ndarray:
    """Class index per pixel for one (H, W, C) image, tile by tile (standardised with the whole image's
    statistics, as the training tiles were)."""
    stats = torch.from_numpy(image_stats(image))[None]
    h, w = image.shape[:2]
    labels = np.empty((h, w), dtype=np.uint8)
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            r0, c0 = max(top - margin, 0), max(left - margin, 0)
            r1, c1 = min(top + tile + margin, h), min(left + tile + margin, w)
            raw = torch.from_numpy(np.ascontiguousarray(image[r0:r1, c0:c1])).permute(2, 0, 1)[None]
            window = _pad_to_multiple(normalize(raw, normalization, stats)).to(device)
            with autocast(torch.device(device)):
                logits = model(window)
            keep = logits[0, :, top - r0:top - r0 + min(tile, h - top), left - c0:left - c0 + min(tile, w - left)]
            labels[top:top + tile, left:left + tile] = keep.argmax(0).byte().cpu().numpy()
    return labels


def palette_image(labels: np.ndarray, classes) -> Image.Image:
    """Class indices as a palette PNG: the values stay 0..K-1, a viewer shows the class colours."""
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels).tobytes())
    colours = [BACKGROUND if colour is None else colour for colour in class_colours(classes)]
    image.putpalette([value for colour in colours for value in colour])
    return image


def overlay(image: np.ndarray, labels: np.ndarray, classes, alpha: float = 0.45) -> np.ndarray:
    """The image (stretched to 8 bits by ``display_window``) with every class but background blended
    in its colour: (H, W, 3) uint8, drawn in blocks of rows."""
    window = display_window(image)
    named = class_colours(classes)
    colours = np.array([BACKGROUND if colour is None else colour for colour in named], np.float32)
    coloured = np.array([colour is not None for colour in named] + [False] * (256 - len(classes)))
    out = np.empty(image.shape[:2] + (3,), np.uint8)
    for top, rows in row_blocks(image):
        shown = display_range(rows, window).astype(np.float32)
        shown = np.repeat(shown, 3, axis=2) if shown.shape[2] == 1 else shown
        block = labels[top:top + rows.shape[0]]
        where = coloured[block]
        shown[where] = (1 - alpha) * shown[where] + alpha * colours[block[where]]
        out[top:top + rows.shape[0]] = shown.round().clip(0, 255)
    return out


def output_names(paths: list[Path]) -> list[str]:
    """A distinct output name per input: its stem, or parent_stem where stems repeat."""
    stems = Counter(p.stem for p in paths)
    names = [p.stem if stems[p.stem] == 1 or not p.parent.name else f"{p.parent.name}_{p.stem}" for p in paths]
    repeats, seen, unique = Counter(names), Counter(), []
    for name in names:
        seen[name] += 1
        unique.append(name if repeats[name] == 1 else f"{name}_{seen[name]}")
    return unique


def predict(checkpoint_path, images, out_dir, device="auto", tile: int = TILE) -> list[Path]:
    """Write ``<name>_labels`` (class indices) and ``<name>_overlay`` per image: a palette PNG
    (indices, shown in the class colours) for an image, multi-page greyscale TIFF for a stack."""
    device = resolve_device(device)
    state = checkpoint.load(checkpoint_path, hint="point --checkpoint at a run's best.pt")
    model = model_from_checkpoint(state, device)
    paths = [Path(p) for p in images]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    _clean_stale_parts(out_dir, names)
    written = []
    for path, name in zip(paths, names):
        pages = read_pages(path)  # one file at a time
        if pages[0].shape[-1] != state["in_channels"]:
            raise DataError(f"{path} is {colour_name(pages[0].shape[-1])}, but the model was trained on "
                            f"{colour_name(state['in_channels'])} images")
        # Each file is written at a temporary name and renamed when whole: an interrupted prediction (Ctrl-C,
        # a kill, a full disk) leaves earlier images' files whole and none of the image it was on half-written.
        if len(pages) == 1:
            targets = [out_dir / f"{name}_labels.png", out_dir / f"{name}_overlay.png"]
            labels = predict_image(model, pages[0], state["normalization"], device, tile)
            with checkpoint.atomic_path(targets[0]) as part:
                palette_image(labels, state["classes"]).save(part, format="PNG")
            with checkpoint.atomic_path(targets[1]) as part:
                Image.fromarray(overlay(pages[0], labels, state["classes"])).save(part, format="PNG")
        else:  # page by page: a stack's labels and overlays are never all in memory
            targets = [out_dir / f"{name}_labels.tif", out_dir / f"{name}_overlay.tif"]
            with checkpoint.atomic_path(targets[0]) as label_part, checkpoint.atomic_path(targets[1]) as overlay_part, \
                    tifffile.TiffWriter(label_part) as label_file, tifffile.TiffWriter(overlay_part) as overlay_file:
                for page in pages:
                    labels = predict_image(model, page, state["normalization"], device, tile)
                    label_file.write(labels, photometric="minisblack", contiguous=True)  # pages, not one RGB image
                    overlay_file.write(overlay(page, labels, state["classes"]), photometric="rgb", contiguous=True)
        written += targets
    return written


def _clean_stale_parts(out_dir: Path, names: list[str]) -> None:
    """Remove what a killed earlier prediction of these images left half-written (``.NAME_labels.png.*.tmp``)."""
    for name in names:
        for stale in out_dir.glob(f".{glob.escape(name)}_*.tmp"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
