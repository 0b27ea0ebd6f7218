"""FREM under float16 autocast with a GradScaler: how nnU-Net and most GPU scripts train.

float16's maximum is 65504. FREM computes the float32 product, caps it at that
maximum (no inf reaches the loss), and reports the capped values once an
epoch, at the next re-draw. CPU autocast runs float16 too, so this runs here.
"""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import HandUNet
from torch import nn

import frem
from frem.module import FLOAT16_MAX


def reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float64 product, capped at float16's range, rounded once."""
    y = x.double() * scale.double().view((1, -1) + (1,) * (x.dim() - 2))
    return y.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_float16_forward_and_backward_match_the_capped_reference(data):
    channels = data.draw(st.integers(2, 6))
    shape = (data.draw(st.integers(1, 3)), channels, *data.draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
    magnitude = data.draw(st.sampled_from([1.0, 50.0, 2000.0]))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))  # hypothesis replays it
    x = (torch.randn(shape, dtype=torch.float64, generator=generator) * magnitude).to(torch.float16).requires_grad_(True)
    module = frem.FREM(B=data.draw(st.integers(1, channels)), X=data.draw(st.sampled_from([2.0, 250.0, 632.0, 1e4])),
                       num_channels=channels).train()
    y = module(x)
    expected = reference(x.detach(), module.scale)
    assert y.dtype == torch.float16 and torch.equal(y, expected)
    assert torch.isfinite(y).all()
    assert int(module.capped) == int((expected.abs() == FLOAT16_MAX).sum())
    grad = torch.randn(shape, dtype=torch.float64, generator=generator).to(torch.float16)
    y.backward(grad)
    # A capped value passes no gradient; one at or below the maximum does, even where float16 then
    # rounds it up to the maximum (a product in (65488, 65504]).
    product = x.detach().float() * module.scale.float().view((1, -1) + (1,) * (x.dim() - 2))  # FREM's fp32 product
    free = (product.abs() <= FLOAT16_MAX).double()
    expected_grad = (grad.double() * module.scale.double().view((1, -1) + (1,) * (x.dim() - 2)) * free)
    assert torch.equal(x.grad, expected_grad.to(torch.float16))


def batches(steps, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 1, size, size, generator=generator)
        yield x, (x[:, 0] > 0.3).long()  # a target the network can learn


def train_float16(model, X, steps, epochs=2):
    """The loop of nnU-Net's train_step, on CPU: float16 autocast, GradScaler, gradient clipping."""
    frem.attach(model, "bottleneck", B=4, X=X, example_input=torch.randn(1, 1, 16, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    for epoch in range(epochs):
        frem.resample(model, epoch)
        for x, target in batches(steps, seed=epoch):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model.train()(x), target)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
    return losses


def test_a_float16_gradscaler_run_with_the_papers_x_stays_finite_and_learns():
    torch.manual_seed(0)
    model = HandUNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing capped: no warning at any re-draw
        losses = train_float16(model, X=632.0, steps=8)
        frem.resample(model, 2)  # the last epoch's report comes with the next re-draw
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])


def test_nnunet_network_and_loss_under_float16_with_the_papers_setting():
    """nnU-Net's own network and Dice+CE loss, its train_step's float16 autocast and GradScaler."""
    reason = 'needs the nnunet extra: pip install -e ".[nnunet]"'
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet", reason=reason)
    loss_module = pytest.importorskip("nnunetv2.training.loss.compound_losses", reason=reason)
    torch.manual_seed(0)
    network = unet.PlainConvUNet(1, 4, (8, 16, 32, 64), nn.Conv2d, 3, (1, 2, 2, 2), (2,) * 4, 2, (2,) * 3, True,
                                 nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                                 {"inplace": True})
    handle = frem.attach(network, "bottleneck", B=162 / 512, X=632.0)
    assert handle.layer == "encoder.stages.3"
    loss_fn = loss_module.DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                         weight_ce=1, weight_dice=1)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    for epoch in range(2):
        frem.resample(network, epoch)
        for x, target in batches(4, size=32, seed=epoch):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = loss_fn(network.train()(x), target[:, None])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert int(handle.capped) == 0


def test_an_overflowing_x_is_capped_and_named_at_the_next_redraw_not_a_silent_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    handle = frem.attach(model, "1", B=8, X=1e6)  # every positive feature x 1e6 passes 65504
    seen = []
    model[2].register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    with torch.autocast("cpu", dtype=torch.float16):
        model.train()(torch.rand(2, 1, 8, 8) + 1.0)
    (enhanced,) = seen
    assert enhanced.dtype == torch.float16
    assert torch.isfinite(enhanced).all() and enhanced.max() == FLOAT16_MAX  # capped, not inf
    first = int((enhanced.abs() == FLOAT16_MAX).sum())
    assert first > 0 and int(handle.capped) == first and handle.capped.dtype == torch.long
    with torch.autocast("cpu", dtype=torch.float16):
        model(torch.rand(2, 1, 8, 8) + 1.0)
    assert int(handle.capped) == first + int((seen[1].abs() == FLOAT16_MAX).sum())  # summed over the epoch
    with pytest.warns(RuntimeWarning, match=r"FREM at 1 capped \d+ enhanced values at float16's maximum \(65504\) "
                                            r"in epoch 0: \|features\| x X=1e\+06 passed float16's range.*bfloat16"):
        frem.resample(model, 1)
    assert int(handle.capped) == 0  # counted afresh each epoch
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        frem.resample(model, 2)  # nothing capped since: silent


def test_an_overflow_downstream_of_frem_is_named_at_the_next_redraw():
    """FREM's output fits float16, but the next layer's sum does not: the loss is inf every step and a
    GradScaler skips every step. FREM sees the inf gradients come back and says so once an epoch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))
    with torch.no_grad():
        model[2].weight.mul_(1e3)
    handle = frem.attach(model, "1", B=4, X=600.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    for x, target in batches(4, size=8):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model.train()(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        assert not torch.isfinite(loss)
    assert int(handle.capped) == 0  # FREM's own output fits: the overflow is downstream
    said = r"FREM at 1: in 4 of 4 float16 training steps of epoch {} the gradient came back inf/NaN: .* overflow " \
           r"float16 downstream.*bfloat16"
    with pytest.warns(RuntimeWarning, match=said.format(0)):
        frem.resample(model, 1)
    for x, target in batches(4, size=8):  # the next epoch's steps are counted afresh
        with torch.autocast("cpu", dtype=torch.float16):
            nn.functional.cross_entropy(model(x), target).backward()
    with pytest.warns(RuntimeWarning, match=said.format(1)):
        frem.resample(model, 2)


@pytest.mark.parametrize("overflowed, alarm", [(1, False), (4, False), (5, True)])
def test_a_few_skipped_steps_while_the_gradscaler_settles_are_no_alarm_most_steps_are(overflowed, alarm):
    torch.manual_seed(0)
    model = HandUNet()
    frem.attach(model, "bottleneck", B=4, X=632.0, example_input=torch.randn(1, 1, 16, 16))
    handle = frem.attached(model)[0]
    handle.overflowed += overflowed  # of eight steps: GradScaler's own calibration skips one or two
    handle._float16_steps = 8
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", RuntimeWarning)
        frem.resample(model, 1)
    assert [str(w.message).split(" the gradient")[0] for w in said] == \
        ([f"FREM at {handle.layer}: in {overflowed} of 8 float16 training steps of epoch 0"] if alarm else [])


def test_bfloat16_and_float32_need_no_cap():
    module = frem.FREM(B=2, X=1e6, num_channels=2).train()
    for dtype in (torch.bfloat16, torch.float32):
        y = module(torch.full((1, 2, 2, 2), 1.0, dtype=dtype))
        assert y.dtype == dtype and y.max() == torch.tensor(1e6, dtype=dtype)
    assert int(module.capped) == 0


def test_float16_channels_last_is_scaled_along_its_channels():
    """The float16 path (capped at its maximum) scales the channels in dim -1 as the float32 path does."""
    module = frem.FREM(3, 4.0, dim=-1).train()
    x = torch.randn(2, 5, 6, 8).half()  # (N, H, W, C): channels last, H and W unlike C
    y = module(x)
    scale = torch.ones(8)
    scale[module.channels] = 4.0
    assert module.num_channels == 8 and y.dtype == torch.float16
    assert torch.equal(y, (x.float() * scale).half())
