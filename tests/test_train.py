"""The trainer end to end on a slice of the real Drosophila data (CPU)."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from test_data import make_folder_dataset

from frem.seg import checkpoint
from frem.seg.cli import main
from frem.seg.evaluate import evaluate_run
from frem.seg.models import build_model
from frem.seg.variants import VARIANT_DEFAULTS, VARIANTS
from frem.seg.train import augment, run_training, train


def test_quick_run_writes_metrics_with_all_four_classes(tiny_config, tmp_path):
    config = tiny_config(epochs=2)
    metrics = train(config)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["variant"] == "frem"
    assert set(written["test"]["iou"]) == {"membrane", "mitochondria", "synapse", "background"}
    present = [v for v in written["test"]["iou"].values() if v is not None]
    assert written["test"]["miou"] == pytest.approx(sum(present) / len(present))
    assert written["best_epoch"] in (0, 1) and len(written["history"]) == 2
    epoch = written["history"][-1]
    for key in ("train_loss", "val_miou", "bottleneck_mean", "skip_mean", "enhanced_mean",
                "other_mean", "frem_channels", "epoch_time_s"):
        assert key in epoch, key
    assert set(epoch["val_iou"]) == set(written["test"]["iou"])  # per class, beside the mean
    measured = [v for v in epoch["val_iou"].values() if v is not None]
    assert epoch["val_miou"] == pytest.approx(sum(measured) / len(measured))
    assert len(epoch["frem_channels"]) == 8
    assert written["history"][0]["frem_channels"] != epoch["frem_channels"]  # re-drawn per epoch
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    assert metrics["test"] == written["test"]
    times = [h["epoch_time_s"] for h in written["history"]]
    assert 0 < min(times) and max(times) < written["wall_time_s"]
    assert written["median_epoch_time_s"] == sorted(times)[1]
    last, best = checkpoint.load(tmp_path / "run" / "last.pt"), checkpoint.load(tmp_path / "run" / "best.pt")
    assert last["epoch"] == 1 and last["normalization"] == best["normalization"]  # last.pt is a whole model too


def test_a_run_records_the_settings_it_trained_with_when_not_the_defaults(tiny_config, tmp_path):
    metrics = train(tiny_config(variant="frem", B=4, X=10.0, seed=5))
    assert metrics["settings"] == {"B": 4, "X": 10.0}
    assert [(f["B"], f["X"], f["seed"]) for f in metrics["frem"]] == [(4, 10.0, 5)]
    metrics = train(tiny_config(variant="supervision", lambda_=0.25, out=str(tmp_path / "s")))
    assert metrics["settings"] == {"lambda_": 0.25}  # the loss reads its lambda from here


def test_evaluate_reproduces_the_test_metrics(tiny_config, tmp_path, capsys):
    metrics = train(tiny_config())
    assert evaluate_run(tmp_path / "run") == metrics["test"]
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["split"], printed["checkpoint"]) == ("test", "best.pt")
    assert {k: printed[k] for k in ("iou", "miou")} == metrics["test"]


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_config, tmp_path):
    straight = run_training(tiny_config(epochs=2, out=str(tmp_path / "straight")))[1]
    # "killed" after the first epoch's checkpoint, then resumed to the end
    run_training(tiny_config(epochs=1, out=str(tmp_path / "resumed")))
    resumed = run_training(tiny_config(epochs=2, out=str(tmp_path / "resumed"), resume=True))[1]
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    history = checkpoint.load(tmp_path / "resumed" / "last.pt")["state"]["history"]
    assert [h["epoch"] for h in history] == [0, 1]


def test_a_run_is_never_overwritten_and_resume_checks_the_settings(tiny_config):
    train(tiny_config())
    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        train(tiny_config())
    with pytest.raises(ValueError, match=r"cannot resume .*X=250.0 \(this run: 100.0\)"):
        train(tiny_config(X=100.0, epochs=2, resume=True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains(variant, tiny_config):
    metrics = train(tiny_config(variant=variant, tiles_per_section=2, batch_size=2))
    assert math.isfinite(metrics["history"][0]["train_loss"])
    assert metrics["variant"] == variant and metrics["settings"] == VARIANT_DEFAULTS[variant]
    assert metrics["device"] == "cpu"
    attached = metrics["frem"]
    if variant.startswith("frem"):  # the record says where FREM acted and how to draw its channels again
        assert [(f["layer"], f["B"], f["X"], f["mode"], f["seed"]) for f in attached] == [
            ("encoder", VARIANT_DEFAULTS[variant]["B"], VARIANT_DEFAULTS[variant]["X"],
             "fixed" if variant == "frem-fixed" else "random", metrics["config"]["seed"])]
    else:
        assert attached == []


def test_variants_differ_where_the_paper_says():
    kwargs = dict(encoder="resnet18", in_channels=1, classes=4)
    assert build_model("baseline", **kwargs).encoder.out_channels[-1] == 512
    assert build_model("shallow", **kwargs).encoder.out_channels[-1] == 256
    dropout = build_model("dropout", B=8, **kwargs)
    assert dropout.bottleneck_dropout.p == pytest.approx(8 / 512)
    assert build_model("dropout", B=512, **kwargs).bottleneck_dropout.p == 1.0  # the search space's upper end
    with pytest.raises(ValueError, match=r"B=513 must lie in \[1, 512\]"):
        build_model("dropout", B=513, **kwargs)
    supervision = build_model("supervision", **kwargs).train()
    main_logits, aux = supervision(torch.randn(2, 1, 64, 64))
    assert aux.shape == main_logits.shape == (2, 4, 64, 64)
    assert supervision.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 4, 64, 64)
    fixed = build_model("frem-fixed", **kwargs).frem_encoder
    assert (fixed.B, fixed.X, fixed.mode) == (10, 10000.0, "fixed")


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_dropout_variant_draws_at_random_in_a_training_step(variant):
    """Each variant carries its own regulariser and no other's: a stray Dropout2d (or aux head) in the
    baseline would make the table compare regularised models with each other."""
    model = build_model(variant, encoder="resnet18", in_channels=1, classes=4).train()
    x = torch.randn(2, 1, 64, 64)
    first, second = model(x), model(x)
    same = [torch.equal(a, b) for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (first, second)))]
    assert same == ([False] if variant == "dropout" else [True, True] if variant == "supervision" else [True])
    assert (model.bottleneck_dropout is not None, model.aux_head is not None) == (variant == "dropout",
                                                                                   variant == "supervision")


def test_augment_applies_one_symmetry_to_image_and_mask_alike():
    images = torch.arange(2 * 16, dtype=torch.uint8).view(2, 1, 4, 4)
    masks = images[:, 0] % 3
    flips = torch.tensor([[True, False], [True, True], [False, True]])
    out_i, out_m = augment(images, masks, flips)
    assert torch.equal(out_m, out_i[:, 0] % 3)
    assert torch.equal(out_i[0, 0], images[0, 0].flip(-1).flip(-2))
    assert torch.equal(out_i[1, 0], images[1, 0].flip(-2).transpose(-1, -2))
    assert sorted(out_i.flatten().tolist()) == sorted(images.flatten().tolist())


@pytest.mark.parametrize("colour", [False, True])
def test_folder_dataset_trains(colour, tmp_path):
    from PIL import Image
    root = make_folder_dataset(tmp_path / "cells", size=64)
    for path in root.glob("*/images/*.png") if colour else ():  # stained sections: RGB
        Image.open(path).convert("RGB").save(path)
    from frem.seg.config import TrainConfig
    config = TrainConfig.build(quick=True, dataset="folder", data=str(root), crop=None,
                               out=str(tmp_path / "run"), epochs=1, batch_size=2, progress=False)
    metrics = train(config)
    assert set(metrics["test"]["iou"]) == {"cell", "nucleus", "background"}
    assert checkpoint.load(tmp_path / "run" / "best.pt")["in_channels"] == (3 if colour else 1)


def test_a_run_on_a_folder_says_its_size_and_an_estimate_and_evaluate_after_val_was_deleted_only_refuses(
        tmp_path, capsys):
    """Training says how many images and tiles it uses, and how long an epoch will take, before it is long
    under way; evaluation of a run whose folder lost its val/ says only that the data changed."""
    import shutil

    from frem.seg.cli import main
    root = make_folder_dataset(tmp_path / "cells", size=128, count=4)
    assert main(["train", "--quick", "--data", str(root), "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    said = [line.strip() for line in re.split(r"[\r\n]", capsys.readouterr().err) if "frem train:" in line]
    assert said[0] == ("frem train: 3 training images (12 tiles of 64x64 px), 1 validation image (4 tiles of "
                       "64x64 px), 1 test image (4 tiles of 64x64 px); 2 steps of 8 an epoch, 1 epoch to go")
    assert re.search(r"an epoch takes about \d+ s here \(from its first 2 steps, which include warming up\)",
                     said[1])
    shutil.rmtree(root / "val")
    assert main(["train", "--quick", "--data", str(root), "--epochs", "1", "--out", str(tmp_path / "held")]) == 0
    recorded = json.loads((tmp_path / "held" / "metrics.json").read_text())
    assert recorded["config"]["val_fraction"] == recorded["data"]["split"]["fraction"] == 0.2  # said, not null
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("frem evaluate: error: the data at") and "is not the data" in line


def test_resume_loads_the_checkpoint_on_the_cpu_whatever_the_training_device(tiny_config, monkeypatch):
    """On CUDA, RNG states loaded onto the GPU make torch.set_rng_state fail; here a meta
    device stands in for the GPU, and the checkpoint must still be read onto the CPU."""
    from frem.seg import train as trainer
    from frem.seg.distributed import Context
    train(tiny_config())
    seen = []

    class Stop(BaseException):  # not an Exception: load reports any Exception as a damaged file
        pass

    def spy(path, map_location=None, **kwargs):
        seen.append(map_location)
        raise Stop

    monkeypatch.setattr(trainer.checkpoint.torch, "load", spy)
    monkeypatch.setattr(trainer.distributed, "setup", lambda _device: (Context(), torch.device("meta")))
    with pytest.raises(Stop):
        trainer.run_training(tiny_config(epochs=2, resume=True))
    assert seen == ["cpu"]


def test_the_best_checkpoint_is_the_epoch_of_the_highest_validation_miou(tiny_config, tmp_path):
    metrics = train(tiny_config(epochs=4, lr=3e-3))
    history = [h["val_miou"] for h in metrics["history"]]
    assert len(set(history)) > 1, "the epochs must differ for this test to mean anything"
    best = max(range(len(history)), key=lambda e: (history[e], -e))  # the first of equal bests
    assert metrics["best_epoch"] == best and metrics["best_val_miou"] == history[best]
    assert checkpoint.load(tmp_path / "run" / "best.pt")["epoch"] == best


def test_on_equal_validation_scores_the_earlier_epoch_stays_best(tiny_config, tmp_path, monkeypatch):
    from frem.seg import train as trainer
    real = trainer.evaluate

    def flat(*args, **kwargs):  # the real features, and one score for every epoch
        return {**real(*args, **kwargs), "miou": 0.5}
    monkeypatch.setattr(trainer, "evaluate", flat)
    metrics = train(tiny_config(epochs=3))
    assert metrics["best_epoch"] == 0 and checkpoint.load(tmp_path / "run" / "best.pt")["epoch"] == 0


def test_resume_restores_the_random_state_the_dropout_variant_draws_from(tiny_config, tmp_path):
    """FREM's draw needs no RNG; channel dropout does, so only a restored RNG gives equal weights."""
    config = dict(variant="dropout", B=64)
    straight = run_training(tiny_config(epochs=2, out=str(tmp_path / "straight"), **config))[1]
    run_training(tiny_config(epochs=1, out=str(tmp_path / "resumed"), **config))
    torch.manual_seed(12345)  # whatever the process did in between
    resumed = run_training(tiny_config(epochs=2, out=str(tmp_path / "resumed"), resume=True, **config))[1]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_epoch_is_shuffled_differently(tiny_config, monkeypatch):
    from frem.seg import train as trainer
    seen = []
    real = trainer.augment

    def spy(images, masks, flips):
        seen.append(tuple(images.float().mean(dim=(1, 2, 3)).tolist()))
        return real(images, masks, flips)

    monkeypatch.setattr(trainer, "augment", spy)
    train(tiny_config(epochs=3, tiles_per_section=8, batch_size=8))
    assert len(seen) == 3 and len(set(seen)) == 3  # three different orders
    assert sorted(seen[0]) == sorted(seen[1]) == sorted(seen[2])  # of the same tiles


def test_evaluate_agrees_with_an_independent_iou_count(tiny_config, tmp_path):
    """The test metrics against numpy's confusion matrix of best.pt's own predictions."""
    import numpy as np

    from frem.seg.data.images import normalize
    from frem.seg.evaluate import model_from_checkpoint
    config = tiny_config(epochs=2)
    metrics = train(config)
    state = checkpoint.load(tmp_path / "run" / "best.pt")
    data = config.load_data()
    with torch.no_grad():
        x = normalize(data.test.images, state["normalization"], data.test.stats)
        predicted = model_from_checkpoint(state)(x).argmax(1)
    truth, predicted = data.test.masks.numpy().ravel().astype(int), predicted.numpy().ravel()
    confusion = np.bincount(truth * 4 + predicted, minlength=16).reshape(4, 4)
    for k, name in enumerate(data.classes):
        union = confusion[k].sum() + confusion[:, k].sum() - confusion[k, k]
        expected = confusion[k, k] / union if union else math.nan
        got = metrics["test"]["iou"][name]
        assert (math.isnan(expected) and math.isnan(got)) or abs(got - expected) < 1e-6, name


def test_a_gpu_run_checkpoints_and_restores_the_gpu_generator_as_well(monkeypatch):
    """On a GPU, dropout and FREM's draws may use the GPU's generator: a resume restores it, on the
    device the run continues on; a checkpoint from a CPU run (no GPU state) leaves it alone."""
    from frem.seg import train as trainer
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index, 7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state.tolist(), device)))
    gpu = torch.device("cuda", 1)
    state = trainer._rng_state(gpu)
    assert torch.equal(state["torch"], torch.get_rng_state()) and state["cuda"].tolist() == [1, 7]
    expected = torch.rand(3)
    torch.rand(5)
    trainer._set_rng_state(state, gpu)
    assert torch.equal(torch.rand(3), expected) and restored == [([1, 7], gpu)]
    trainer._set_rng_state({"torch": state["torch"]}, gpu)  # saved on a CPU
    trainer._set_rng_state(state, torch.device("cpu"))  # saved on a GPU, continued on the CPU
    assert restored == [([1, 7], gpu)] and "cuda" not in trainer._rng_state(torch.device("cpu"))


def test_resume_refuses_other_data_even_from_the_same_folder(tiny_config):
    """The folder may move, its content may not: a run continued on other images is two runs in one."""
    from dataclasses import replace

    config = tiny_config(epochs=1)
    data = config.load_data()
    train(config, data)
    changed = replace(data, checksum="0" * len(data.checksum))
    with pytest.raises(ValueError, match=rf"cannot resume .*: it was trained with data {re.escape(data.source)} \(now: "):
        train(config.with_(epochs=2, resume=True), changed)
    assert train(config.with_(epochs=2, resume=True), replace(data, root="/moved"))["history"][-1]["epoch"] == 1


def test_a_model_is_built_with_the_encoder_asked_for_and_the_drosophila_defaults():
    import frem
    from frem.seg.models import build_model
    model = build_model("frem", encoder="resnet18")
    assert len(model.encoder.layer3) == 2  # resnet18's, not smp's default encoder (resnet34: 6 blocks)
    assert model.encoder._in_channels == 1 and model.segmentation_head[0].out_channels == 4  # greyscale, 4 classes
    assert frem.attached(model)[0].seed == 0
    assert frem.attached(build_model("frem", encoder="resnet18", seed=3))[0].seed == 3


def test_the_dropout_variant_takes_b_as_a_count_from_one_or_as_a_fraction():
    from frem.seg.models import build_model
    assert build_model("dropout", encoder="resnet18", B=1).bottleneck_dropout.p == pytest.approx(1 / 512)
    assert build_model("dropout", encoder="resnet18", B=0.25).bottleneck_dropout.p == pytest.approx(0.25)


def test_a_non_square_tile_is_flipped_but_never_transposed():
    from frem.seg.train import augment
    images = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    masks = (images[:, 0] % 4).to(torch.uint8)
    flips = torch.tensor([[True, False], [True, False], [True, True]])  # h, v, transpose per tile
    out_images, out_masks = augment(images, masks, flips)
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert torch.equal(out_images[0], images[0].flip(-1).flip(-2)) and torch.equal(out_images[1], images[1])
    assert torch.equal(out_masks[0], masks[0].flip(-1).flip(-2)) and torch.equal(out_masks[1], masks[1])


def test_a_last_checkpoint_without_what_resuming_needs_is_refused_in_one_line(tiny_config):
    """A last.pt from elsewhere (or cut down by hand) must not resume with a KeyError half-way."""
    config = tiny_config(epochs=1)
    train(config)
    last = Path(config.out) / checkpoint.LAST
    whole = torch.load(last, weights_only=False)
    for key in ("optimizer", "rng", "state"):
        checkpoint.save({k: v for k, v in whole.items() if k != key}, last)
        with pytest.raises(checkpoint.CheckpointError, match=rf"{re.escape(str(last))} is not a frem checkpoint "
                                                             rf"\(it lacks {key}\)"):
            train(config.with_(epochs=2, resume=True))


def test_a_run_shows_its_epochs_on_stderr_only_when_asked_counting_those_a_resumed_run_had(tiny_config, capsys):
    bar = r"frem: +\d+%\|[^|]*\| (\d+)/(\d+) \[[^]]*epoch"
    config = tiny_config(epochs=2, progress=False)
    train(config)
    assert re.findall(bar, capsys.readouterr().err) == []
    train(config.with_(epochs=3, resume=True, progress=True))
    shown = re.findall(bar, capsys.readouterr().err)
    assert shown[0] == ("2", "3") and shown[-1] == ("3", "3")


def test_variants_on_one_seed_see_the_same_tiles_in_the_same_order_and_flips(tiny_config, monkeypatch):
    """The table compares variants on the same seeds: a dropout layer drawing from torch's global RNG
    must not change which tiles, in which order and how flipped, the baseline saw."""
    from frem.seg import train as trainer
    real = trainer.augment

    def recording(images, masks, flips):
        seen.append((masks.sum((1, 2)).tolist(), flips.tolist()))
        return real(images, masks, flips)
    monkeypatch.setattr(trainer, "augment", recording)
    runs = {}
    for name, variant, seed in (("baseline", "baseline", 0), ("dropout", "dropout", 0), ("seed 1", "baseline", 1)):
        seen = []
        train(tiny_config(variant=variant, seed=seed, epochs=2, batch_size=2, out=f"{tiny_config().out}-{name}"))
        runs[name] = seen
    assert runs["baseline"] == runs["dropout"]
    tiles, flips = ([step[part] for step in runs["baseline"]] for part in (0, 1))
    assert tiles != [step[0] for step in runs["seed 1"]] and flips != [step[1] for step in runs["seed 1"]]


@pytest.mark.parametrize("tiles, steps", [(8, 2), (4, 1)])  # batches of 4
def test_the_recorded_training_loss_is_the_mean_over_the_epochs_steps(tiles, steps, tiny_config, monkeypatch):
    from frem.seg import train as trainer
    losses = []
    real = trainer.loss_fn

    def spy(*args):
        loss = real(*args)
        losses.append(loss.item())
        return loss
    monkeypatch.setattr(trainer, "loss_fn", spy)
    metrics = train(tiny_config(epochs=2, tiles_per_section=tiles, batch_size=4))
    assert len(losses) == 2 * steps
    assert [r["train_loss"] for r in metrics["history"]] == pytest.approx(
        [sum(losses[:steps]) / steps, sum(losses[steps:]) / steps], rel=1e-6)
