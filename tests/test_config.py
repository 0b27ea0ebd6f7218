"""A run's settings: which values are refused, which win, and what a resumed or re-run variant keeps.

Wrong here means a run that trains something other than what its checkpoint says, or a resume
that silently changes the protocol, so each rule is checked at its boundary.
"""

from pathlib import Path

import pytest

from frem.seg.config import QUICK, RESUMABLE, TrainConfig
from frem.seg.data import DataError
from frem.seg.variants import VARIANT_DEFAULTS


@pytest.mark.parametrize("setting, refused, accepted", [
    ("epochs", 0, 1), ("batch_size", 0, 1), ("val_every", 0, 1),
    ("lr", 0.0, 1e-9), ("crop", 16, 32), ("crop", 48, 64), ("crop", 0, 288),
    ("normalize", "percentile", "dataset"), ("keep", "last", "best"),
])
def test_each_setting_is_refused_past_its_bound_and_accepted_at_it(setting, refused, accepted):
    with pytest.raises(ValueError, match=f"--{setting.replace('_', '-')} "):
        TrainConfig.build(**{setting: refused})
    assert getattr(TrainConfig.build(**{setting: accepted}), setting) == accepted


def test_an_unknown_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown settings: colour"):
        TrainConfig.build(colour="blue")


def test_given_settings_win_over_quick_and_none_means_not_given():
    config = TrainConfig.build(quick=True, epochs=3, lr=None)
    assert config.quick and config.epochs == 3 and config.lr == QUICK["lr"]
    assert config.sections == QUICK["sections"] and config.encoder == QUICK["encoder"]
    assert not TrainConfig.build().quick and TrainConfig.build().sections is None


def test_the_variants_defaults_become_explicit_and_given_values_win():
    assert (TrainConfig.build().B, TrainConfig.build().X) == (VARIANT_DEFAULTS["frem"]["B"], VARIANT_DEFAULTS["frem"]["X"])
    assert (TrainConfig.build(B=162, X=632.0).B, TrainConfig.build(B=162, X=632.0).X) == (162, 632.0)
    assert TrainConfig.build(variant="supervision").lambda_ == VARIANT_DEFAULTS["supervision"]["lambda_"]
    assert (TrainConfig.build(variant="baseline").B, TrainConfig.build(variant="dropout").X) == (None, None)


@pytest.mark.parametrize("variant, given, named", [
    ("baseline", {"B": 5}, "--B"), ("dropout", {"X": 10.0}, "--X"), ("frem", {"lambda_": 0.3}, "--lambda"),
    ("shallow", {"B": 5, "X": 10.0}, "--B, --X"),
])
def test_a_setting_the_variant_does_not_take_is_refused_not_recorded(variant, given, named):
    """Recorded, it would read as if it had acted (a baseline 'with B=5')."""
    with pytest.raises(ValueError, match=f"^{named} has no effect on --variant {variant};.*supervision \\(lambda\\), dropout \\(B\\), frem \\(B, X\\)"):
        TrainConfig.build(variant=variant, **given)


def test_another_variant_keeps_the_protocol_and_takes_its_own_settings():
    frem = TrainConfig.build(quick=True, B=162, X=632.0, epochs=5)
    dropout = frem.for_variant("dropout", seed=3, out="elsewhere")
    assert (dropout.variant, dropout.B, dropout.X, dropout.lambda_) == ("dropout", VARIANT_DEFAULTS["dropout"]["B"], None, None)
    assert (dropout.epochs, dropout.sections, dropout.encoder, dropout.seed, dropout.out) == (5, frem.sections, frem.encoder, 3, "elsewhere")
    assert frem.for_variant("frem").B == VARIANT_DEFAULTS["frem"]["B"]  # the variant's default, not the searched value
    assert (frem.B, frem.variant) == (162, "frem")  # the original is untouched
    supervision = TrainConfig.build(quick=True, variant="supervision", lambda_=0.3)
    assert supervision.for_variant("frem").lambda_ is None  # the search's lambda is not FREM's, nor refused


def test_a_checkpoint_config_round_trips_and_ignores_settings_it_does_not_know():
    config = TrainConfig.build(quick=True, B=20, seed=4)
    assert TrainConfig.from_dict({**config.to_dict(), "from_a_newer_frem": 1}) == config


def test_differences_name_the_settings_that_matter_and_skip_the_resumable_ones():
    config = TrainConfig.build(quick=True)
    resumable = {name: value for name, value in
                 {"epochs": 99, "val_every": 2, "device": "cpu", "resume": True, "out": "x", "progress": False,
                  "data": "/elsewhere", "keep": "best"}.items()}
    assert set(resumable) == set(RESUMABLE)
    assert config.differences(config.with_(**resumable)) == []
    assert config.differences(config.with_(seed=1, lr=0.5)) == ["lr=0.5 (this run: 0.001)", "seed=1 (this run: 0)"]
    # JSON gives lists where the config had tuples: not a difference
    as_lists = config.with_(sections={k: list(v) for k, v in config.sections.items()})
    assert config.differences(as_lists) == []
    assert config.differences(config.with_(sections={**config.sections, "val": ["slice19"]})) != []


@pytest.mark.parametrize("lambda_, accepted", [(0.0, True), (1.0, True), (0.2, True), (-0.01, False), (1.01, False),
                                               (1.5, False)])
def test_lambda_is_a_weight_in_zero_to_one_and_the_given_one_wins(lambda_, accepted):
    if not accepted:
        with pytest.raises(ValueError, match=f"lambda must lie in \\[0, 1\\], got {lambda_}"):
            TrainConfig.build(variant="supervision", lambda_=lambda_)
    else:
        assert TrainConfig.build(variant="supervision", lambda_=lambda_).lambda_ == lambda_


def test_a_run_loads_its_data_set_tiled_and_split_as_its_settings_say(drosophila_root, tmp_path):
    sections = {"train": [0, 1], "val": [2], "test": [12]}
    config = TrainConfig.build(quick=True, data=str(drosophila_root), crop=32, tiles_per_section=3, sections=sections)
    data = config.load_data()
    assert Path(data.root) == Path(drosophila_root).resolve()  # (the data's own path, links resolved)
    assert {name: tuple(split.images.shape) for name, split in data.splits().items()} == {
        "train": (6, 1, 32, 32), "val": (3, 1, 32, 32), "test": (3, 1, 32, 32)}
    moved = config.with_(data=str(tmp_path / "gone")).load_data(drosophila_root)  # the folder moved
    assert moved.checksum == data.checksum and moved.train.names == data.train.names
    with pytest.raises(DataError, match="--dataset folder needs --data DIR"):
        config.with_(dataset="folder", data=None).load_data()
