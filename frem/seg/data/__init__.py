"""Segmentation data sets as tensors: the Drosophila ssTEM stack or a folder."""

from frem.seg.data.base import DataError, SegmentationData, Split, tile_grid
from frem.seg.data.drosophila import load_drosophila
from frem.seg.data.folder import load_folder, looks_like_folder


DATASETS = ("drosophila", "folder")


def detect_dataset(root) -> str:
    """The data set a ``--data`` folder holds: ``"folder"`` where it is laid out as one, else ``"drosophila"``."""
    return "folder" if root is not None and looks_like_folder(root) else "drosophila"


def load_dataset(name: str, root=None, *, val_fraction: float | None = None, split_seed: int = 0,
                 **options) -> SegmentationData:
    """``name``: ``"drosophila"`` or ``"folder"``; options go to the loader. ``val_fraction`` and
    ``split_seed`` hold out validation images of a folder without ``val/``."""
    if name == "drosophila":
        if val_fraction is not None:
            raise DataError("--val-fraction is for a folder of your own without val/; the Drosophila data's "
                            "split is fixed (sections 0-11 train, 12-14 validation, 15-19 test)")
        options.pop("images", None)  # its --quick subset is by section
        return load_drosophila(root, **options)
    if name == "folder":
        if root is None:
            raise DataError("--dataset folder needs --data DIR (a folder with train/, val/, test/)")
        options.pop("sections", None)  # a folder's split is its sub-folders
        return load_folder(root, val_fraction=val_fraction, split_seed=split_seed, **options)
    raise DataError(f"unknown dataset {name!r}: use 'drosophila' or 'folder'")


__all__ = ["DATASETS", "DataError", "SegmentationData", "Split", "detect_dataset", "load_dataset",
           "load_drosophila", "load_folder", "looks_like_folder", "tile_grid"]
