"""FREM in the copies and transforms a researcher's training makes of the model: weight averaging (EMA, SWA:
torch's AveragedModel, timm's ModelEmaV3, Lightning's WeightAveraging) and torch.func."""

import copy
import warnings

import pytest
import torch
from models import HandUNet
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

import frem


def draw(handle):
    expected = torch.ones(handle.num_channels)
    expected[frem.select_channels(handle.num_channels, handle.B, handle.seed, handle.epoch)] = handle.X
    return expected


def train(model, averaged, epochs, steps=2, holder=None):
    """A plain loop with an averaged copy updated after every step; every warning of the re-draws."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    said = []
    for epoch in range(epochs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frem.resample(holder if holder is not None else model, epoch)
        said += [str(w.message) for w in caught]
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(2, 1, 16, 16)).square().mean().backward()
            opt.step()
            averaged.update_parameters(model)
    return said


@pytest.mark.parametrize("use_buffers", [True, False])
def test_averaged_model_never_averages_a_draw_and_counts_only_its_own_calls(use_buffers):
    torch.manual_seed(0)
    net = HandUNet()
    handle = frem.attach(net, "middle", B=4, X=50.0, example_input=torch.randn(2, 1, 16, 16))
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
    assert train(net, ema, epochs=3) == []
    (copy_frem,) = [m for m in ema.modules() if isinstance(m, frem.FREM)]
    assert copy_frem is not handle and copy_frem.applied_by_hook
    # the copy's draw is a real draw (its own epoch's), its scale is 1 or X exactly, its counters its own
    assert torch.equal(copy_frem.scale, draw(copy_frem)) and copy_frem.channels.unique().numel() == 4
    assert int(copy_frem.calls) == 0 and int(handle.calls) == 2
    # the averaged copy is evaluated: FREM is the identity there
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(ema.eval()(x), ema.module.eval()(x))


def test_update_bn_runs_with_frem_acting_counted_apart_and_said_once_or_without_it_when_disabled():
    torch.manual_seed(0)
    net = HandUNet()
    net.dec2.insert(1, nn.BatchNorm2d(16))  # after the bottleneck: its statistics see what FREM did
    handle = frem.attach(net, "middle", B=4, X=50.0)
    swa = AveragedModel(net)
    train(net, swa, epochs=1)
    (copy_frem,) = [m for m in swa.modules() if isinstance(m, frem.FREM)]
    loader = [torch.randn(2, 1, 16, 16) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match=r"train mode with gradients off.*update_bn runs so on purpose"):
        update_bn(loader, swa)
    row = next(r for r in frem.status(swa) if r.layer == "module.middle")
    assert (row.calls, row.nograd) == (0, 3) and handle._counts["nograd"] == 0
    with_frem = swa.module.dec2[1].running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with frem.disabled(swa):
            update_bn(loader, swa)
    assert not torch.equal(with_frem, swa.module.dec2[1].running_mean)
    assert copy_frem._counts["nograd"] == 3  # disabled: not enhanced, not counted


class WithEMA(nn.Module):
    """A LightningModule-like holder: the network and its EMA copy as submodules."""

    def __init__(self):
        super().__init__()
        self.net = HandUNet()
        frem.attach(self.net, "middle", B=4, X=50.0)
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    def forward(self, x):
        return self.net(x)


def test_an_ema_submodule_neither_warns_falsely_nor_hides_a_real_idle_frem_and_status_names_both_apart():
    torch.manual_seed(0)
    holder = WithEMA()
    assert train(holder.net, holder.ema, epochs=3, holder=holder) == []  # the EMA copy never trains: no alarm
    rows = frem.status(holder)
    assert [r.layer for r in rows] == ["net.middle", "ema.module.middle"]
    assert [r.calls for r in rows] == [2, 0]
    # a real idle FREM is still caught, and named by its path
    holder.net.spare = nn.Conv2d(32, 32, 1)
    frem.attach(holder.net, "spare", B=2, X=3.0)
    said = train(holder.net, holder.ema, epochs=2, holder=holder)
    assert len(said) == 1 and "FREM at 'net.spare' never ran" in said[0]


def test_timm_model_ema_v3_copies_frem_without_averaging_it():
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    net = HandUNet()
    frem.attach(net, "middle", B=4, X=50.0, example_input=torch.randn(2, 1, 16, 16))
    ema = ModelEmaV3(net, decay=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    for epoch in range(2):
        frem.resample(net, epoch)
        opt.zero_grad()
        net.train()(torch.randn(2, 1, 16, 16)).square().mean().backward()
        opt.step()
        ema.update(net)
    (copy_frem,) = [m for m in ema.module.modules() if isinstance(m, frem.FREM)]
    assert torch.equal(copy_frem.scale, draw(copy_frem)) and int(copy_frem.calls) == 0


def test_lightning_weight_averaging_trains_with_frem_and_averages_no_draw(tmp_path):
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import WeightAveraging
    from test_lightning import quiet_trainer

    class Lit(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = HandUNet()
            frem.attach(self.net, "middle", B=4, X=50.0, example_input=torch.randn(2, 1, 16, 16))

        def training_step(self, batch, _):
            return self.net(batch).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    lit = Lit()
    data = torch.utils.data.DataLoader(torch.randn(4, 1, 16, 16), batch_size=2)
    averaging = WeightAveraging(use_buffers=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        quiet_trainer(tmp_path, 3, [frem.integrations.lightning.FREMResample(), averaging]).fit(lit, data)
    handle = frem.attached(lit)[0]
    (copy_frem,) = [m for m in averaging._average_model.modules() if isinstance(m, frem.FREM)]
    assert torch.equal(handle.scale, draw(handle)) and torch.equal(copy_frem.scale, draw(copy_frem))
    assert handle.epoch == 2 and int(handle.calls) == 2


def test_frem_runs_under_torch_func_grad_vmap_and_functional_call():
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    net = HandUNet()
    handle = frem.attach(net, "middle", B=4, X=50.0, example_input=torch.randn(2, 1, 16, 16))
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(3, 1, 16, 16)

    def loss(p, batch):
        return functional_call(net, p, (batch,)).square().mean()

    net.train()
    grads = grad(loss)(params, x)
    expected = torch.autograd.grad(net(x).square().mean(), list(net.parameters()))
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads.values(), expected))
    per_sample = vmap(grad(lambda p, one: loss(p, one[None])), in_dims=(None, 0))(params, x)
    assert per_sample["head.weight"].shape == (3, *net.head.weight.shape)
    assert torch.allclose(per_sample["head.weight"].mean(0), grads["head.weight"], atol=1e-5)
    with torch.no_grad():
        plain = functional_call(net, params, (x,))  # train mode, no transform: FREM acts as in net(x)
        assert torch.equal(plain, net(x))
    # every training call counted, transformed or not (vmap calls once, batched); the no-grad ones apart
    row = frem.status(net)[0]
    assert (row.calls, row.nograd) == (3, 2)
    assert torch.equal(handle.scale, draw(handle))


def test_a_deep_copy_of_a_model_holds_its_own_frem_and_a_frem_copied_alone_is_detached():
    net = HandUNet()
    handle = frem.attach(net, "middle", B=4, X=50.0)
    net.train()(torch.randn(2, 1, 16, 16))
    twin = copy.deepcopy(net)
    (copied,) = frem.attached(twin)
    assert copied._target_ref() is twin.middle and copied._root_ref() is twin and int(copied.calls) == 0
    alone = copy.deepcopy(handle)
    assert not alone.applied_by_hook and alone._root_ref is None
    with pytest.warns(RuntimeWarning, match="gradients off"), torch.no_grad():
        net.train()(torch.randn(2, 1, 16, 16))  # a train-mode pass without gradients, said and counted
    later = copy.deepcopy(net)
    assert frem.status(net)[0].nograd == 1 and frem.status(later)[0].nograd == 0  # the copy made none
    with pytest.warns(RuntimeWarning, match="gradients off"), torch.no_grad():
        later.train()(torch.randn(2, 1, 16, 16))  # and says it for itself
    assert frem.detach(twin) == 1 and frem.attached(net) == [handle]
