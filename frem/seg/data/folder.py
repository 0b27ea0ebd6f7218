"""Your own images: ``train/``, ``val/``, ``test/``, each with ``images/`` and ``masks/``.

Masks share the image's file name (TIFF, PNG, ...), hold class indices
0..K-1, and ``classes.txt`` beside the splits names the K classes, one a
line. Images are 8-bit, 16-bit or float, greyscale or RGB, all of one kind; a
multi-page TIFF stack (with a stack of masks) gives one image per page.

Without ``val/``, a seeded share of the training images is held out for
validation, by file (a stack's pages stay together), never by crop: the
field's tools split the same way (nnU-Net's folds are by case), and crops
of one image on both sides would score the model on what it trained on.
"""

from __future__ import annotations

import hashlib
import random
from itertools import islice
from pathlib import Path

import numpy as np

from frem.seg.data.base import DataError, Sample, SegmentationData, make_split
from frem.seg.data.images import IMAGE_SUFFIXES, read_pages


def read_classes(root: Path) -> tuple[str, ...]:
    path = root / "classes.txt"
    if not path.is_file():
        raise DataError(f"missing {path}: write the class names there, one a line, in index order")
    classes = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(classes) < 2:
        raise DataError(f"{path} names {len(classes)} class(es); segmentation needs at least 2")
    return classes


DEFAULT_VAL_FRACTION = 0.2  # without val/: one in five training images, as one fold of nnU-Net's five


def looks_like_folder(root) -> bool:
    """Whether ``root`` is laid out as a folder data set (``classes.txt`` and ``train/``)."""
    root = Path(root).expanduser()
    return (root / "classes.txt").is_file() and (root / "train").is_dir()


def _image_files(root: Path, split: str) -> list[Path]:
    images_dir = root / split / "images"
    images = sorted(p for p in images_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)  # none if no folder
    if not images:
        raise DataError(f"no images in {images_dir} (expected {split}/images/*.png etc.)")
    return images


def _pairs(root: Path, split: str, num_classes: int, images: list[Path] | None = None):
    masks_dir = root / split / "masks"
    images = _image_files(root, split) if images is None else images
    masks = {p.stem: p for p in masks_dir.glob("*")}
    for image_path in images:
        mask_path = masks.get(image_path.stem)
        if mask_path is None:
            raise DataError(f"{image_path} has no mask: expected {masks_dir / image_path.stem}.png")
        pages, mask_pages = read_pages(image_path), read_pages(mask_path, mask=True)
        if len(pages) != len(mask_pages):
            raise DataError(f"{image_path} has {len(pages)} page(s) but {mask_path} has {len(mask_pages)}")
        for k, (image, mask) in enumerate(zip(pages, mask_pages)):
            page = f"[page {k}]" if len(pages) > 1 else ""  # a stack's errors and tiles name the page
            if mask.shape != image.shape[:2]:
                raise DataError(f"{mask_path}{page} is {mask.shape[1]}x{mask.shape[0]} but "
                                f"{image_path}{page} is {image.shape[1]}x{image.shape[0]}")
            if mask.min() < 0 or mask.max() >= num_classes:
                raise DataError(_bad_mask(f"{mask_path}{page}", mask, num_classes))
            yield Sample(f"{split}/{image_path.name}{page}", image, mask, pages.stored)


def _bad_mask(where: str, mask, num_classes: int) -> str:
    bad = int(mask.max()) if mask.max() >= num_classes else int(mask.min())
    message = f"{where} holds class index {bad}, but classes.txt names {num_classes} classes (0..{num_classes - 1})"
    values = np.unique(mask)
    if len(values) <= num_classes and values.max() == 255 and values.min() >= 0:
        # A mask drawn for display (0/255 foreground, or grey levels a class each), not indices.
        shown = ", ".join(map(str, values.tolist()))
        if set(values.tolist()) <= {0, 255}:
            return (f"{message}. It looks like a 0/255 binary mask: store class indices 0 and 1 instead "
                    "(numpy: mask // 255), with classes.txt naming the class of 0 first")
        return (f"{message}. Its values ({shown}) look like one grey level a class: store each as its class's "
                "index 0..K-1 (in the order of classes.txt)")
    return message


def held_out(files: list[Path], fraction: float, seed: int) -> list[Path]:
    """The training files validated on instead: ``round(fraction * n)`` of them (at least one), drawn by a
    generator seeded with ``seed`` alone from the sorted names, so the same folder splits the same way."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction must lie between 0 and 1, got {fraction}")
    count = max(1, round(fraction * len(files)))
    if count >= len(files):
        raise DataError(f"{files[0].parent} holds {len(files)} training image(s), too few to hold "
                        f"{count} out for validation and train on the rest (by image, never by crop): add a "
                        "val/ folder (val/images, val/masks) or more training images")
    return sorted(random.Random(f"frem-val:{seed}").sample(sorted(files), count))


def load_folder(root, *, crop: int | None = None, tiles_per_section=None, images: dict | None = None,
                val_fraction: float | None = None, split_seed: int = 0) -> SegmentationData:
    """Load a folder data set; ``crop`` tiles every image into non-overlapping crops.

    Without ``val/``, ``val_fraction`` of the training files (default 0.2) validate instead,
    drawn with ``split_seed``; the data's identity records which. ``images`` caps each split at its first
    so many images (a stack's pages count one each): ``--quick``'s small run on any folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    classes = read_classes(root)
    files = {name: _image_files(root, name) for name in ("train", "test")}
    split = None
    if (root / "val").exists():
        if val_fraction is not None:
            raise DataError(f"--val-fraction holds out training images only for a folder without val/, and "
                            f"{root / 'val'} exists: leave out --val-fraction, or remove val/")
        files["val"] = _image_files(root, "val")
    else:
        fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
        chosen = held_out(files["train"], fraction, split_seed)
        files["train"] = [p for p in files["train"] if p not in chosen]
        files["val"] = chosen
        split = {"val": f"held out from train/ by image (fraction {fraction:g}, seed {split_seed})",
                 "val_images": [p.name for p in chosen], "fraction": fraction, "seed": split_seed}
    splits = {name: make_split(list(islice(_pairs(root, "train" if split and name == "val" else name, len(classes),
                                                  files[name]), (images or {}).get(name))), crop, tiles_per_section, name)
              for name in ("train", "val", "test")}
    kinds = {(split.images.shape[1], split.images.dtype) for split in splits.values()}
    if len(kinds) > 1:
        raise DataError(f"{root} mixes kinds of images across its splits (greyscale/colour, 8-bit/"
                        "16-bit/float); convert them to one kind")
    count, digest = content_checksum(root)
    notice = (f"frem: {root} has no val/: validating on {len(split['val_images'])} of its "
              f"{len(split['val_images']) + len(files['train'])} training images, {split['val']}: "
              f"{', '.join(split['val_images'])}" if split else "")
    return SegmentationData(classes, source=f"folder '{root.name}' ({count} files, SHA-256 of contents {digest})",
                            root=str(root.resolve()), checksum=digest, split=split, notice=notice, **splits)


def content_checksum(root: Path) -> tuple[int, str]:
    """(files, SHA-256 of their relative paths and contents): the folder by content, wherever it lies."""
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return len(files), digest.hexdigest()[:12]
