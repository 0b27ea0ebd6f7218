"""The Drosophila VNC ssTEM stack (Gerhard et al. 2013), the FREM paper's second data set.

Every fact about it lives here: the four classes and how the merged label
values map to them, the split by section, where it is downloaded from, and
the checksums (``drosophila_sha256sums.txt``, from the source's SHA256SUMS).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from frem.data.base import DataError, SegmentationData, make_split

CLASSES = ("membrane", "mitochondria", "synapse", "background")
# Merged label value -> class index (the data set's README).
LABEL_TO_CLASS = {0: 0, 32: 0, 64: 0, 96: 0, 128: 0,  # membrane at 4 angles + junctions
                  191: 1,                            # mitochondria
                  223: 2,                            # synapse
                  159: 3, 255: 3}                    # glia/extracellular + intracellular
# By section, never by crop: 12 / 3 / 5 sections = 192 / 48 / 80 tiles of 256,
# the split of the Hotta lab's public code for this data set.
SPLIT = {"train": tuple(range(0, 12)), "val": tuple(range(12, 15)), "test": tuple(range(15, 20))}
SECTION_SIZE = 1024
DEFAULT_CROP = 256

SOURCE_REPOSITORY = "unidesigner/groundtruth-drosophila-vnc"
SOURCE_COMMIT = "4a5f051"
DOWNLOAD_URL = f"https://github.com/{SOURCE_REPOSITORY}/raw/{SOURCE_COMMIT}"
CITATION = ("Gerhard, Funke, Martel, Cardona, Fetter. Segmented anisotropic ssTEM dataset of "
            "neural tissue. figshare, 2013. doi:10.6084/m9.figshare.856713 (CC BY-NC-SA 3.0)")
_CHECKSUMS = Path(__file__).with_name("drosophila_sha256sums.txt")
HOW_TO_GET = ("get it with `frem data download drosophila`, or point --data / FREM_DATA "
              "at a copy")


def checksums() -> dict[str, str]:
    """Relative path -> SHA-256 for every file of the data set."""
    lines = _CHECKSUMS.read_text().splitlines()
    return {path: digest for digest, path in (line.split(maxsplit=1) for line in lines if line)}


def default_root() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "frem" / "drosophila-vnc"


def resolve_root(root=None) -> Path:
    """--data, else $FREM_DATA, else the download cache."""
    if root is None:
        root = os.environ.get("FREM_DATA") or default_root()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"no Drosophila data at {root}: {HOW_TO_GET}")
    return root


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def raw_path(section: int, stack: int = 1) -> str:
    return f"stack{stack}/raw/{section:02d}.tif"


def label_path(section: int) -> str:
    return f"stack1/labels/labels{section:08d}.png"


def _verified(root: Path, relative: str, sums: dict[str, str]) -> Path:
    path = root / relative
    if not path.is_file():
        raise DataError(f"missing file {path}: {HOW_TO_GET}")
    if sha256(path) != sums[relative]:
        raise DataError(f"corrupt file {path} (its SHA-256 does not match the data set's): "
                        f"delete it and {HOW_TO_GET}")
    return path


def labels_to_classes(labels: np.ndarray, path) -> np.ndarray:
    lut = np.full(256, 255, dtype=np.uint8)
    for value, cls in LABEL_TO_CLASS.items():
        lut[value] = cls
    classes = lut[labels]
    if (classes == 255).any():
        bad = sorted(set(np.unique(labels[classes == 255]).tolist()))
        raise DataError(f"{path} holds label values {bad} that are not in the data set's README")
    return classes


def load_section(root: Path, section: int, sums: dict[str, str]):
    image = np.array(Image.open(_verified(root, raw_path(section), sums)))
    label_file = _verified(root, label_path(section), sums)
    mask = labels_to_classes(np.array(Image.open(label_file)), label_file)
    return f"section{section:02d}", image[..., None], mask


def load_drosophila(root=None, *, crop: int | None = DEFAULT_CROP, tiles_per_section=None,
                    sections: dict | None = None) -> SegmentationData:
    """The labelled stack as 16 tiles of 256 per section, split by SPLIT.

    ``sections`` overrides the split (``--quick`` takes a subset of it);
    ``tiles_per_section`` keeps that many tiles spread over each section.
    """
    root = resolve_root(root)
    sums = checksums()
    sections = sections or SPLIT
    splits = {name: make_split([load_section(root, s, sums) for s in sections[name]],
                               crop, tiles_per_section, name)
              for name in ("train", "val", "test")}
    return SegmentationData(CLASSES, source=f"drosophila-vnc at {root}", **splits)


def download(dest=None, base_url: str | None = None, progress=print) -> Path:
    """Fetch every file of the data set into ``dest``, verified; resumable.

    Files already present with the right checksum are kept, so an interrupted
    download picks up where it stopped. Each file is written to a temporary
    name and renamed only once its checksum matches.
    """
    dest = Path(dest).expanduser() if dest is not None else default_root()
    base_url = (base_url or os.environ.get("FREM_DROSOPHILA_URL") or DOWNLOAD_URL).rstrip("/")
    sums = checksums()
    for i, (relative, digest) in enumerate(sorted(sums.items()), 1):
        target = dest / relative
        if target.is_file() and sha256(target) == digest:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"{base_url}/{relative}"
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, tmp)
            except OSError as error:
                os.unlink(tmp.name)
                raise DataError(f"could not download {url}: {error}") from None
        if sha256(Path(tmp.name)) != digest:
            os.unlink(tmp.name)
            raise DataError(f"downloaded {url} does not match its SHA-256; try again later")
        os.replace(tmp.name, target)
        progress(f"[{i}/{len(sums)}] {relative}")
    (dest / "SHA256SUMS").write_text(_CHECKSUMS.read_text())
    (dest / "CITATION.txt").write_text(CITATION + "\n")
    return dest
