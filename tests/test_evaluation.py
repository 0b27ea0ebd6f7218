"""What evaluation, the feature probe, prediction and checkpoints measure and write, checked against
an independent computation of the same thing."""

import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import frem
from frem.seg import checkpoint
from frem.seg.cli import main
from frem.seg.evaluate import FeatureProbe, evaluate_run, model_from_checkpoint
from frem.seg.predict import predict_image


def test_the_probe_measures_the_bottleneck_and_the_skip_that_meets_it(trained_run, drosophila_root):
    """Fig. 2/9: the deepest encoder map and the one the decoder joins it with (features[-2])."""
    state = checkpoint.load(trained_run / "best.pt")
    model = model_from_checkpoint(state)
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        features = model.encoder(x)
        probe = FeatureProbe(model, x[:1])
        with probe.recording():
            model(x)
    stats = probe.summary()
    assert stats["bottleneck_mean"] == pytest.approx(float(features[-1].mean()), rel=1e-5)
    assert stats["skip_mean"] == pytest.approx(float(features[-2].mean()), rel=1e-5)
    channels = state["frem"][0]["channels"]  # the best epoch's draw, which the rebuilt model holds too
    assert frem.attached(model)[0].channels.tolist() == channels and frem.attached(model)[0].epoch == state["epoch"]
    chosen = torch.zeros(features[-1].shape[1], dtype=torch.bool)
    chosen[channels] = True
    per_channel = features[-1].mean((0, 2, 3))
    assert stats["enhanced_mean"] == pytest.approx(float(per_channel[chosen].mean()), rel=1e-5)
    assert stats["other_mean"] == pytest.approx(float(per_channel[~chosen].mean()), rel=1e-5)


class Blur(nn.Module):
    """Labels by the sign of a local average: every output pixel depends on its neighbours
    (six 3x3 box filters: a receptive radius of 6), with zero padding at a window's edge."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1, bias=False) for _ in range(6)])
        for conv in self.convs:
            nn.init.constant_(conv.weight, 1 / 9)

    def forward(self, x):
        smooth = self.convs(x)
        return torch.cat([smooth, -smooth], 1)


def test_tiles_read_their_context_on_every_side():
    """Tiled with margins, the labels equal those of the whole image at once, at every tile border."""
    image = np.random.default_rng(1).normal(size=(150, 200, 1)).astype(np.float32)
    normalization = {"mode": "image"}
    whole = predict_image(Blur(), image, normalization, "cpu", tile=1024, margin=0)
    tiled = predict_image(Blur(), image, normalization, "cpu", tile=64, margin=16)
    assert np.array_equal(tiled, whole) and 0.2 < whole.mean() < 0.8
    assert not np.array_equal(predict_image(Blur(), image, normalization, "cpu", tile=64, margin=0), whole)


def test_checkpoint_temporaries_are_written_beside_their_target(tmp_path, monkeypatch):
    """A rename is atomic only within one file system: the temporary lies in the target's folder."""
    moves = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: moves.append((src, dst)) or real(src, dst))
    target = tmp_path / "run" / "best.pt"
    checkpoint.save({"a": torch.ones(2)}, target)
    checkpoint.save_json({"b": 1}, tmp_path / "run" / "metrics.json")
    assert [os.path.dirname(src) for src, _ in moves] == [str(tmp_path / "run")] * 2
    assert [os.path.basename(src).startswith(".best.pt.") for src, _ in moves] == [True, False]
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_evaluate_with_data_that_moved(trained_run, drosophila_root, tmp_path, capsys):
    """The run remembers its data folder; when that is gone, --data points at the moved copy."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    state = checkpoint.load(run / "best.pt")
    state["config"]["data"] = str(tmp_path / "gone")  # trained on a folder that is no longer there
    checkpoint.save(state, run / "best.pt")
    assert main(["evaluate", str(run)]) == 2
    assert "pass --data DIR" in capsys.readouterr().err
    moved = tmp_path / "moved"
    moved.symlink_to(drosophila_root)
    assert main(["evaluate", str(run), "--data", str(moved)]) == 0
    assert evaluate_run(run, data_root=str(moved)) == evaluate_run(trained_run)


def test_a_checkpoint_is_synced_before_and_after_its_rename(tmp_path, monkeypatch):
    """The file's data reaches the disk before the rename makes it the checkpoint, and the folder
    entry after it: a power cut leaves the old file or the new one, whole."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace",)) or real_replace(src, dst))
    checkpoint.save({"a": torch.ones(2)}, tmp_path / "last.pt")
    assert events == [("fsync", "file"), ("replace",), ("fsync", "folder")]


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_scores_in_eval_mode_and_leaves_the_mode_as_it_found_it(trained_run, drosophila_root, training):
    """Scored in train mode, FREM would enhance the test images; left in train mode after a validation,
    a user's model would go on predicting with FREM acting."""
    from frem.seg.data import load_dataset
    from frem.seg.evaluate import evaluate
    state = checkpoint.load(trained_run / "best.pt")
    model = model_from_checkpoint(state).train(training)
    data = load_dataset("drosophila", str(drosophila_root), crop=64, tiles_per_section=2,
                        sections={"train": (0,), "val": (12,), "test": (15,)})
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    evaluate(model, data.test, data.classes, state["normalization"], batch_size=1)
    assert modes == [False, False] and model.training is training
    assert all(m.training is training for m in model.modules())


def test_the_probe_pools_every_batch_of_a_split(trained_run):
    """Validation runs in batches: the figures' means are over all of them, not the last batch."""
    model = model_from_checkpoint(checkpoint.load(trained_run / "best.pt"))
    batches = [torch.randn(2, 1, 64, 64), 3 + torch.randn(1, 1, 64, 64)]
    with torch.no_grad():
        probe = FeatureProbe(model, batches[0][:1])
        with probe.recording():
            for x in batches:
                model(x)
        whole = model.encoder(torch.cat(batches))
    stats = probe.summary()
    assert stats["bottleneck_mean"] == pytest.approx(float(whole[-1].mean()), rel=1e-4)
    assert stats["skip_mean"] == pytest.approx(float(whole[-2].mean()), rel=1e-4)


def test_a_stack_predicts_page_by_page_into_multipage_tiffs_in_a_new_nested_folder(trained_run, monkeypatch,
                                                                                   tmp_path):
    import tifffile

    from frem.seg import predict as predictor
    stack = np.random.default_rng(0).integers(0, 255, (3, 96, 80), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    tiles = []
    real = predictor.predict_image
    monkeypatch.setattr(predictor, "predict_image", lambda *a, **k: tiles.append(a[4:] + tuple(k.values()))
                        or real(*a, **k))
    out = tmp_path / "new" / "nested"
    written = predictor.predict(trained_run / "best.pt", [tmp_path / "stack.tif"], out, tile=32)
    assert [p.name for p in written] == ["stack_labels.tif", "stack_overlay.tif"] and tiles == [(32,)] * 3
    labels, overlays = tifffile.imread(written[0]), tifffile.imread(written[1])
    assert labels.shape == (3, 96, 80) and labels.max() < 4 and overlays.shape == (3, 96, 80, 3)
    with tifffile.TiffFile(written[1]) as tif:
        assert len(tif.pages) == 3 and tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
    with tifffile.TiffFile(written[0]) as tif:  # three label pages, not one RGB image
        assert len(tif.pages) == 3 and tif.pages[0].photometric == tifffile.PHOTOMETRIC.MINISBLACK
    state = checkpoint.load(trained_run / "best.pt")
    for page, image, shown in zip(labels, stack, overlays):  # each page is that page's own prediction
        alone = predictor.predict_image(model_from_checkpoint(state), image[..., None], state["normalization"], "cpu")
        assert np.array_equal(page, alone)
        assert np.array_equal(shown, predictor.overlay(image[..., None], alone, state["classes"]))
    again = predictor.predict(trained_run / "best.pt", [tmp_path / "stack.tif"], out, tile=32)  # the folder exists
    assert again == written and np.array_equal(tifffile.imread(again[0]), labels)


def test_an_rgb_overlay_keeps_its_colours_where_nothing_was_found():
    from frem.seg.data.images import display_range
    from frem.seg.predict import PALETTE, overlay
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0], image[..., 2] = 200, 10
    labels = np.full((4, 4), 3, np.uint8)  # background everywhere but one pixel
    labels[1, 1] = 0
    shown = overlay(image, labels, ("membrane", "mitochondria", "synapse", "background"))
    shown_as = display_range(image)
    assert shown.shape == (4, 4, 3) and shown.dtype == np.uint8
    assert np.array_equal(shown[labels == 3], shown_as[labels == 3]) and shown_as[2, 2, 0] > shown_as[2, 2, 1]
    blend = np.round(0.55 * shown_as[1, 1].astype(np.float32) + 0.45 * np.array(PALETTE[0], np.float32))
    assert shown[1, 1].tolist() == blend.astype(int).tolist()


def test_an_overlay_colours_every_class_but_background_wherever_background_comes():
    from frem.seg.predict import BLUE, ORANGE, overlay
    image = np.full((2, 3, 1), 100, np.uint8)
    labels = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    shown = overlay(image, labels, ("background", "cell", "nucleus"))  # a folder data set's usual order
    assert np.array_equal(shown[labels == 0], np.full((2, 3), 100))
    for index, colour in ((1, ORANGE), (2, BLUE)):
        blend = np.round(0.55 * 100 + 0.45 * np.array(colour, np.float32)).astype(int)
        assert (shown[labels == index] == blend).all()


@pytest.mark.parametrize("classes", [("membrane", "cell"), ("cell", "membrane"), ("background", "Membranes", "cell"),
                                     ("cell_boundary", "cell")])
def test_colours_follow_the_class_name_not_its_index(classes):
    """Membrane is red wherever it stands in classes.txt (the docs' palette), in the overlay and the label PNG."""
    from frem.seg.predict import RED, class_colours, overlay, palette_image
    colours = class_colours(classes)
    membrane = next(i for i, name in enumerate(classes) if "embrane" in name or "boundary" in name)
    assert colours[membrane] == RED and len({c for c in colours if c is not None}) == len([c for c in colours if c])
    labels = np.full((2, 2), membrane, np.uint8)
    shown = overlay(np.full((2, 2, 1), 0, np.uint8), labels, classes)
    assert (shown == np.round(0.45 * np.array(RED, np.float32)).astype(int)).all()
    assert tuple(palette_image(labels, classes).convert("RGB").getpixel((0, 0))) == RED


def test_colours_of_unnamed_classes_are_the_palettes_first_free_ones_in_class_order():
    from frem.seg.predict import GREEN, PALETTE, RED, class_colours
    assert class_colours(("foo", "membrane", "bar", "background")) == [GREEN, RED, PALETTE[2], None]
    many = class_colours([f"class{i}" for i in range(12)])
    assert many[:10] == PALETTE and many[10:] == PALETTE[:2]  # past the palette's ten: round again


def test_an_interrupted_prediction_leaves_no_half_written_file(trained_run, monkeypatch, tmp_path):
    """Ctrl-C while an image's overlay is being written: that file is absent, never truncated; the image before
    it is whole, and a rerun writes everything and clears what the interruption left."""
    from PIL import Image

    from frem.seg import predict as predictor
    for name in ("a", "b"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    real_save = Image.Image.save

    def interrupted_save(self, fp, format=None, **params):
        if "b_overlay" in str(fp):
            real_save(self, fp, format=format, **params)
            with open(fp, "r+b") as f:
                f.truncate(100)  # half of it on disk ...
            raise KeyboardInterrupt  # ... when Ctrl-C comes
        return real_save(self, fp, format=format, **params)
    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        predictor.predict(trained_run / "best.pt", [tmp_path / "a.png", tmp_path / "b.png"], out)
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.png", "a_overlay.png", "b_labels.png"]
    Image.open(out / "a_overlay.png").load()  # whole
    monkeypatch.undo()
    (out / ".b_overlay.png.killed.tmp").write_bytes(b"what a SIGKILL leaves")
    predictor.predict(trained_run / "best.pt", [tmp_path / "a.png", tmp_path / "b.png"], out)
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.png", "a_overlay.png", "b_labels.png",
                                                      "b_overlay.png"]


def test_autocast_is_bfloat16_on_cuda_and_full_precision_on_the_cpu():
    """bfloat16 keeps float32's range (X times a feature overflows float16); on the CPU nothing is cast."""
    import contextlib
    import warnings

    from frem.seg.evaluate import autocast
    assert isinstance(autocast(torch.device("cpu")), contextlib.nullcontext)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": only the policy is checked here
        on_gpu = autocast(torch.device("cuda", 0))
    assert isinstance(on_gpu, torch.autocast) and (on_gpu.device, on_gpu.fast_dtype) == ("cuda", torch.bfloat16)


@pytest.mark.parametrize("variant, B, X, seed", [("frem", 16, 100.0, 3), ("frem-fixed", 0.25, 40.0, 7)])
def test_a_run_is_rebuilt_with_its_own_frem_settings_and_colour_channels(variant, B, X, seed):
    """What a rebuilt model is fine-tuned or probed with must be the run's FREM, not the defaults."""
    import frem
    from frem.seg.models import build_model
    trained = build_model(variant, encoder="resnet18", in_channels=3, classes=2, B=B, X=X, seed=seed)
    trained(torch.randn(2, 3, 64, 64))  # binds FREM: its channels are drawn
    state = {"config": {"variant": variant, "encoder": "resnet18", "B": B, "X": X, "lambda_": None, "seed": seed},
             "model": trained.state_dict(), "in_channels": 3, "classes": ["background", "cell"]}
    rebuilt = model_from_checkpoint(state)
    (original,), (again,) = frem.attached(trained), frem.attached(rebuilt)
    again.bind(original.num_channels)
    assert (again.B, again.X, again.mode, again.seed) == (original.B, original.X, original.mode, original.seed)
    assert torch.equal(again.channels, original.channels) and not rebuilt.training
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(rebuilt(x), trained.eval()(x))


def test_evaluating_a_run_without_its_best_checkpoint_says_how_to_get_one(tmp_path):
    from frem.seg.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'best.pt'}: train the run again "
                                              f"\\(frem train --out {tmp_path}\\)"):
        evaluate_run(tmp_path)


class SignOfPixel(nn.Module):
    """Class 0 where a pixel is positive, 1 elsewhere: any shift of the labels shows. Keeps what it saw."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.conv(x)


RAW = {"mode": "dataset", "units": "raw", "mean": 0.0, "std": 1.0}


@pytest.mark.parametrize("height, width, tile, margin", [(45, 50, 512, 64), (31, 70, 512, 64), (45, 50, 32, 8),
                                                          (3, 5, 512, 64), (40, 16, 512, 64), (16, 40, 512, 64)])
def test_predicted_labels_stay_on_their_pixels_at_any_size(height, width, tile, margin):
    """Sizes that are no multiple of 32 are padded for the network (whose five halvings need one):
    right and below only. A side no longer than its padding cannot be reflected and repeats its edge."""
    image = np.random.default_rng(1).normal(size=(height, width, 1)).astype(np.float32)
    model = SignOfPixel().eval()
    labels = predict_image(model, image, RAW, "cpu", tile=tile, margin=margin)
    assert labels.shape == (height, width) and np.array_equal(labels, (image[..., 0] <= 0).astype(labels.dtype))
    assert all(x.shape[-2] % 32 == 0 and x.shape[-1] % 32 == 0 for x in model.seen)


@pytest.mark.parametrize("height, width, numpy_mode", [(40, 50, "reflect"), (3, 5, "edge")])
def test_the_padding_is_the_image_mirrored_not_a_dark_band(height, width, numpy_mode):
    """Zeros below and right of a section are a border the network never saw in training."""
    image = np.random.default_rng(2).normal(size=(height, width, 1)).astype(np.float32)
    model = SignOfPixel().eval()
    predict_image(model, image, RAW, "cpu")
    expected = np.pad(image[..., 0], ((0, -height % 32), (0, -width % 32)), mode=numpy_mode)
    assert len(model.seen) == 1 and np.allclose(model.seen[0][0, 0].numpy(), expected)


def test_outputs_of_images_with_the_same_name_never_overwrite_each_other(tmp_path):
    from pathlib import Path

    from frem.seg.predict import output_names, palette_image
    paths = [Path("x/a/img.png"), Path("y/a/img.png"), Path("b/img.tif"), Path("c.png"), Path("d/c.png")]
    assert output_names(paths) == ["a_img_1", "a_img_2", "b_img", "c", "d_c"]
    labels = np.arange(15, dtype=np.uint8).reshape(3, 5) % 4
    image = palette_image(labels, ("a", "b", "c", "background"))
    assert image.size == (5, 3) and np.array_equal(np.array(image), labels)
