"""The Lightning callback re-draws FREM's channels every epoch of a real Trainer.fit."""

import pytest
import torch
from models import HandUNet
from torch import nn

import frem

lightning = pytest.importorskip("lightning")
from frem.integrations.lightning import FREMResample  # noqa: E402


class Segmenter(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = HandUNet()
        frem.attach(self.net, "bottleneck", B=4, X=50.0, example_input=torch.randn(1, 1, 16, 16))
        self.drawn = []

    def training_step(self, batch, _index):
        if not self.drawn or self.drawn[-1][0] != self.current_epoch:
            self.drawn.append((self.current_epoch, frem.attached(self.net)[0].channels.tolist()))
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def quiet_trainer(tmp_path, epochs, callbacks, logger=False):
    """A CPU Trainer that writes nothing but what the test asks for (no checkpoints, bars or summaries)."""
    return lightning.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                             callbacks=callbacks)


def test_trainer_fit_redraws_each_epoch(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 16, 16), torch.randint(0, 2, (8, 16, 16)))
    model = Segmenter()
    trainer = quiet_trainer(tmp_path, 3, [FREMResample()])
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert [epoch for epoch, _ in model.drawn] == [0, 1, 2]
    for epoch, channels in model.drawn:
        assert channels == frem.select_channels(32, 4, 0, epoch).tolist()
    assert len({tuple(c) for _, c in model.drawn}) == 3


def test_status_after_fit_and_a_frem_off_the_forward_path_warns_during_fit(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 16, 16), torch.randint(0, 2, (8, 16, 16)))
    model = Segmenter()
    model.net.spare = nn.Conv2d(32, 32, 1)  # built, never called by the forward
    frem.attach(model.net, "spare", B=4, X=50.0)
    trainer = quiet_trainer(tmp_path, 2, [FREMResample()])
    with pytest.warns(RuntimeWarning, match=r"FREM at '(net\.)?spare' never ran"):
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    bottleneck, spare = frem.status(model)
    assert (bottleneck.calls, bottleneck.epoch, spare.calls) == (2, 1, 0)  # two batches in the last epoch


def test_diagnostics_log_the_premise_to_the_trainers_logger_every_epoch(tmp_path):
    import csv
    import math

    from lightning.pytorch.loggers import CSVLogger

    from frem.integrations.lightning import FREMDiagnostics
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 16, 16), torch.randint(0, 2, (8, 16, 16)))
    model = Segmenter()
    diagnostics = FREMDiagnostics(torch.randn(1, 1, 16, 16), network=model.net)
    trainer = quiet_trainer(tmp_path, 3, [FREMResample(), diagnostics], logger=CSVLogger(tmp_path))
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert [row["epoch"] for row in diagnostics.history] == [0, 1, 2]
    assert (diagnostics.premise.bottleneck.layer, diagnostics.premise.skip.layer) == ("middle", "enc2")
    (metrics,) = tmp_path.glob("lightning_logs/version_0/metrics.csv")
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("frem/bottleneck")]
    assert len(rows) == 3
    for row, recorded in zip(rows, diagnostics.history):
        for key in ("bottleneck", "skip", "enhanced", "other", "gradient_ratio"):
            assert math.isclose(float(row[f"frem/{key}"]), recorded[key], rel_tol=1e-6)


def test_a_tpe_search_whose_trials_are_trainer_fit_runs_with_pruning(tmp_path):
    import optuna

    import frem.search
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 16, 16), torch.randint(0, 2, (8, 16, 16)))
    val_x, val_y = torch.randn(4, 1, 16, 16), torch.randint(0, 2, (4, 16, 16))

    class Report(lightning.Callback):  # the user's validation, handed to the pruner each epoch
        def __init__(self, trial):
            self.trial = trial

        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                score = -float(nn.functional.cross_entropy(pl_module.net.eval()(val_x), val_y))
            pl_module.net.train()
            self.trial.set_user_attr("epochs", trainer.current_epoch + 1)
            frem.search.report(self.trial, score, trainer.current_epoch)

    def objective(trial):
        model = Segmenter()
        frem.detach(model.net)
        (handle,) = frem.search.attach_trial(model.net, trial, example_input=val_x[:1])
        trainer = quiet_trainer(tmp_path, 3, [FREMResample(), Report(trial)])
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
        assert handle.epoch == 2
        return -float(nn.functional.cross_entropy(model.net.eval()(val_x), val_y))

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for name, pruner, state, epochs in (("full", optuna.pruners.NopPruner(), optuna.trial.TrialState.COMPLETE, 3),
                                        ("pruned", optuna.pruners.ThresholdPruner(lower=1e9),
                                         optuna.trial.TrialState.PRUNED, 1)):
        study = optuna.create_study(direction="maximize", storage=storage, study_name=name,
                                    sampler=optuna.samplers.TPESampler(seed=0), pruner=pruner)
        study.optimize(objective, n_trials=2)
        assert [t.state for t in study.trials] == [state, state]
        assert [t.user_attrs["epochs"] for t in study.trials] == [epochs, epochs]
        assert all(1 <= t.params["B"] <= 32 and 1 <= t.params["X"] <= 1e4 for t in study.trials)


def test_two_sites_and_a_warm_up_epoch_with_frem_disabled_inside_fit(tmp_path):
    import warnings
    from contextlib import nullcontext

    class WarmUp(Segmenter):  # FREM off in the first epoch, in train mode; two sites of their own after
        def __init__(self):
            super().__init__()
            frem.attach(self.net, "enc2", B=2, X=5.0, seed=9)
            self.calls = []

        def training_step(self, batch, index):
            with frem.disabled(self.net) if self.current_epoch == 0 else nullcontext():
                return super().training_step(batch, index)

        def on_train_epoch_end(self):
            self.calls.append([row.calls for row in frem.status(self.net)])

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 16, 16), torch.randint(0, 2, (8, 16, 16)))
    model = WarmUp()
    trainer = quiet_trainer(tmp_path, 3, [FREMResample()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the disabled epoch is not an idle FREM
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert model.calls == [[0, 0], [2, 2], [2, 2]]
    (deep, skip) = frem.attached(model.net)
    assert (deep.layer, skip.layer, skip.channels.tolist()) == ("middle", "enc2", frem.select_channels(16, 2, 9, 2).tolist())
