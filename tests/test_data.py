"""Data: the Drosophila stack (split, classes, checksums, download) and folder data sets."""

import contextlib
import functools
import json
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frem.seg.data import DataError, load_dataset
from frem.seg.data import drosophila as dro


def test_split_is_by_section_twelve_three_five():
    sections = [s for name in ("train", "val", "test") for s in dro.SPLIT[name]]
    assert sorted(sections) == list(range(20))  # disjoint and complete
    assert [len(dro.SPLIT[n]) for n in ("train", "val", "test")] == [12, 3, 5]


def test_sixteen_tiles_of_256_per_section_with_all_four_classes(full_drosophila_root):
    drosophila_root = full_drosophila_root
    data = dro.load_drosophila(drosophila_root, sections={"train": (0,), "val": (12,), "test": (15, 16)})
    assert data.classes == ("membrane", "mitochondria", "synapse", "background")
    assert tuple(data.train.images.shape) == (16, 1, 256, 256)
    assert len(data.test) == 32 and data.train.masks.max() == 3
    assert set(data.train.masks.unique().tolist()) == {0, 1, 2, 3}
    assert {n.split("@")[0] for n in data.test.names} == {"section15", "section16"}
    # what a checkpoint records: by name and checksum list, and where it was read
    assert (data.source, data.checksum, data.root) == (dro.source_name(), dro.checksum(), str(drosophila_root.resolve()))
    with pytest.raises(DataError, match="^the train split has no images"):
        dro.load_drosophila(drosophila_root, sections={"train": (), "val": (12,), "test": (15,)})


def test_the_excerpt_loads_like_the_data_set_and_names_itself_an_excerpt(drosophila_root):
    data = dro.load_drosophila(drosophila_root, crop=64, sections={"train": (0,), "val": (12,), "test": (15, 16)})
    assert tuple(data.train.images.shape) == (16, 1, 64, 64) and len(data.test) == 32
    assert set(data.train.masks.unique().tolist()) == {0, 1, 2, 3}  # the window was chosen for synapses
    assert data.checksum == dro.checksum(drosophila_root) != dro.checksum()  # never the data set's identity
    assert data.source == (f"an excerpt of the Drosophila VNC ssTEM data set (unidesigner/groundtruth-drosophila-vnc"
                           f"@4a5f051, SHA256SUMS {dro.checksum()}): sections [0, 1, 2, 12, 13, 15, 16] cropped to "
                           f"256x256 at (576, 768); files verified against its own SHA256SUMS {data.checksum}")
    with pytest.raises(DataError, match=r"is an excerpt of the Drosophila data without stack1/raw/03.tif \(it holds "
                                        r"sections \[0, 1, 2, 12, 13, 15, 16\]\): choose among those"):
        dro.load_drosophila(drosophila_root, sections={"train": (3,), "val": (12,), "test": (15,)})
    (drosophila_root / "README.md").read_text().index("CC BY-NC-SA 3.0")  # its license and citation beside it


def test_the_excerpt_is_what_cut_excerpt_makes_of_the_whole_data_set(full_drosophila_root, drosophila_root, tmp_path):
    from frem.seg.data.images import read_pages
    cut = json.loads((drosophila_root / dro.EXCERPT).read_text())
    fresh = dro.cut_excerpt(full_drosophila_root, tmp_path / "e", cut["sections"], cut["box"],
                            cut["unlabelled_stack2_sections"])
    for name in (dro.EXCERPT, "README.md"):
        assert (fresh / name).read_text() == (drosophila_root / name).read_text()
    assert set(dro.checksums(fresh)) == set(dro.checksums(drosophila_root))
    for relative in dro.checksums(fresh):  # the pixels (a TIFF's bytes may differ with tifffile's version)
        mask = "labels" in relative
        assert np.array_equal(read_pages(fresh / relative, mask=mask)[0],
                              read_pages(drosophila_root / relative, mask=mask)[0]), relative


@pytest.fixture
def as_data_set(drosophila_root, monkeypatch):
    """The excerpt as if it were the whole data set (its checksum list in place of the shipped one), for the
    download tests: a mirror of the excerpt's files, downloaded and verified as the data set's would be."""
    monkeypatch.setattr(dro, "_CHECKSUMS", drosophila_root / "SHA256SUMS")
    return drosophila_root


def test_label_values_map_to_the_four_classes():
    labels = np.array([[0, 32, 64, 96, 128], [159, 191, 223, 255, 255]], dtype=np.uint8)
    assert dro.labels_to_classes(labels, "x").tolist() == [[0, 0, 0, 0, 0], [3, 1, 2, 3, 3]]
    with pytest.raises(DataError, match=r"x holds label values \[7\]"):
        dro.labels_to_classes(np.array([[7]], dtype=np.uint8), "x")


def _copy_sections(root, dest, sections):
    for s in sections:
        for rel in (dro.raw_path(s), dro.label_path(s)):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, dest / rel)


def test_missing_and_corrupt_files_are_named_with_how_to_get_them(as_data_set, tmp_path):
    drosophila_root = as_data_set
    _copy_sections(drosophila_root, tmp_path, (0, 12))
    sections = {"train": (0,), "val": (12,), "test": (15,)}
    with pytest.raises(DataError, match=r"missing file .*stack1/raw/15.tif.*frem data download drosophila"):
        dro.load_drosophila(tmp_path, sections=sections)
    _copy_sections(drosophila_root, tmp_path, (15,))
    (tmp_path / dro.label_path(12)).write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"corrupt file .*labels00000012.png"):
        dro.load_drosophila(tmp_path, sections=sections)


def test_data_root_comes_from_the_environment(drosophila_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FREM_DATA", str(drosophila_root))
    assert dro.resolve_root() == drosophila_root
    monkeypatch.setenv("FREM_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no Drosophila data at .*nowhere.*frem data download"):
        dro.resolve_root()


def test_download_verifies_and_resumes(as_data_set, tmp_path):
    """The real download code, pointed at the local copy through a file:// URL."""
    drosophila_root = as_data_set
    dest = tmp_path / "cache"
    fetched = dro.download(dest, base_url=drosophila_root.as_uri(), progress=False)
    assert sorted(fetched) == sorted(dro.checksums())
    assert all(dro.sha256(dest / rel) == digest for rel, digest in dro.checksums().items())
    (dest / dro.raw_path(2)).unlink()
    fetched = dro.download(dest, base_url=drosophila_root.as_uri(), progress=False)
    assert fetched == ["stack1/raw/02.tif"]  # only the missing file comes again
    bad_mirror = tmp_path / "mirror"
    shutil.copytree(drosophila_root, bad_mirror)
    (bad_mirror / dro.raw_path(2)).write_bytes(b"tampered")
    (dest / dro.raw_path(2)).unlink()
    with pytest.raises(DataError, match="02.tif does not match its SHA-256"):
        dro.download(dest, base_url=bad_mirror.as_uri(), progress=False)
    assert not (dest / dro.raw_path(2)).exists()  # nothing half-written is left behind
    assert not list(dest.rglob("*.part"))


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static server that honours ``Range: bytes=N-`` and logs what it served."""
    served: list = []

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])
        self.served.append((path.name, start))

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler_class, drosophila_root):
    """A local HTTP server of the data with ``handler_class``; yields its base URL."""
    handler = functools.partial(handler_class, directory=str(drosophila_root))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def resume_a_killed_download(handler_class, drosophila_root, dest) -> bytes:
    """Download into ``dest`` (a copy of the data) whose 02.tif a killed download left as 1000 bytes
    of ``.part``, from a local HTTP server with ``handler_class``; return the file's true bytes."""
    shutil.copytree(drosophila_root, dest)
    whole = (dest / dro.raw_path(2)).read_bytes()
    (dest / dro.raw_path(2)).unlink()
    (dest / (dro.raw_path(2) + ".part")).write_bytes(whole[:1000])
    with serving(handler_class, drosophila_root) as url:
        fetched = dro.download(dest, base_url=url, progress=False)
    assert fetched == ["stack1/raw/02.tif"]
    return whole


def test_a_partial_file_continues_with_a_range_request(as_data_set, tmp_path):
    drosophila_root = as_data_set
    RangeHandler.served.clear()
    whole = resume_a_killed_download(RangeHandler, drosophila_root, tmp_path / "cache")
    assert RangeHandler.served == [("02.tif", 1000)]  # only the rest crossed the network
    assert (tmp_path / "cache" / dro.raw_path(2)).read_bytes() == whole


def test_train_without_a_data_flag_fills_the_cache_first(as_data_set, tmp_path, monkeypatch):
    """A user's first run: no --data, no FREM_DATA, an empty cache."""
    drosophila_root = as_data_set
    monkeypatch.delenv("FREM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("FREM_DROSOPHILA_URL", drosophila_root.as_uri())
    root = dro.resolve_root()
    assert root == tmp_path / "xdg" / "frem" / "drosophila-vnc"
    assert all(dro.sha256(root / rel) == digest for rel, digest in dro.checksums().items())
    with pytest.raises(DataError, match="no Drosophila data at .*elsewhere"):
        dro.resolve_root(tmp_path / "elsewhere")  # a folder the user named is never filled


def make_folder_dataset(root, size=64, classes=("cell", "nucleus", "background"), count=2):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for split in ("train", "val", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(count):
            mask = rng.integers(0, len(classes), (size, size), dtype=np.uint8)
            image = (mask * 80 + rng.integers(0, 40, (size, size))).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"img{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"img{i}.png")
    return root


def test_folder_dataset_loads_with_its_classes(tmp_path):
    data = load_dataset("folder", make_folder_dataset(tmp_path / "d"), crop=32)
    assert data.classes == ("cell", "nucleus", "background")
    assert tuple(data.train.images.shape) == (8, 1, 32, 32) and data.in_channels == 1


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "val" / "masks" / "img1.png").unlink(), r"val/images/img1.png has no mask"),
    (lambda r: Image.fromarray(np.zeros((8, 8), np.uint8)).save(r / "test" / "masks" / "img0.png"),
     r"test/masks/img0.png is 8x8 but .*test/images/img0.png is 64x64"),
    (lambda r: Image.fromarray(np.full((64, 64), 5, np.uint8)).save(r / "train" / "masks" / "img0.png"),
     r"train/masks/img0.png holds class index 5, but classes.txt names 3 classes"),
    (lambda r: shutil.rmtree(r / "train" / "images"), r"no images in .*train/images"),
    (lambda r: (r / "classes.txt").unlink(), r"missing .*classes.txt"),
])
def test_bad_folder_pairs_are_reported_with_the_file(tmp_path, damage, message):
    root = make_folder_dataset(tmp_path / "d")
    damage(root)
    with pytest.raises(DataError, match=message):
        load_dataset("folder", root)


def test_a_mask_holding_exactly_k_classes_is_refused_and_k_minus_one_is_fine(tmp_path):
    root = make_folder_dataset(tmp_path / "d")  # 3 classes: indices 0, 1, 2
    Image.fromarray(np.full((64, 64), 2, np.uint8)).save(root / "train" / "masks" / "img0.png")
    assert load_dataset("folder", root).train.masks.max() == 2
    Image.fromarray(np.full((64, 64), 3, np.uint8)).save(root / "train" / "masks" / "img0.png")
    with pytest.raises(DataError, match="holds class index 3, but classes.txt names 3 classes"):
        load_dataset("folder", root)


def test_image_and_mask_tiles_stay_aligned(tmp_path):
    """The mask is a known function of the image's pixel position, so any transposition,
    flip or offset between image and mask tiles shows."""
    root = tmp_path / "d"
    (root / "classes.txt").parent.mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\nd\n")
    height, width = 96, 160  # not square: rows and columns cannot be swapped unnoticed
    rows, cols = np.mgrid[:height, :width]
    image = ((rows * 7 + cols * 3) % 251).astype(np.uint8)
    mask = ((rows // 8 + 2 * (cols // 16)) % 4).astype(np.uint8)
    for split in ("train", "val", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        Image.fromarray(image).save(root / split / "images" / "a.png")
        Image.fromarray(mask).save(root / split / "masks" / "a.png")
    data = load_dataset("folder", root, crop=32)
    assert len(data.train) == (96 // 32) * (160 // 32)
    for tile, tile_mask, name in zip(data.train.images, data.train.masks, data.train.names):
        r, c = (int(v) for v in name.split("@")[1].split(","))
        assert torch.equal(tile[0], torch.from_numpy(image[r:r + 32, c:c + 32]))
        assert torch.equal(tile_mask, torch.from_numpy(mask[r:r + 32, c:c + 32]))
        pixel_rows, pixel_cols = np.mgrid[r:r + 32, c:c + 32]
        assert torch.equal(tile_mask, torch.from_numpy(((pixel_rows // 8 + 2 * (pixel_cols // 16)) % 4)
                                                       .astype(np.uint8)))


def test_drosophila_tiles_are_cut_from_the_sections_where_their_names_say(drosophila_root):
    from frem.seg.data.images import read_pages
    data = load_dataset("drosophila", drosophila_root, crop=64, sections={"train": (2,), "val": (12,),
                                                                          "test": (15,)})
    (section,) = read_pages(drosophila_root / dro.raw_path(2))
    (labels,) = read_pages(drosophila_root / dro.label_path(2), mask=True)
    classes = dro.labels_to_classes(labels.astype(np.uint8), "labels")
    for tile, tile_mask, name in zip(data.train.images, data.train.masks, data.train.names):
        r, c = (int(v) for v in name.split("@")[1].split(","))
        assert torch.equal(tile[0], torch.from_numpy(section[r:r + 64, c:c + 64, 0]))
        assert torch.equal(tile_mask, torch.from_numpy(classes[r:r + 64, c:c + 64]))
    assert len(data.train) == 16


class IgnoresRange(http.server.SimpleHTTPRequestHandler):
    """A server that answers every request with the whole file and 200, whatever Range asked."""

    def log_message(self, *args):
        pass


def test_a_server_that_ignores_range_restarts_the_file_instead_of_appending(as_data_set, tmp_path):
    drosophila_root = as_data_set
    whole = resume_a_killed_download(IgnoresRange, drosophila_root, tmp_path / "cache")
    assert (tmp_path / "cache" / dro.raw_path(2)).read_bytes() == whole


def test_a_split_moves_whole_and_the_data_names_its_parts(tmp_path):
    from frem.seg.data.base import colour_name
    data = load_dataset("folder", make_folder_dataset(tmp_path / "d"), crop=32)
    moved = data.train.to("meta")  # every tensor moves (stats too: normalisation runs on the device)
    assert {t.device.type for t in (moved.images, moved.masks, moved.stats)} == {"meta"}
    assert moved.names == data.train.names and moved.images.shape == data.train.images.shape
    assert data.splits() == {"train": data.train, "val": data.val, "test": data.test}
    assert data.identity() == {"source": data.source, "root": data.root, "checksum": data.checksum}
    assert (colour_name(1), colour_name(3)) == ("greyscale", "RGB")


def test_a_folder_mixing_colour_and_greyscale_across_splits_is_refused(tmp_path):
    root = make_folder_dataset(tmp_path / "d")
    for name in ("img0", "img1"):
        grey = np.asarray(Image.open(root / "val" / "images" / f"{name}.png"))
        Image.fromarray(np.stack([grey] * 3, -1)).save(root / "val" / "images" / f"{name}.png")
    with pytest.raises(DataError, match="mixes kinds of images across its splits"):
        load_dataset("folder", root, crop=32)


def test_a_download_never_waits_forever_on_a_silent_server(tmp_path, monkeypatch):
    import urllib.request
    waited = []

    def silent(request, timeout=None):
        waited.append(timeout)
        raise TimeoutError("timed out")
    monkeypatch.setattr(urllib.request, "urlopen", silent)
    with pytest.raises((DataError, TimeoutError)):
        dro._fetch("http://127.0.0.1:9/x", tmp_path / "x.part")
    assert waited and all(t is not None and 0 < t <= 300 for t in waited)


def test_an_offline_download_is_one_line_with_the_advice_of_its_command_and_leaves_nothing(tmp_path, capsys):
    """No folder, no empty progress bar before the error; `frem data download` has --dest and --url, not --data."""
    from frem.seg.cli import main
    dest = tmp_path / "cache" / "drosophila-vnc"
    assert main(["data", "download", "drosophila", "--dest", str(dest), "--url", "http://127.0.0.1:9/nothing"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "file/s" not in err and "--data" not in err
    assert f"copy the data set into {dest} from a machine that has it (or point --url at a mirror" in err
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match=r"Without internet, point --data DIR or FREM_DATA=DIR"):
        dro.download(dest, "http://127.0.0.1:9/nothing")
    assert not (tmp_path / "cache").exists()


def test_a_split_without_masks_names_the_mask_it_expected(tmp_path):
    root = make_folder_dataset(tmp_path / "d")
    shutil.rmtree(root / "test" / "masks")
    with pytest.raises(DataError, match=r"test/images/img0.png has no mask: expected .*test/masks/img0.png"):
        load_dataset("folder", root)


def test_image_files_of_every_common_kind_keep_their_values(tmp_path, monkeypatch):
    """What microscopes and image editors write: 16-bit and bilevel PNGs, palette PNGs, planar RGB
    TIFFs, boolean and 32-bit integer TIFFs. Each reads as (H, W, C) with its values intact."""
    import tifffile

    from frem.seg.data.images import read_pages
    ramp = np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) * 31
    Image.fromarray(ramp).save(tmp_path / "16bit.png")
    (page,) = read_pages(tmp_path / "16bit.png")
    assert page.dtype == np.uint16 and np.array_equal(page[..., 0], ramp)  # not cut to 8 bits
    Image.fromarray(np.eye(8, dtype=bool)).convert("1").save(tmp_path / "bilevel.png")
    (page,) = read_pages(tmp_path / "bilevel.png")
    assert page.shape == (8, 8, 1) and set(np.unique(page)) == {0, 255}
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette.putpalette([200, 10, 20, 5, 90, 250] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    (page,) = read_pages(tmp_path / "palette.png")
    assert page.shape == (2, 2, 3) and page[0, 0].tolist() == [200, 10, 20] and page[0, 1].tolist() == [5, 90, 250]
    rgb = np.random.default_rng(0).integers(0, 255, (3, 16, 12), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    (page,) = read_pages(tmp_path / "planar.tif")
    assert np.array_equal(page, np.moveaxis(rgb, 0, -1))
    tifffile.imwrite(tmp_path / "bool.tif", np.eye(8, dtype=bool))
    (page,) = read_pages(tmp_path / "bool.tif")
    assert page.dtype == np.uint8 and np.array_equal(page[..., 0], np.eye(8, dtype=np.uint8))
    tifffile.imwrite(tmp_path / "int32.tif", ramp.astype(np.int32))
    (page,) = read_pages(tmp_path / "int32.tif")
    assert page.dtype == np.uint16 and np.array_equal(page[..., 0], ramp)
    tifffile.imwrite(tmp_path / "negative.tif", ramp.astype(np.int32) - 1)
    with pytest.raises(DataError, match="negative.tif holds int32 values that do not fit 16 bits"):
        read_pages(tmp_path / "negative.tif")
    (tmp_path / "odd.png").write_bytes(b"x")
    monkeypatch.setattr(Image, "open", lambda path: (_ for _ in ()).throw(ValueError()))
    with pytest.raises(DataError, match=r"cannot read .*odd.png: ValueError$"):
        read_pages(tmp_path / "odd.png")


def test_a_bad_class_index_is_named_even_among_good_ones_and_its_page_with_it(tmp_path):
    import tifffile
    root = make_folder_dataset(tmp_path / "d")  # 3 classes
    mask = np.zeros((64, 64), np.uint8)
    mask[0, 0] = 3
    Image.fromarray(mask).save(root / "train" / "masks" / "img0.png")
    with pytest.raises(DataError, match=r"img0.png holds class index 3, but"):
        load_dataset("folder", root)
    root = make_folder_dataset(tmp_path / "stack")
    for name in ("img0", "img1"):
        (root / "train" / "images" / f"{name}.png").unlink()
        (root / "train" / "masks" / f"{name}.png").unlink()
    tifffile.imwrite(root / "train" / "images" / "s.tif", np.zeros((2, 64, 64), np.uint8), photometric="minisblack")
    pages = np.zeros((2, 64, 64), np.uint8)
    pages[1, 5, 5] = 7
    tifffile.imwrite(root / "train" / "masks" / "s.tif", pages, photometric="minisblack")
    with pytest.raises(DataError, match=r"s.tif\[page 1\] holds class index 7"):
        load_dataset("folder", root)


class RecordingRangeHandler(RangeHandler):
    """RangeHandler that also records each request's path and Range header; answers a range
    request with ``range_status`` instead when that is set (416: the part is already whole)."""
    requests: list = []
    range_status: int | None = None

    def do_GET(self):
        # the request line as sent: http.server collapses a leading '//' in self.path
        self.requests.append((self.requestline.split()[1], self.headers.get("Range")))
        if self.range_status and self.headers.get("Range"):
            self.send_error(self.range_status)
            return
        super().do_GET()


def serve(drosophila_root, status=None):
    RecordingRangeHandler.requests, RecordingRangeHandler.range_status = [], status
    return serving(RecordingRangeHandler, drosophila_root)


def test_a_fresh_download_into_the_default_cache_is_whole_quiet_when_asked_and_shows_progress(
        as_data_set, tmp_path, monkeypatch, capsys):
    """No --dest and no XDG_CACHE_HOME: ~/.cache. A missing file is asked for whole (no Range),
    at a URL without '//' (object stores refuse it) even when the mirror ends in '/'."""
    drosophila_root = as_data_set
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dest = tmp_path / "home" / ".cache" / "frem" / "drosophila-vnc"
    assert dro.default_root() == dest
    shutil.copytree(drosophila_root, dest)
    for name in ("SHA256SUMS", "CITATION.txt", "README.md"):
        (dest / name).unlink(missing_ok=True)
    (dest / dro.raw_path(2)).unlink()
    with serve(drosophila_root) as base:
        url = base + "/"
        assert dro.download(base_url=url, progress=False) == [dro.raw_path(2)]
        assert capsys.readouterr().err == ""  # progress=False: nothing on the terminal
        assert RecordingRangeHandler.requests == [("/" + dro.raw_path(2), None)]
        (dest / dro.raw_path(1)).unlink()
        assert dro.download(base_url=url) == [dro.raw_path(1)]
    shown = capsys.readouterr().err
    assert "Drosophila VNC" in shown and "file/s" in shown and dro.raw_path(1) in shown
    assert (dest / dro.raw_path(2)).read_bytes() == (drosophila_root / dro.raw_path(2)).read_bytes()
    assert (dest / "SHA256SUMS").read_text() == dro._CHECKSUMS.read_text()  # what load_dataset verifies against
    assert (dest / "CITATION.txt").read_text() == dro.CITATION + "\n"


def test_a_part_already_whole_is_kept_when_the_server_answers_416(as_data_set, tmp_path):
    drosophila_root = as_data_set
    dest = tmp_path / "cache"
    shutil.copytree(drosophila_root, dest)
    target = dest / dro.raw_path(2)
    target.rename(target.with_name(target.name + ".part"))  # killed after the last byte, before the rename
    with serve(drosophila_root, status=416) as url:
        assert dro.download(dest, base_url=url, progress=False) == [dro.raw_path(2)]
    assert target.read_bytes() == (drosophila_root / dro.raw_path(2)).read_bytes()


def test_a_server_error_on_a_resumed_file_says_so_and_keeps_the_part(as_data_set, tmp_path):
    drosophila_root = as_data_set
    dest = tmp_path / "cache"
    shutil.copytree(drosophila_root, dest)
    target = dest / dro.raw_path(2)
    part = target.with_name(target.name + ".part")
    part.write_bytes(target.read_bytes()[:1000])
    target.unlink()
    with serve(drosophila_root, status=503) as url, \
            pytest.raises(DataError, match=r"could not download .*02.tif: HTTP Error 503"):
        dro.download(dest, base_url=url, progress=False)
    assert part.stat().st_size == 1000  # the next try continues from there


def test_the_data_sets_identity_is_the_sha256_of_its_checksum_list():
    """Checkpoints hold it: any other digest or length makes every earlier run 'other data'."""
    import hashlib
    assert dro.checksum() == hashlib.sha256(dro._CHECKSUMS.read_bytes()).hexdigest()[:12]


def test_a_bad_label_value_names_the_section_file_it_is_in(drosophila_root, tmp_path):
    root = tmp_path / "d"
    (root / "stack1" / "raw").mkdir(parents=True)
    (root / "stack1" / "labels").mkdir()
    shutil.copy(drosophila_root / dro.raw_path(0), root / dro.raw_path(0))
    labels = np.asarray(Image.open(drosophila_root / dro.label_path(0))).copy()
    labels[5, 5] = 7
    Image.fromarray(labels).save(root / dro.label_path(0))
    sums = {rel: dro.sha256(root / rel) for rel in (dro.raw_path(0), dro.label_path(0))}
    with pytest.raises(DataError, match=r"labels00000000.png holds label values \[7\]"):
        dro.load_section(root, 0, sums)


def test_an_image_is_described_by_depth_and_colour():
    from frem.seg.data.base import describe
    assert describe(np.zeros((4, 5, 1), np.uint8)) == "8-bit greyscale"
    assert describe(np.zeros((4, 5, 3), np.uint16)) == "16-bit RGB"
    assert describe(np.zeros((4, 3, 1), np.float32)) == "32-bit float greyscale"
    assert describe(np.zeros((4, 1, 3), np.int32)) == "int32 RGB"


def test_overlays_stretch_the_1st_to_99_8th_percentile_over_0_255():
    from frem.seg.data.images import display_range
    eight_bit = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert display_range(eight_bit) is eight_bit  # 8-bit is shown as it is
    for image in (np.arange(1000, dtype=np.uint16).reshape(10, 100, 1) * 60,
                  np.linspace(0, 0.5, 1000, dtype=np.float32).reshape(10, 100, 1)):  # a range under 1
        low, high = np.percentile(image.astype(np.float64), (1.0, 99.8))
        expected = np.round(np.clip((image - low) / (high - low), 0, 1) * 255)
        shown = display_range(image)
        assert shown.dtype == np.uint8 and np.array_equal(shown, expected.astype(np.uint8))
        assert shown.min() == 0 and shown.max() == 255
    assert not display_range(np.full((3, 3, 1), 7.0, np.float32)).any()  # flat: no division by zero


def test_a_folder_data_set_keeps_tiles_per_section_and_records_where_and_what_it_is(tmp_path):
    import hashlib
    root = make_folder_dataset(tmp_path / "d")
    data = load_dataset("folder", root, crop=32, tiles_per_section=2)
    assert len(data.train) == 2 * 2 and len(data.test) == 2 * 2  # two images a split, two tiles each
    assert data.root == str(root.resolve())
    files = sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    assert data.checksum == digest.hexdigest()[:12]
    assert data.source == f"folder 'd' ({len(files)} files, SHA-256 of contents {data.checksum})"
    whole = load_dataset("folder", root, crop=None)  # no crop: each image whole, as one tile
    first = np.asarray(Image.open(root / "train" / "images" / "img0.png"))
    assert tuple(whole.train.images.shape) == (2, 1, 64, 64) and np.array_equal(whole.train.images[0, 0], first)


def test_a_negative_class_index_in_a_mask_is_named(tmp_path):
    import tifffile
    root = make_folder_dataset(tmp_path / "d")
    mask = np.zeros((64, 64), np.int16)
    mask[3, 3] = -1
    (root / "train" / "masks" / "img0.png").unlink()
    tifffile.imwrite(root / "train" / "masks" / "img0.tif", mask)
    with pytest.raises(DataError, match=r"img0.tif holds class index -1, but classes.txt names 3 classes"):
        load_dataset("folder", root, crop=32)


def test_a_complete_cache_is_used_as_it_is(as_data_set, tmp_path, monkeypatch, capsys):
    """No 'downloading it once' note and no re-hashing of every file on each run."""
    drosophila_root = as_data_set
    monkeypatch.delenv("FREM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = dro.default_root()
    for relative in dro.checksums():
        (cache / relative).parent.mkdir(parents=True, exist_ok=True)
        (cache / relative).symlink_to(drosophila_root / relative)
    monkeypatch.setattr(dro, "download", lambda *a, **k: pytest.fail("a complete cache was downloaded again"))
    assert dro.resolve_root() == cache and capsys.readouterr().err == ""


def test_dataset_normalisation_standardises_by_the_training_splits_own_units():
    from types import SimpleNamespace

    from frem.seg.data.images import fit_normalization, normalize
    images = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8))
    assert fit_normalization(SimpleNamespace(images=images)) == {"mode": "image"}  # the default
    for split in (images, images.float() / 1000):  # 8-bit, and calibrated units with a std under 1
        fitted = fit_normalization(SimpleNamespace(images=split), "dataset")
        values = split.double()
        assert fitted == {"mode": "dataset", "units": "raw", "mean": pytest.approx(float(values.mean())),
                          "std": pytest.approx(float(values.std()))}
        standard = normalize(split, fitted).double()
        assert torch.allclose(standard, (values - values.mean()) / values.std(), atol=1e-5)
    flat = fit_normalization(SimpleNamespace(images=torch.full((2, 1, 4, 4), 9.0)), "dataset")
    assert flat["std"] == 1.0 and not normalize(torch.full((1, 1, 4, 4), 9.0), flat).any()  # no 0/0
    # a checkpoint from before raw units holds the statistics of intensities / 255
    old = {"mean": 0.5, "std": 0.25}
    assert torch.allclose(normalize(images, old), (images.float() / 255.0 - 0.5) / 0.25)


def test_tiles_cover_the_grid_whole_tiles_only_and_a_limit_spreads_them_corner_to_corner():
    from frem.seg.data.base import tile_grid
    assert tile_grid(63, 95, 32) == [(0, 0), (0, 32)]  # a 31-pixel remainder is no tile
    assert tile_grid(128, 128, 32, limit=4) == [(0, 0), (32, 32), (64, 64), (96, 96)]
    assert tile_grid(64, 64, 32, limit=4) == [(0, 0), (0, 32), (32, 0), (32, 32)]


def test_each_image_keeps_its_own_statistics_and_a_flat_channel_divides_by_one():
    from frem.seg.data.base import image_stats
    image = np.random.default_rng(4).normal(5.0, 2.0, (6, 7, 2))
    image[..., 1] = 3.0  # flat
    stats = image_stats(image)
    assert stats.shape == (2, 2) and stats.dtype == np.float32
    assert stats[0].tolist() == pytest.approx([image[..., 0].mean(), image[..., 0].std()], rel=1e-6)
    assert stats[1].tolist() == [3.0, 1.0]


def test_uncropped_images_stay_whole_whatever_their_shape_and_sizes_must_agree(tmp_path):
    root = make_folder_dataset(tmp_path / "d")
    for split in ("train", "val", "test"):  # taller than wide
        for i in range(2):
            for kind in ("images", "masks"):
                path = root / split / kind / f"img{i}.png"
                Image.fromarray(np.asarray(Image.open(path))[:, :40].copy()).save(path)
    data = load_dataset("folder", root, crop=None)
    assert tuple(data.train.images.shape) == (2, 1, 64, 40) and data.train.masks.dtype == torch.uint8
    for kind in ("images", "masks"):  # one image of another size
        path = root / "val" / kind / "img1.png"
        Image.fromarray(np.asarray(Image.open(path))[:48].copy()).save(path)
    with pytest.raises(DataError, match=r"the val split mixes image sizes \[\(48, 40\), \(64, 40\)\]: pass a crop"):
        load_dataset("folder", root, crop=None)


def test_a_16_bit_pgm_keeps_its_values(tmp_path):
    """Pillow opens it as 32-bit integers (mode I): converting that to 8 bits would clip it."""
    from frem.seg.data.images import read_pages
    values = (np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)
    path = tmp_path / "cells.pgm"
    path.write_bytes(b"P5\n64 64\n65535\n" + values.astype(">u2").tobytes())
    (page,) = read_pages(path)
    assert page.shape == (64, 64, 1) and np.array_equal(page[..., 0], values)


def test_an_opaque_alpha_and_print_colours_are_dropped_and_grey_stays_grey(tmp_path):
    """RGBA with an opaque alpha and CMYK become RGB, and say what they were stored as; greyscale with
    alpha (LA) stays one channel, as the greyscale model it is meant for expects."""
    import tifffile

    from frem.seg.data.images import read_pages
    rgba = np.random.default_rng(5).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    pages = read_pages(tmp_path / "rgba.png")
    assert np.array_equal(pages[0], rgba[..., :3]) and pages.stored == "RGBA, its alpha opaque"
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=[2])
    pages = read_pages(tmp_path / "rgba.tif")
    assert np.array_equal(pages[0], rgba[..., :3]) and pages.stored == "RGBA, its alpha opaque"
    Image.fromarray(rgba[..., 2:], mode="LA").save(tmp_path / "la.png")
    pages = read_pages(tmp_path / "la.png")
    assert np.array_equal(pages[0], rgba[..., 2:3]) and pages.stored == "greyscale with alpha, its alpha opaque"
    Image.fromarray(rgba, mode="CMYK").save(tmp_path / "cmyk.jpg")
    (page,) = read_pages(tmp_path / "cmyk.jpg")
    assert page.shape == (6, 5, 3) and page.dtype == np.uint8


def test_a_float_mask_is_refused_and_a_full_16_bit_integer_image_fits(tmp_path):
    import tifffile

    from frem.seg.data.images import read_pages
    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((4, 4), np.float32))
    with pytest.raises(DataError, match="mask.tif holds float32 values; a mask holds integer class indices"):
        read_pages(tmp_path / "mask.tif", mask=True)
    top = np.array([[0, 65535]], np.int32)
    tifffile.imwrite(tmp_path / "top.tif", top)
    (page,) = read_pages(tmp_path / "top.tif")
    assert page.dtype == np.uint16 and page[..., 0].tolist() == [[0, 65535]]
    for dtype in (np.float16, np.float64):  # other float widths become float32, values kept
        tifffile.imwrite(tmp_path / "float.tif", np.array([[0.25, 3.5]], dtype))
        (page,) = read_pages(tmp_path / "float.tif")
        assert page.dtype == np.float32 and page[..., 0].tolist() == [[0.25, 3.5]]


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_transparent_alpha_is_refused_not_dropped(tmp_path, suffix):
    """Dropping an alpha that is not opaque changes what the image shows: one clear line instead."""
    import tifffile

    from frem.seg.data.images import read_pages
    rgba = np.full((10, 10, 4), 255, np.uint8)
    rgba[:1, :, 3] = 0  # one row in ten transparent
    path = tmp_path / f"cells{suffix}"
    if suffix == ".png":
        Image.fromarray(rgba, mode="RGBA").save(path)
    else:
        tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=[2])
    with pytest.raises(DataError, match=rf"cells\{suffix} is RGBA and 10.0% of its pixels are not opaque: .*"
                                         "Save it without alpha"):
        read_pages(path)


def test_one_rgba_image_among_greyscale_ones_is_named_as_stored(tmp_path):
    root = make_folder_dataset(tmp_path / "d")
    grey = np.asarray(Image.open(root / "train" / "images" / "img1.png"))
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], -1)
    Image.fromarray(rgba, mode="RGBA").save(root / "train" / "images" / "img1.png")
    with pytest.raises(DataError, match=r"train/img1.png is 8-bit RGB \(stored as RGBA, its alpha opaque\) but "
                                        r"train/img0.png is 8-bit greyscale"):
        load_dataset("folder", root, crop=32)


@pytest.mark.parametrize("save", [
    lambda mask, path: Image.fromarray(mask).save(path.with_suffix(".jpg"), quality=95),
    lambda mask, path: Image.fromarray(mask).save(path.with_suffix(".webp")),
    lambda mask, path: __import__("tifffile").imwrite(path.with_suffix(".tif"), mask, compression="jpeg"),
], ids=["jpeg", "webp", "tiff-jpeg"])
def test_a_mask_in_a_lossy_format_is_refused_by_file(tmp_path, save):
    """A JPEG'd mask trained with exit 0: compression had rewritten pixels into classes never drawn."""
    root = make_folder_dataset(tmp_path / "d")
    path = root / "train" / "masks" / "img0.png"
    mask = np.asarray(Image.open(path))
    path.unlink()
    save(mask, path)
    with pytest.raises(DataError, match=r"train/masks/img0\.\w+ is a .*, a lossy format: masks are class labels.*"
                                        "Save the masks as PNG, TIFF"):
        load_dataset("folder", root, crop=32)


def test_a_lossless_compressed_tiff_mask_is_read():
    import tempfile

    import tifffile

    from frem.seg.data.images import read_pages
    mask = np.arange(16, dtype=np.uint8).reshape(4, 4) % 3
    with tempfile.TemporaryDirectory() as folder:
        for compression in ("zlib", "lzw", None):
            path = Path(folder) / f"m-{compression}.tif"
            tifffile.imwrite(path, mask, compression=compression)
            assert np.array_equal(read_pages(path, mask=True)[0], mask)


@pytest.mark.parametrize("values, hint", [
    ((0, 255), r"looks like a 0/255 binary mask: store class indices 0 and 1 instead \(numpy: mask // 255\)"),
    ((0, 128, 255), r"Its values \(0, 128, 255\) look like one grey level a class"),
])
def test_a_mask_drawn_for_display_is_named_with_the_fix(tmp_path, values, hint):
    root = make_folder_dataset(tmp_path / "d", classes=("cell", "nucleus", "background")[:len(values)])
    mask = np.resize(np.array(values, np.uint8), (64, 64))
    Image.fromarray(mask).save(root / "train" / "masks" / "img0.png")
    with pytest.raises(DataError, match=r"img0.png holds class index 255, but classes.txt names "
                                        rf"{len(values)} classes .*{hint}"):
        load_dataset("folder", root)


def test_a_crop_larger_than_an_image_names_the_image_and_the_largest_crop(tmp_path):
    root = make_folder_dataset(tmp_path / "d", size=80)  # 80 px: the largest multiple of 32 is 64
    with pytest.raises(DataError, match=r"--crop 96 is larger than train/img0.png \(80x80\): pass --crop 64 or less"):
        load_dataset("folder", root, crop=96)


def _without_val(root, count):
    shutil.rmtree(root / "val")
    for i in range(2, count):  # more training images, each its own content
        for kind in ("images", "masks"):
            shutil.copy(root / "train" / kind / "img0.png", root / "train" / kind / f"img{i}.png")
    return root


def test_a_folder_without_val_holds_out_whole_training_images_seeded_and_recorded(tmp_path, capsys):
    root = _without_val(make_folder_dataset(tmp_path / "d"), count=10)
    data = load_dataset("folder", root, crop=32)
    val_images = {name.split("@")[0] for name in data.val.names}
    train_images = {name.split("@")[0] for name in data.train.names}
    assert len(val_images) == 2 and len(train_images) == 8 and not val_images & train_images  # by image
    assert len(data.val) == 2 * 4 and len(data.test) == 2 * 4  # every crop of a held-out image validates
    assert data.identity()["split"] == {"val": "held out from train/ by image (fraction 0.2, seed 0)",
                                        "val_images": sorted(n.removeprefix("train/") for n in val_images),
                                        "fraction": 0.2, "seed": 0}
    assert capsys.readouterr().err == ""  # loading says nothing: training says it (evaluation need not)
    data.announce()
    assert "has no val/: validating on 2 of its 10 training images" in capsys.readouterr().err
    again = load_dataset("folder", root, crop=32)
    assert again.val.names == data.val.names and again.split == data.split  # reproducible
    again.announce()
    assert capsys.readouterr().err == ""  # said once a process
    other = load_dataset("folder", root, crop=32, split_seed=1, val_fraction=0.3)
    assert len(other.split["val_images"]) == 3 and other.split != data.split
    assert other.differs_from(data.identity()) and not again.differs_from(data.identity())


def test_quick_caps_a_folder_at_its_first_images_of_each_split(tmp_path):
    from frem.seg.config import QUICK, TrainConfig
    root = _without_val(make_folder_dataset(tmp_path / "d", size=128, count=2), count=20)
    data = TrainConfig.build(quick=True, data=str(root)).load_data()
    per_split = {name: sorted({n.split("@")[0] for n in split.names}) for name, split in data.splits().items()}
    assert {name: len(images) for name, images in per_split.items()} == QUICK["images"] == {"train": 3, "val": 1,
                                                                                             "test": 1}
    assert len(data.train) == 3 * 4 and data.train.images.shape[-1] == 64  # 128 px at crop 64: 4 tiles an image
    whole = TrainConfig.build(data=str(root), crop=64).load_data()
    assert len({n.split("@")[0] for n in whole.train.names}) == 16 and data.checksum == whole.checksum


def test_a_held_out_split_refuses_what_it_cannot_do(tmp_path):
    root = make_folder_dataset(tmp_path / "d")
    with pytest.raises(DataError, match=r"--val-fraction holds out training images only for a folder without val/"):
        load_dataset("folder", root, val_fraction=0.2)
    shutil.rmtree(root / "val")
    (root / "train" / "images" / "img1.png").unlink()
    with pytest.raises(DataError, match=r"holds 1 training image\(s\), too few to hold 1 out .*add a val/ folder"):
        load_dataset("folder", root)
    with pytest.raises(DataError, match=r"--val-fraction must lie between 0 and 1, got 1.5"):
        load_dataset("folder", root, val_fraction=1.5)
    with pytest.raises(DataError, match=r"--val-fraction is for a folder of your own"):
        load_dataset("drosophila", root, val_fraction=0.2)


def test_a_folder_data_set_is_recognised_without_dataset_folder(tmp_path):
    from frem.seg.config import TrainConfig
    root = make_folder_dataset(tmp_path / "d")
    assert TrainConfig.build(quick=True, data=str(root)).dataset == "folder"
    assert TrainConfig.build(quick=True).dataset == "drosophila"
    with pytest.raises(DataError, match=r"holds a folder data set of your own \(classes.txt, train/\), not the "
                                        "Drosophila stack: pass --dataset folder"):
        load_dataset("drosophila", root)
