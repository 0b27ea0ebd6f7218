"""Segmentation data sets as tensors: the Drosophila ssTEM stack or a folder."""

from frem.seg.data.base import DataError, SegmentationData, Split, tile_grid
from frem.seg.data.drosophila import load_drosophila
from frem.seg.data.folder import load_folder


def load_dataset(name: str, root=None, **options) -> SegmentationData:
    """``name``: ``"drosophila"`` or ``"folder"``; options go to the loader."""
    if name == "drosophila":
        return load_drosophila(root, **options)
    if name == "folder":
        if root is None:
            raise DataError("--dataset folder needs --data DIR (a folder with train/, val/, test/)")
        return load_folder(root, **options)
    raise DataError(f"unknown dataset {name!r}: use 'drosophila' or 'folder'")


__all__ = ["DataError", "SegmentationData", "Split", "load_dataset", "load_drosophila",
           "load_folder", "tile_grid"]
