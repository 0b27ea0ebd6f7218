"""frem.integrations.nnunet.FREMMixin on stand-ins of nnU-Net's trainer hooks (the real nnUNetv2_train: test_nnunet.py)."""

import inspect
import json
import types

import pytest
import torch
from models import HandUNet

import frem
from frem.integrations.nnunet import FREMMixin


class Trainer:  # the parts of nnU-Net's trainer the mixin meets
    device = torch.device("cpu")
    num_input_channels = 1
    configuration_manager = types.SimpleNamespace(patch_size=(16, 16))

    def __init__(self, output_folder="."):
        self.current_epoch, self.log, self.output_folder = 0, [], str(output_folder)
        self.network = self.build_network_architecture("plans", "configuration", 1, 2)

    def on_train_end(self):
        self.log.append("ended training")

    @staticmethod
    def build_network_architecture(architecture_class_name, arch_init_kwargs, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        return HandUNet()

    def on_train_start(self):
        self.log.append("started")

    def on_train_epoch_start(self):
        self.log.append(("epoch", frem.attached(self.network)[0].epoch))

    def on_train_epoch_end(self, train_outputs):
        self.log.append(("ended", train_outputs))

    def print_to_log_file(self, *args):
        self.log.append(" ".join(str(a) for a in args))


class TrainerFREM(FREMMixin, Trainer):
    frem_layer, frem_B, frem_X = "middle", 4, 50.0


def test_the_network_is_built_with_frem_and_the_signature_nnunet_inspects_is_kept():
    assert inspect.signature(TrainerFREM.build_network_architecture) == inspect.signature(
        Trainer.build_network_architecture)
    network = TrainerFREM.build_network_architecture("a", {}, 1, 2)  # as nnUNetv2_predict calls it: on the class
    (handle,) = frem.attached(network)
    assert (handle.layer, handle._B_spec, handle.X, handle.seed) == ("middle", 4, 50.0, 0)
    assert frem.attached(Trainer.build_network_architecture("a", {}, 1, 2)) == []  # the base class is untouched


def test_epochs_redraw_and_the_status_and_the_premise_go_into_the_log(tmp_path):
    trainer = TrainerFREM(tmp_path)
    trainer.on_train_start()
    optimizer = torch.optim.SGD(trainer.network.parameters(), lr=1e-2)
    for epoch in range(2):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        optimizer.zero_grad()
        trainer.network.train()(torch.randn(2, 1, 16, 16)).square().mean().backward()
        optimizer.step()
        trainer.on_train_epoch_end([])
    trainer.on_train_end()
    assert trainer.log[0] == "started" and trainer.log[1] == ("epoch", 0)
    assert trainer.log[2] == "FREM premise: Premise(bottleneck='middle output', skip='enc2 output', deep='middle', " \
                             "shallow='enc1')"
    assert trainer.log[4] == "FREM at middle: B=4 of 32, X=50, epoch 0's draw, 1 training calls, 0 capped"
    assert trainer.log[5].startswith("FREM premise (FREM on this epoch): bottleneck ") and "gradient_ratio" in trainer.log[5]
    assert trainer.log[6] == ("epoch", 1) and trainer.log[-1] == "ended training"
    history = json.loads((tmp_path / "frem_premise.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1] and all(row["grad_deep"] > 0 for row in history)
    assert (tmp_path / "frem_premise.png").stat().st_size > 10_000


def test_the_premise_can_be_switched_off(tmp_path):
    class Quiet(TrainerFREM):
        frem_diagnostics = False

    trainer = Quiet(tmp_path)
    trainer.on_train_epoch_start()
    trainer.network.train()(torch.randn(2, 1, 16, 16))
    trainer.on_train_epoch_end([])
    trainer.on_train_end()
    assert not any("premise" in str(line) for line in trainer.log) and not (tmp_path / "frem_premise.json").exists()


def test_a_subclass_gets_its_own_settings_and_one_frem():
    class Stronger(TrainerFREM):
        frem_X, frem_seed, frem_mode = 250.0, 3, "fixed"

    network = Stronger.build_network_architecture("a", {}, 1, 2)
    (handle,) = frem.attached(network)  # the parent's wrapper is not wrapped again: one FREM
    assert (handle.X, handle.seed, handle.mode, handle._B_spec) == (250.0, 3, "fixed", 4)
    assert frem.attached(TrainerFREM.build_network_architecture("a", {}, 1, 2))[0].X == 50.0


def test_a_trainer_with_its_own_builder_gets_frem_on_that_network():
    class OwnBuilder(Trainer):
        @staticmethod
        def build_network_architecture(architecture_class_name, arch_init_kwargs, num_input_channels,
                                       num_output_channels, enable_deep_supervision: bool = True):
            network = HandUNet(width=4)
            network.custom = True
            return network

    class OwnFREM(FREMMixin, OwnBuilder):
        frem_layer = "middle"

    network = OwnFREM.build_network_architecture("a", {}, 1, 2)
    assert network.custom and frem.attached(network)[0].layer == "middle"
    network(torch.randn(1, 1, 16, 16))
    assert frem.attached(network)[0].B == round(162 / 512 * 16)


def test_a_layer_that_is_not_there_fails_when_nnunet_builds_the_network():
    class Wrong(FREMMixin, Trainer):
        frem_layer = "midle"

    with pytest.raises(ValueError, match="has no layer 'midle'; closest: middle"):
        Wrong.build_network_architecture("a", {}, 1, 2)


def test_the_environment_sets_a_search_trials_B_X_and_seed(monkeypatch):
    monkeypatch.setenv("FREM_B", "3")
    monkeypatch.setenv("FREM_X", "12.5")
    monkeypatch.setenv("FREM_SEED", "4")
    (handle,) = frem.attached(TrainerFREM.build_network_architecture("a", {}, 1, 2))
    assert (handle._B_spec, handle.X, handle.seed) == (3, 12.5, 4)
    monkeypatch.setenv("FREM_B", "0.25")
    assert TrainerFREM.frem_setting()["B"] == 0.25
    for name, value, wanted in (("FREM_X", "big", "a finite number > 0"), ("FREM_X", "-1", "a finite number > 0"),
                                ("FREM_X", "nan", "a finite number > 0"), ("FREM_B", "abc", "an integer count"),
                                ("FREM_B", "0", "an integer count"), ("FREM_SEED", "1.5", "an integer")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=rf"^{name}='{value}' in the environment is not {wanted}.*unset it"):
            TrainerFREM.build_network_architecture("a", {}, 1, 2)
        monkeypatch.delenv(name)
    for name in ("FREM_B", "FREM_X", "FREM_SEED"):
        monkeypatch.delenv(name, raising=False)
    assert TrainerFREM.frem_setting() == {"B": 4, "X": 50.0, "seed": 0}


def test_more_sites_and_epochs_with_frem_off(tmp_path):
    class Two(TrainerFREM):
        frem_also = ({"layer": "enc2", "B": 2, "X": 5.0, "seed": 9},)
        frem_off_epochs = (0,)

    trainer = Two(tmp_path)
    for epoch in range(2):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        trainer.network.train()(torch.randn(2, 1, 16, 16))
        calls = [row.calls for row in frem.status(trainer.network)]
        trainer.on_train_epoch_end([])
        assert calls == ([0, 0] if epoch == 0 else [1, 1])
    deep, skip = frem.attached(trainer.network)
    assert (deep.layer, deep.X, skip.layer, skip.X, skip.seed) == ("middle", 50.0, "enc2", 5.0, 9)
    assert not deep._paused and not skip._paused  # on again after the off epoch
