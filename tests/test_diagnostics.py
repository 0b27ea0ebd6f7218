"""frem.diagnostics.Premise: the paper's premise (Fig. 2, 9) on any network frem can locate."""

import math

import pytest
import torch
from models import HandUNet
from torch import nn

import frem
from frem.diagnostics import Premise, PremiseNotFound, plot


def x16(n=1):
    return torch.randn(n, 1, 16, 16)


def test_the_sites_of_a_hand_written_unet():
    premise = Premise(HandUNet(), x16())
    assert (premise.bottleneck.layer, premise.skip.layer, premise.deep, premise.shallow) == (
        "middle", "enc2", "middle", "enc1")


def test_activations_are_the_networks_own_before_frem_and_split_by_its_channels():
    torch.manual_seed(0)
    net = HandUNet()
    handle = frem.attach(net, "middle", B=5, X=100.0)
    premise = Premise(net, x16())
    x = x16(3)
    with torch.no_grad():
        e2 = net.enc2(net.enc1(x))
        deep = net.middle[4](net.middle[3](net.middle[2](net.middle[1](net.middle[0](e2)))))  # no hooks: bare
        with premise.recording():
            net.train()(x)  # FREM scales the bottleneck here; the premise reads it before
    stats = premise.summary()
    assert stats["bottleneck"] == pytest.approx(float(deep.abs().mean()), rel=1e-5)
    assert stats["skip"] == pytest.approx(float(e2.abs().mean()), rel=1e-5)
    per_channel = deep.abs().mean((0, 2, 3))
    chosen = torch.zeros(32, dtype=torch.bool)
    chosen[handle.channels] = True
    assert stats["enhanced"] == pytest.approx(float(per_channel[chosen].mean()), rel=1e-5)
    assert stats["other"] == pytest.approx(float(per_channel[~chosen].mean()), rel=1e-5)
    assert stats["activation_ratio"] == pytest.approx(stats["bottleneck"] / stats["skip"])
    assert math.isnan(stats["grad_deep"]) and math.isnan(stats["gradient_ratio"])  # no backward yet


def test_gradients_are_the_mean_absolute_gradient_of_each_stages_weights():
    torch.manual_seed(0)
    net = HandUNet()
    premise = Premise(net, x16())
    batches = [x16(2), x16(2)]
    stats = premise.measure(batches, gradients=lambda out: out.square().mean())
    net.zero_grad()
    sums = {"middle": 0.0, "enc1": 0.0}
    for x in batches:
        net.zero_grad()
        net(x).square().mean().backward()
        for name in sums:
            sums[name] += sum(float(p.grad.abs().sum()) for p in net.get_submodule(name).parameters())
    counts = {name: 2 * sum(p.numel() for p in net.get_submodule(name).parameters()) for name in sums}
    assert stats["grad_deep"] == pytest.approx(sums["middle"] / counts["middle"], rel=1e-5)
    assert stats["grad_shallow"] == pytest.approx(sums["enc1"] / counts["enc1"], rel=1e-5)
    assert stats["gradient_ratio"] == pytest.approx(stats["grad_deep"] / stats["grad_shallow"])


def test_hooks_leave_with_the_block_and_epochs_build_a_history(tmp_path):
    net = HandUNet()
    frem.attach(net, "middle", B=4, X=10.0)
    premise = Premise(net, x16())
    hooks = (len(net.middle._forward_hooks), len(net.enc2._forward_hooks))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
    for epoch in range(3):
        frem.resample(net, epoch)
        with premise.recording():
            for _ in range(2):
                optimizer.zero_grad()
                net(x16(2)).square().mean().backward()
                optimizer.step()
        row = premise.epoch_end(epoch)
        assert row["epoch"] == epoch and all(math.isfinite(row[k]) for k in ("bottleneck", "skip", "grad_deep"))
    assert (len(net.middle._forward_hooks), len(net.enc2._forward_hooks)) == hooks
    net(x16())
    assert math.isnan(premise.summary()["bottleneck"])  # nothing recorded outside the block
    assert [row["epoch"] for row in premise.history] == [0, 1, 2]
    path = plot(premise.history, tmp_path / "premise.png", title="HandUNet")
    assert path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="history is empty"):
        plot([], tmp_path / "empty.png")


@pytest.mark.parametrize("name, expected", [
    ("smp-unet", ("encoder", (-1,), "encoder", (4,), "encoder.layer4", "encoder.layer1")),
    ("monai-unet", ("model.1.submodule.1.submodule.1.submodule", (), "model.1.submodule.1.submodule.0", (),
                    "model.1.submodule.1.submodule.1.submodule", "model.0")),
    ("nnunet", ("encoder.stages.3", (), "encoder", (2,), "encoder.stages.3", "encoder.stages.0")),
])
def test_the_sites_on_the_libraries_networks(name, expected):
    if name == "smp-unet":
        import segmentation_models_pytorch as smp
        model, x = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=2), torch.randn(1, 1, 64, 64)
    elif name == "monai-unet":
        from monai.networks.nets import UNet
        model, x = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2)), torch.randn(1, 1, 32, 32)
    else:
        pytest.importorskip("dynamic_network_architectures", reason='needs the nnunet extra: pip install -e ".[nnunet]"')
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
        model = PlainConvUNet(1, 4, (8, 16, 32, 64), nn.Conv2d, 3, (1, 2, 2, 2), (2, 2, 2, 2), 3, (2, 2, 2), True,
                              nn.InstanceNorm2d, {"affine": True}, None, None, nn.LeakyReLU, {"inplace": True})
        x = torch.randn(1, 1, 32, 32)
    premise = Premise(model, x)
    assert (premise.bottleneck.layer, premise.bottleneck.entry, premise.skip.layer, premise.skip.entry,
            premise.deep, premise.shallow) == expected


def test_a_network_without_a_skip_is_refused_with_what_to_pass():
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(16, 2, 1))
    with pytest.raises(PremiseNotFound, match="meets no other feature path .* pass skip="):
        Premise(net, x16(), bottleneck="4")


def test_sites_can_be_named():
    premise = Premise(HandUNet(), x16(), skip="enc1", shallow="enc2")
    assert (premise.skip.layer, premise.shallow, premise.deep) == ("enc1", "enc2", "middle")


def train_epoch(net, premise, epoch, steps=2):
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    with premise.recording():
        for _ in range(steps):
            opt.zero_grad()
            net.train()(x16(2)).square().mean().backward()
            opt.step()
    return premise.epoch_end(epoch)


def test_epochs_with_frem_off_are_marked_in_the_history_and_shaded_in_the_plot(tmp_path):
    torch.manual_seed(0)
    net = HandUNet()
    frem.attach(net, "middle", B=4, X=50.0)
    premise = Premise(net, x16())
    states = []
    for epoch in range(3):
        frem.resample(net, epoch)
        if epoch == 1:
            with frem.disabled(net):
                states.append(train_epoch(net, premise, epoch)["frem"])
        else:
            states.append(train_epoch(net, premise, epoch)["frem"])
    assert states == ["on", "off", "on"] and [row["frem"] for row in premise.history] == states
    assert Premise(HandUNet(), x16()).epoch_end(0)["frem"] == "none"
    figure = plot(premise.history, tmp_path / "premise.png")
    import matplotlib.image
    pixels = matplotlib.image.imread(figure)
    grey = (abs(pixels[..., :3] - 0.88) < 0.01).all(-1)
    assert grey.mean() > 0.01  # the off epoch's band is drawn


def test_plot_leaves_the_callers_matplotlib_as_it_was_and_ignores_its_styles(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt
    backend, rc = matplotlib.get_backend(), dict(matplotlib.rcParams)
    matplotlib.rcParams.update({"font.size": 25.0, "axes.titlesize": 40.0, "lines.linewidth": 9.0})
    try:
        figures = plt.get_fignums()
        history = [{"epoch": e, "frem": "on", "bottleneck": 1.0 + e, "skip": 2.0, "enhanced": math.nan,
                    "other": math.nan, "gradient_ratio": 0.5} for e in range(3)]
        plot(history, tmp_path / "a.png")
        assert matplotlib.get_backend() == backend and plt.get_fignums() == figures
        assert matplotlib.rcParams["font.size"] == 25.0  # the caller's settings, untouched
        styled = matplotlib.image.imread(tmp_path / "a.png")
    finally:
        matplotlib.rcParams.update(rc)
    plot(history, tmp_path / "b.png")
    assert (styled == matplotlib.image.imread(tmp_path / "b.png")).all()  # drawn as with default settings
    assert not list(tmp_path.glob(".*.part"))


def test_a_frozen_stage_is_said_not_left_as_a_silent_nan():
    net = HandUNet()
    for p in net.enc1.parameters():
        p.requires_grad_(False)
    premise = Premise(net, x16())
    with pytest.warns(RuntimeWarning, match=r"the shallow stage 'enc1' has no trainable parameters \(frozen\)"):
        row = train_epoch(net, premise, 0)
    assert math.isnan(row["gradient_ratio"]) and row["grad_deep"] > 0


def test_an_example_input_that_is_not_a_batch_is_one_line_naming_it():
    for bad in ("a string", __import__("numpy").zeros((1, 1, 16, 16), "float32")):
        with pytest.raises(TypeError, match=r"^example_input must be one batch"):
            Premise(HandUNet(), bad)


def test_the_enhanced_and_other_channels_of_a_channels_last_bottleneck_are_split_along_its_channels():
    """A FREM on (N, H, W, C) tokens: the premise's per-channel means run along dim -1, not over rows."""
    class NHWC(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
            self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.mix = nn.Linear(8, 12)
            self.up = nn.ConvTranspose2d(12, 8, 2, stride=2)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            e = self.enc(x)
            deep = self.mix(self.down(e).permute(0, 2, 3, 1))
            return self.head(torch.cat([self.up(deep.permute(0, 3, 1, 2)), e], 1))

    torch.manual_seed(0)
    net, x = NHWC(), torch.randn(3, 1, 16, 24)
    handle = frem.attach(net, "mix", B=4, X=100.0, example_input=x)
    premise = Premise(net, x)
    with torch.no_grad():
        deep = net.eval().mix(net.down(net.enc(x)).permute(0, 2, 3, 1))  # eval: the bare features
        with premise.recording():
            net.train()(x)
    per_channel = deep.abs().mean((0, 1, 2))  # (12,): over N, H, W
    chosen = torch.zeros(12, dtype=torch.bool)
    chosen[handle.channels] = True
    stats = premise.summary()
    assert handle.dim == -1 and premise.bottleneck.dim == -1
    assert stats["enhanced"] == pytest.approx(float(per_channel[chosen].mean()), rel=1e-5)
    assert stats["other"] == pytest.approx(float(per_channel[~chosen].mean()), rel=1e-5)
