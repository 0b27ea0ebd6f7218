"""FREM in MONAI's own training engine: SupervisedTrainer with frem.integrations.monai.FREMResample, two epochs on CPU."""

import os

import pytest
import torch

import frem

if os.environ.get("CI"):
    import ignite  # noqa: F401  (CI installs the monai extra: run, never skip)
else:
    pytest.importorskip("ignite", reason='needs the monai extra: pip install -e ".[monai]"')
monai = pytest.importorskip("monai")
from ignite.engine import Events  # noqa: E402
from monai.engines import SupervisedTrainer  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402


def make_trainer(network, epochs, handlers):
    torch.manual_seed(0)
    data = [{"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 2, (2, 1, 32, 32))} for _ in range(3)]
    return SupervisedTrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=data, network=network,
                             optimizer=torch.optim.SGD(network.parameters(), lr=1e-2),
                             loss_function=DiceCELoss(to_onehot_y=True, softmax=True), train_handlers=handlers)


def test_the_engine_redraws_at_every_epoch_start_and_frem_acts_in_its_iterations():
    network = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
    handle = frem.attach(network, "bottleneck", B=8, X=250.0)
    seen = []

    class Record:  # a MONAI-style handler watching each iteration
        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_STARTED, self)

        def __call__(self, engine):
            seen.append((engine.state.epoch, handle.epoch, handle.channels.tolist(), handle.training))

    trainer = make_trainer(network, 2, [frem.integrations.monai.FREMResample(), Record()])
    trainer.run()
    assert [s[:2] for s in seen] == [(1, 0)] * 3 + [(2, 1)] * 3  # ignite counts from 1, frem from 0
    for _, epoch, channels, training in seen:
        assert channels == frem.select_channels(32, 8, 0, epoch).tolist() and training
    assert seen[0][2] != seen[-1][2]


def test_a_handler_given_the_network_works_when_the_engine_holds_a_wrapper():
    network = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
    handle = frem.attach(network, "bottleneck", B=8, X=250.0)
    trainer = make_trainer(torch.nn.DataParallel(network), 1, [frem.integrations.monai.FREMResample(network)])
    trainer.run()
    assert handle.epoch == 0 and handle._resampled


def test_status_after_the_engine_ran_and_a_frem_off_the_forward_path_warns():
    network = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
    frem.attach(network, "bottleneck", B=8, X=250.0)
    network.spare = torch.nn.Conv2d(32, 32, 1)  # built, never called by the forward
    frem.attach(network, "spare", B=4, X=50.0)
    trainer = make_trainer(network, 2, [frem.integrations.monai.FREMResample()])
    with pytest.warns(RuntimeWarning, match=r"FREM at '(net\.)?spare' never ran"):
        trainer.run()
    bottleneck, spare = frem.status(network)
    assert (bottleneck.calls, bottleneck.epoch, spare.calls) == (3, 1, 0)  # three iterations in the last epoch


def test_diagnostics_put_the_premise_into_the_engines_metrics_and_plot_it(tmp_path):
    import math
    network = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
    frem.attach(network, "bottleneck", B=8, X=250.0)
    diagnostics = frem.integrations.monai.FREMDiagnostics(torch.randn(1, 1, 32, 32))
    trainer = make_trainer(network, 2, [frem.integrations.monai.FREMResample(), diagnostics])
    trainer.run()
    assert [row["epoch"] for row in diagnostics.history] == [0, 1]
    assert diagnostics.premise.skip.layer == "model.1.submodule.1.submodule.0"
    last = diagnostics.history[-1]
    assert all(math.isfinite(last[k]) for k in ("bottleneck", "skip", "enhanced", "other", "gradient_ratio"))
    assert trainer.state.metrics["frem_bottleneck"] == last["bottleneck"]
    assert trainer.state.metrics["frem_gradient_ratio"] == last["gradient_ratio"]
    from frem.diagnostics import plot
    assert plot(diagnostics.history, tmp_path / "monai.png").stat().st_size > 10_000


def test_without_ignite_the_handler_names_the_install_line(monkeypatch):
    import sys
    from frem.extras import install_command
    monkeypatch.setitem(sys.modules, "ignite.engine", None)
    for handler in (frem.integrations.monai.FREMResample(), frem.integrations.monai.FREMDiagnostics(torch.randn(1, 1, 32, 32))):
        with pytest.raises(ModuleNotFoundError, match="frem.integrations.monai needs MONAI's engines and pytorch-ignite: "):
            handler.attach(object())
    assert install_command("monai") in str(pytest.raises(ModuleNotFoundError, frem.integrations.monai.FREMResample().attach,
                                                         object()).value)


def test_a_tpe_search_whose_trials_are_engine_runs_with_pruning(tmp_path):
    import optuna

    import frem.search
    val = torch.randn(2, 1, 32, 32), torch.randint(0, 2, (2, 1, 32, 32))

    def objective(trial):
        network = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
        frem.search.attach_trial(network, trial)  # MONAI's UNet: the bottleneck and its width by name
        trainer = make_trainer(network, 3, [frem.integrations.monai.FREMResample()])

        @trainer.on(Events.EPOCH_COMPLETED)
        def report(engine):  # the user's validation, handed to the pruner each epoch
            with torch.no_grad():
                score = -float(DiceCELoss(to_onehot_y=True, softmax=True)(network.eval()(val[0]), val[1]))
            network.train()
            trial.set_user_attr("epochs", engine.state.epoch)
            frem.search.report(trial, score, engine.state.epoch - 1)

        trainer.run()
        return trial.user_attrs["epochs"]

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for name, pruner, state, epochs in (("full", optuna.pruners.NopPruner(), optuna.trial.TrialState.COMPLETE, 3),
                                        ("pruned", optuna.pruners.ThresholdPruner(lower=1e9),
                                         optuna.trial.TrialState.PRUNED, 1)):
        study = optuna.create_study(direction="maximize", storage=storage, study_name=name,
                                    sampler=optuna.samplers.TPESampler(seed=0), pruner=pruner)
        study.optimize(objective, n_trials=2)
        assert [t.state for t in study.trials] == [state, state]
        assert [t.user_attrs["epochs"] for t in study.trials] == [epochs, epochs]
        assert all(1 <= t.params["B"] <= 32 for t in study.trials)


def test_two_sites_and_an_epoch_with_frem_disabled_in_the_engine():
    import warnings
    network = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
    frem.attach(network, "bottleneck", B=8, X=250.0)
    frem.attach(network, "model.0", B=2, X=5.0, seed=9)
    calls = []

    class OffInEpochTwo:  # a user's handler: FREM off for the second epoch, in train mode
        def attach(self, engine):
            engine.add_event_handler(Events.EPOCH_STARTED, self.started)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

        def started(self, engine):
            self.off = frem.disabled(network) if engine.state.epoch == 2 else None
            if self.off is not None:
                self.off.__enter__()

        def completed(self, engine):
            if self.off is not None:
                self.off.__exit__(None, None, None)
            calls.append([row.calls for row in frem.status(network)])

    trainer = make_trainer(network, 3, [frem.integrations.monai.FREMResample(), OffInEpochTwo()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the disabled epoch is not an idle FREM
        trainer.run()
    assert calls == [[3, 3], [0, 0], [3, 3]]
