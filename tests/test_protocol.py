"""The protocol a published table rests on: which split each phase reads, when it validates, what it optimises.

Written to the behaviour: each test records what the trainer touched and
checks it against the protocol, so a bug that would make a table wrong while
training still "works" (validating on training tiles, a tuner maximising the
test score, a skipped validation) fails here.
"""

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from frem.seg import train as trainer
from frem.seg.cli import main
from frem.seg.config import QUICK, TrainConfig
from frem.seg.data.drosophila import SPLIT
from frem.seg.train import loss_fn, train


def sections(names) -> set:
    return {name.split("@")[0] for name in names}


def test_each_phase_reads_only_its_own_split(tiny_config, monkeypatch):
    """Training batches, validation (model selection), normalisation fit and the test score each read
    their own sections; nothing the model is selected or scored on was trained on."""
    touched = {"fit": set(), "evaluate": []}
    real_evaluate, real_fit, real_augment = trainer.evaluate, trainer.fit_normalization, trainer.augment
    train_tiles = []

    def evaluate(model, split, *args, **kwargs):
        touched["evaluate"].append(sections(split.names))
        return real_evaluate(model, split, *args, **kwargs)

    def fit(split, mode="image"):
        touched["fit"] |= sections(split.names)
        return real_fit(split, mode)

    def augment(images, masks, flips):
        train_tiles.append(images.clone())
        return real_augment(images, masks, flips)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    monkeypatch.setattr(trainer, "fit_normalization", fit)
    monkeypatch.setattr(trainer, "augment", augment)
    from frem.seg import evaluate as evaluation
    monkeypatch.setattr(evaluation, "evaluate", evaluate)  # the test score: evaluate_run
    config = tiny_config(epochs=3, normalize="dataset")
    data = config.load_data()
    metrics = train(config, data)
    train_sections = {f"section{s:02d}" for s in config.sections["train"]}
    val_sections = {f"section{s:02d}" for s in config.sections["val"]}
    test_sections = {f"section{s:02d}" for s in config.sections["test"]}
    assert touched["fit"] == train_sections
    assert touched["evaluate"] == [val_sections] * 3 + [test_sections]  # every epoch's validation, then the test
    trained = torch.cat(train_tiles)
    assert trained.shape[0] == 3 * len(data.train)  # every training tile once an epoch, nothing else
    for tile in torch.cat([data.val.images, data.test.images]):
        assert not any(torch.equal(tile, t) for t in trained)  # no validation or test tile in a batch
    assert metrics["data"]["train"] == len(data.train) and metrics["data"]["val"] == len(data.val)


def test_the_splits_are_disjoint_sections_in_the_default_and_the_quick_protocol():
    for split in (SPLIT, QUICK["sections"]):
        train, val, test = (set(split[name]) for name in ("train", "val", "test"))
        assert not (train & val or train & test or val & test)
    for name in ("train", "val", "test"):
        assert set(QUICK["sections"][name]) <= set(SPLIT[name])  # --quick takes a subset of each split


def test_validation_runs_every_k_epochs_and_at_the_last(tiny_config):
    metrics = train(tiny_config(epochs=5, val_every=3))  # k = 3: an epoch off by one either way shows (k = 2 hides it)
    validated = [h["epoch"] for h in metrics["history"] if "val_miou" in h]
    assert validated == [2, 4]
    assert metrics["best_epoch"] in validated


def test_the_command_line_passes_val_every_and_the_other_protocol_options(tiny_config, capsys):
    config = tiny_config()
    assert main(["train", "--quick", "--data", config.data, "--out", config.out, "--epochs", "3", "--val-every", "2",
                 "--tiles-per-section", "4", "--batch-size", "4", "--lr", "0.002", "--seed", "5", "--no-progress",
                 "--normalize", "dataset"]) == 0
    saved = json.loads((Path(config.out) / "metrics.json").read_text())["config"]
    assert (saved["val_every"], saved["epochs"], saved["lr"], saved["seed"], saved["normalize"], saved["batch_size"]) \
        == (2, 3, 0.002, 5, "dataset", 4)


def test_deep_supervision_weighs_the_main_head_by_one_minus_lambda():
    torch.manual_seed(0)
    main_logits, aux_logits = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    expected = 0.7 * F.cross_entropy(main_logits, target) + 0.3 * F.cross_entropy(aux_logits, target)
    assert torch.allclose(loss_fn((main_logits, aux_logits), target, 0.3), expected)
    assert torch.allclose(loss_fn(main_logits, target, None), F.cross_entropy(main_logits, target))


def test_resume_refuses_another_seed(tiny_config):
    config = tiny_config(epochs=1)
    train(config)
    with pytest.raises(ValueError, match=r"cannot resume .* seed=0 \(this run: 1\)"):
        train(config.with_(resume=True, epochs=2, seed=1))


def test_augmentation_is_drawn_afresh_every_epoch(tiny_config, monkeypatch):
    flips = []
    real = trainer.augment
    monkeypatch.setattr(trainer, "augment", lambda images, masks, f: flips.append(f.clone()) or real(images, masks, f))
    train(tiny_config(epochs=3))
    assert len(flips) == 3  # one batch an epoch (4 tiles, batch 4)
    assert not torch.equal(flips[0], flips[1]) and not torch.equal(flips[1], flips[2])
    again = []
    monkeypatch.setattr(trainer, "augment", lambda images, masks, f: again.append(f.clone()) or real(images, masks, f))
    train(tiny_config(epochs=3).with_(out=tiny_config().out + "-again"))
    assert all(torch.equal(a, b) for a, b in zip(flips, again))  # a pure function of (seed, epoch)


def test_the_quick_protocol_and_explicit_options(drosophila_root):
    quick = TrainConfig.build(quick=True, data=str(drosophila_root))
    assert (quick.epochs, quick.crop, quick.encoder) == (QUICK["epochs"], QUICK["crop"], QUICK["encoder"])
    explicit = TrainConfig.build(quick=True, data=str(drosophila_root), epochs=3, crop=128)
    assert (explicit.epochs, explicit.crop) == (3, 128)  # options you give win
    assert TrainConfig.build().epochs == 2000  # the paper's


def test_the_data_and_callbacks_given_to_train_are_the_ones_used(tiny_config):
    """The tuner hands train its loaded data and reports to Optuna from on_validation; a reproduction
    shows progress from on_epoch. Each is called once per validation / epoch with what the history says."""
    config = tiny_config(epochs=3, val_every=2)
    data = config.with_(tiles_per_section=2).load_data()
    validations, epochs = [], []
    metrics = train(config, data, on_validation=lambda e, m: validations.append((e, m)), on_epoch=epochs.append)
    assert [r["train_images"] for r in metrics["history"]] == [len(data.train)] * 3 != [config.tiles_per_section] * 3
    assert validations == [(r["epoch"], r["val_miou"]) for r in metrics["history"] if "val_miou" in r]
    assert [e for e, _ in validations] == [1, 2] and epochs == [0, 1, 2]


def test_frem_enhances_every_training_step_with_the_epochs_channels_and_nothing_else(tiny_config, monkeypatch):
    """A trainer that left the model in eval mode (or validated in train mode) would report a FREM run
    in which FREM never acted, or acted on the scores: the table's FREM row would be a baseline."""
    from frem.module import FREM
    enhanced = []
    real = FREM._enhance
    monkeypatch.setattr(FREM, "_enhance", lambda self, x: enhanced.append((self.channels.tolist(), x.shape[0]))
                        or real(self, x))
    config = tiny_config(epochs=2, batch_size=2)
    history = train(config)["history"]
    expected = [(r["frem_channels"], 2) for r in history for _ in range(r["train_images"] // 2)]
    assert enhanced == expected and len(expected) == 2 * config.tiles_per_section // 2
    recorded = train(config.with_(out=config.out + "-record"))["frem"]  # what metrics.json says ran
    assert [(f["epoch"], f["channels"], f["B"], f["X"]) for f in recorded] == [(1, history[-1]["frem_channels"],
                                                                                 config.B, config.X)]


def test_a_training_tile_reaches_the_model_standardised_by_its_whole_images_statistics(tmp_path, monkeypatch):
    """What `frem predict` does (the whole image standardised, then tiled) is what training does: a tile
    standardised by its own statistics would train on other inputs than those it is later asked about.
    One image, dark left half and bright right half, cut into those two tiles."""
    import numpy as np
    from PIL import Image

    from frem.seg.data.base import image_stats
    root = tmp_path / "d"
    (root / "classes.txt").parent.mkdir()
    (root / "classes.txt").write_text("cell\nbackground\n")
    rng = np.random.default_rng(0)
    image = np.concatenate([rng.integers(10, 40, (64, 64)), rng.integers(180, 250, (64, 64))], axis=1).astype(np.uint8)
    for split in ("train", "val", "test"):
        for kind, array in (("images", image), ("masks", (image > 100).astype(np.uint8))):
            (root / split / kind).mkdir(parents=True)
            Image.fromarray(array).save(root / split / kind / "a.png")
    config = TrainConfig.build(quick=True, dataset="folder", data=str(root), crop=64, out=str(tmp_path / "run"),
                               epochs=1, batch_size=1, progress=False)
    data = config.load_data()
    whole = torch.from_numpy(image_stats(image[..., None]))
    assert all(torch.equal(stats, whole) for stats in data.train.stats)  # each tile carries its image's statistics
    seen = []
    real_build = trainer.build_model

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone())
                                        if module.training else None)
        return model
    monkeypatch.setattr(trainer, "build_model", build)
    train(config, data)
    mean, std = float(whole[0, 0]), float(whole[0, 1])
    expected = sorted(float((image[:, half].astype(np.float64).mean() - mean) / std)
                      for half in (slice(0, 64), slice(64, 128)))
    assert len(seen) == 2 and sorted(float(x.mean()) for x in seen) == pytest.approx(expected, abs=1e-5)
    assert expected[0] < -0.9 and expected[1] > 0.9  # standardised by itself, each tile would have mean 0
