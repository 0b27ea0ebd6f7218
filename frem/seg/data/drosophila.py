"""The Drosophila VNC ssTEM stack (Gerhard et al. 2013), the FREM paper's second data set.

Every fact about it lives here: the four classes and how the merged label
values map to them, the split by section, where it is downloaded from, and
the checksums (``drosophila_sha256sums.txt``, from the source's SHA256SUMS).

An *excerpt* (``cut_excerpt``) is a few sections cropped to one window, in
the same layout, with its own SHA256SUMS and an ``excerpt.json`` saying what
it was cut from: frem's tests ship one (``tests/data/drosophila-excerpt``) so
that they run on real data on any machine. It loads like the whole data set
and always names itself an excerpt, with a checksum of its own, so nothing
measured on it passes for the data set's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from frem.seg.data.base import DataError, SegmentationData, make_split
from frem.seg.data.folder import looks_like_folder
from frem.seg.data.images import read_pages

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
LICENSE = "CC BY-NC-SA 3.0"
CITATION = ("Gerhard, Funke, Martel, Cardona, Fetter. Segmented anisotropic ssTEM dataset of "
            f"neural tissue. figshare, 2013. doi:10.6084/m9.figshare.856713 ({LICENSE})")
_CHECKSUMS = Path(__file__).with_name("drosophila_sha256sums.txt")
HOW_TO_GET = ("get it with `frem data download drosophila`, or point --data / FREM_DATA "
              "at a copy")
EXCERPT = "excerpt.json"  # beside an excerpt's own SHA256SUMS


def _checksum_file(root=None) -> Path:
    """The checksum list a folder is verified against: an excerpt's own, else the data set's."""
    if root is not None and (Path(root) / EXCERPT).is_file():
        return Path(root) / "SHA256SUMS"
    return _CHECKSUMS


def checksums(root=None) -> dict[str, str]:
    """Relative path -> SHA-256 for every file of the data set (of the excerpt at ``root``)."""
    lines = _checksum_file(root).read_text().splitlines()
    return {path: digest for digest, path in (line.split(maxsplit=1) for line in lines if line)}


def default_root() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "frem" / "drosophila-vnc"


def resolve_root(root=None, fetch_missing: bool = True) -> Path:
    """--data, else $FREM_DATA, else the download cache, filled on first use.

    A folder the user named must exist: frem never downloads into it. The
    cache is frem's own, so a missing or incomplete one is downloaded.
    """
    named = root if root is not None else os.environ.get("FREM_DATA") or None
    if named is not None:
        named = Path(named).expanduser()
        if not named.is_dir():
            raise DataError(f"no Drosophila data at {named}: {HOW_TO_GET}")
        if looks_like_folder(named) and not (named / "stack1").exists():
            raise DataError(f"{named} holds a folder data set of your own (classes.txt, train/), not the "
                            "Drosophila stack: pass --dataset folder")
        return named
    root = default_root()
    if fetch_missing and not all((root / relative).is_file() for relative in checksums()):
        print(f"The Drosophila data set is not in {root} yet: downloading it once from "
              f"{DOWNLOAD_URL} ({LICENSE}; cite Gerhard et al. 2013).", file=sys.stderr)
        download(root)
    if not root.is_dir():
        raise DataError(f"no Drosophila data at {root}: {HOW_TO_GET}")
    return root


def checksum(root=None) -> str:
    """The data set's identity: the SHA-256 of its checksum list (every file is verified against it)."""
    return hashlib.sha256(_checksum_file(root).read_bytes()).hexdigest()[:12]


def source_name(root=None) -> str:
    """The data set by name and checksum list, never by a machine's path."""
    if _checksum_file(root) == _CHECKSUMS:
        return (f"Drosophila VNC ssTEM ({SOURCE_REPOSITORY}@{SOURCE_COMMIT}; files verified against SHA256SUMS "
                f"{checksum()})")
    cut = json.loads((Path(root) / EXCERPT).read_text())
    r, c, h, w = cut["box"]
    return (f"an excerpt of the Drosophila VNC ssTEM data set ({SOURCE_REPOSITORY}@{SOURCE_COMMIT}, SHA256SUMS "
            f"{checksum()}): sections {cut['sections']} cropped to {h}x{w} at ({r}, {c}); files verified "
            f"against its own SHA256SUMS {checksum(root)}")


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
    if relative not in sums:  # an excerpt: a section it was not cut from
        raise DataError(f"{root} is an excerpt of the Drosophila data without {relative} "
                        f"(it holds sections {json.loads((root / EXCERPT).read_text())['sections']}): choose "
                        "among those, or point --data / FREM_DATA at the whole data set")
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
    (image,) = read_pages(_verified(root, raw_path(section), sums))
    label_file = _verified(root, label_path(section), sums)
    (labels,) = read_pages(label_file, mask=True)
    return f"section{section:02d}", image, labels_to_classes(labels.astype(np.uint8), label_file)


def load_drosophila(root=None, *, crop: int | None = DEFAULT_CROP, tiles_per_section=None,
                    sections: dict | None = None) -> SegmentationData:
    """The labelled stack as 16 tiles of 256 per section, split by SPLIT.

    ``sections`` overrides the split (``--quick`` takes a subset of it);
    ``tiles_per_section`` keeps that many tiles spread over each section.
    """
    root = resolve_root(root)
    sums = checksums(root)
    sections = sections or SPLIT
    splits = {name: make_split([load_section(root, s, sums) for s in sections[name]],
                               crop, tiles_per_section, name)
              for name in ("train", "val", "test")}
    return SegmentationData(CLASSES, source=source_name(root), root=str(root.resolve()), checksum=checksum(root),
                            **splits)


def cut_excerpt(root, dest, sections, box, unlabelled=(0,)) -> Path:
    """Crop ``sections`` of the whole data set at ``root`` (verified) and ``unlabelled`` sections of its
    second stack to ``box`` = (row, column, height, width), in the data set's layout, into ``dest``, with
    its own SHA256SUMS, ``excerpt.json`` and a README carrying the license and the citation."""
    import tifffile
    from PIL import Image

    root, dest = Path(root), Path(dest)
    sums = checksums()
    r, c, h, w = box
    written = []
    for section in sections:
        (image,) = read_pages(_verified(root, raw_path(section), sums))
        (labels,) = read_pages(_verified(root, label_path(section), sums), mask=True)
        written += [_write(dest, raw_path(section), lambda p: tifffile.imwrite(p, image[r:r + h, c:c + w, 0])),
                    _write(dest, label_path(section),
                           lambda p: Image.fromarray(labels[r:r + h, c:c + w].astype(np.uint8)).save(p))]
    for section in unlabelled:
        (image,) = read_pages(_verified(root, raw_path(section, stack=2), sums))
        written.append(_write(dest, raw_path(section, stack=2),
                              lambda p: tifffile.imwrite(p, image[r:r + h, c:c + w, 0])))
    (dest / "SHA256SUMS").write_text("".join(f"{sha256(dest / rel)}  {rel}\n" for rel in sorted(written)))
    (dest / EXCERPT).write_text(json.dumps({"of": source_name(), "sections": list(sections),
                                            "unlabelled_stack2_sections": list(unlabelled), "box": list(box)},
                                           indent=2) + "\n")
    (dest / "README.md").write_text(
        f"# An excerpt of the Drosophila VNC ssTEM data set\n\nSections {list(sections)} of stack 1 (with their "
        f"labels) and {list(unlabelled)} of stack 2, cropped to {h}x{w} pixels at row {r}, column {c}, in the data "
        f"set's own layout; cut by `frem.seg.data.drosophila.cut_excerpt` (see `excerpt.json`).\n\n"
        f"Source: {CITATION}.\nPublic copy: {SOURCE_REPOSITORY} (commit {SOURCE_COMMIT}).\n\nLicense: "
        "Creative Commons Attribution-NonCommercial-ShareAlike 3.0 Unported (CC BY-NC-SA 3.0). Free to use for "
        "generating or testing non-commercial image segmentation software; publications using it must cite the "
        "reference above. This excerpt is shared under the same license.\n")
    return dest


def _write(dest: Path, relative: str, write) -> str:
    (dest / relative).parent.mkdir(parents=True, exist_ok=True)
    write(dest / relative)
    return relative


OFFLINE = ("Without internet, point --data DIR or FREM_DATA=DIR at a copy of the data set; with it, run the command "
           "again to continue where it stopped")
OFFLINE_DOWNLOAD = ("Without internet, copy the data set into {dest} from a machine that has it (or point --url at a "
                    "mirror you can reach); with internet, run the command again to continue where it stopped")


def download(dest=None, base_url: str | None = None, progress: bool = True, offline: str = OFFLINE) -> list[str]:
    """Fetch every missing file of the data set into ``dest``, verified; return those fetched.

    Resumable at two levels: files already present with the right checksum
    are kept, and a partly downloaded file (``*.part``) continues where it
    stopped (an HTTP range request). A file is renamed into place only once
    its checksum matches, so nothing half-written is ever read as data. No
    folder is made and no progress is shown before the first file arrives, so
    a machine without internet is told so in one line and left as it was.
    ``offline``: what to do without internet (``{dest}`` is filled in).
    """
    dest = Path(dest).expanduser() if dest is not None else default_root()
    base_url = (base_url or os.environ.get("FREM_DROSOPHILA_URL") or DOWNLOAD_URL).rstrip("/")
    sums = checksums()
    todo = [(relative, digest) for relative, digest in sorted(sums.items())
            if not ((dest / relative).is_file() and sha256(dest / relative) == digest)]
    fetched, bar = [], None
    try:
        for relative, digest in todo:
            target = dest / relative
            part = target.with_name(target.name + ".part")
            _fetch(f"{base_url}/{relative}", part, offline.format(dest=dest))
            if sha256(part) != digest:
                part.unlink()
                raise DataError(f"downloaded {base_url}/{relative} does not match its SHA-256; "
                                "try again later")
            os.replace(part, target)
            fetched.append(relative)
            if bar is None:  # the first file is in: from here on a bar is news, not noise
                bar = tqdm(total=len(todo), initial=1, desc="Drosophila VNC", unit="file", disable=not progress,
                           file=sys.stderr)
            else:
                bar.update(1)
            bar.set_postfix_str(relative)
    finally:
        if bar is not None:
            bar.close()
    (dest / "SHA256SUMS").write_text(_CHECKSUMS.read_text())
    (dest / "CITATION.txt").write_text(CITATION + "\n")
    return fetched


def _fetch(url: str, part: Path, offline: str = OFFLINE) -> None:
    """Download ``url`` into ``part``, continuing a partial file with a range request; ``part``'s folder is made
    once the server answers."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            resumed = have and getattr(response, "status", None) == 206
            part.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "ab" if resumed else "wb") as f:
                shutil.copyfileobj(response, f)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # the part is already whole; its checksum decides
            return
        raise DataError(f"could not download {url}: {error}") from None
    except OSError as error:
        raise DataError(f"could not download {url}: {error}. {offline}") from None
