"""Your own images: ``train/``, ``val/``, ``test/``, each with ``images/`` and ``masks/``.

Masks share the image's file name (TIFF, PNG, ...), hold class indices
0..K-1, and ``classes.txt`` beside the splits names the K classes, one a
line. Images are 8-bit, 16-bit or float, greyscale or RGB, all of one kind; a
multi-page TIFF stack (with a stack of masks) gives one image per page.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from frem.seg.data.base import DataError, SegmentationData, make_split
from frem.seg.data.images import IMAGE_SUFFIXES, read_pages


def read_classes(root: Path) -> tuple[str, ...]:
    path = root / "classes.txt"
    if not path.is_file():
        raise DataError(f"missing {path}: write the class names there, one a line, in index order")
    classes = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(classes) < 2:
        raise DataError(f"{path} names {len(classes)} class(es); segmentation needs at least 2")
    return classes


def _pairs(root: Path, split: str, num_classes: int):
    images_dir, masks_dir = root / split / "images", root / split / "masks"
    images = sorted(p for p in images_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)  # none if no folder
    if not images:
        raise DataError(f"no images in {images_dir} (expected {split}/images/*.png etc.)")
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
                bad = int(mask.max()) if mask.max() >= num_classes else int(mask.min())
                raise DataError(f"{mask_path}{page} holds class index {bad}, but classes.txt "
                                f"names {num_classes} classes (0..{num_classes - 1})")
            yield f"{split}/{image_path.name}{page}", image, mask


def load_folder(root, *, crop: int | None = None, tiles_per_section=None,
                sections=None) -> SegmentationData:
    """Load a folder data set; ``crop`` tiles every image into non-overlapping crops."""
    del sections  # a folder's split is its sub-folders
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    classes = read_classes(root)
    splits = {name: make_split(list(_pairs(root, name, len(classes))), crop, tiles_per_section, name)
              for name in ("train", "val", "test")}
    kinds = {(split.images.shape[1], split.images.dtype) for split in splits.values()}
    if len(kinds) > 1:
        raise DataError(f"{root} mixes kinds of images across its splits (greyscale/colour, 8-bit/"
                        "16-bit/float); convert them to one kind")
    files, digest = content_checksum(root)
    return SegmentationData(classes, source=f"folder '{root.name}' ({files} files, SHA-256 of contents {digest})",
                            root=str(root.resolve()), checksum=digest, **splits)


def content_checksum(root: Path) -> tuple[int, str]:
    """(files, SHA-256 of their relative paths and contents): the folder by content, wherever it lies."""
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return len(files), digest.hexdigest()[:12]
