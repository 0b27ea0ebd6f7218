"""attach(model, "bottleneck") on the networks people train: MONAI, nnU-Net, torchvision, 2-D and 3-D.

For each: the layer it picks by name, that training scales exactly B channels
of that layer's feature map, that eval is bit-identical to the bare model and
that detach restores it. Tiny widths and 16-64 px inputs keep it CPU-fast.
"""

import re
import warnings

import pytest
import torch
from torch import nn

import frem
from frem.bottleneck import BottleneckNotFound, choose, get_entry, survey

monai_nets = pytest.importorskip("monai.networks.nets")
dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")
segmentation = pytest.importorskip("torchvision.models.segmentation")

warnings.filterwarnings("ignore", category=UserWarning, module="monai")


def monai_unet(dims=2):
    return monai_nets.UNet(dims, 1, 2, channels=(4, 8, 16, 32)[:4 if dims == 2 else 3],
                           strides=(2, 2, 2)[:3 if dims == 2 else 2])


def nnunet(dims=2, residual=False):
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    stages = 4 if dims == 2 else 3
    cls = dna.ResidualEncoderUNet if residual else dna.PlainConvUNet
    return cls(1, stages, (4, 8, 16, 32)[:stages], conv, 3, (1, 2, 2, 2)[:stages], (1,) * stages, 2,
               (1,) * (stages - 1), False, norm, None, None, None, nn.ReLU)


def x2d(size=32):
    return torch.randn(2, 1, size, size)


def x3d(size=16):
    return torch.randn(2, 1, size, size, size)


# name, builder, input, the layer attach must pick, where, entry
NETWORKS = {
    "monai-unet-2d": (lambda: monai_unet(2), x2d, "model.1.submodule.1.submodule.1.submodule", "output", ()),
    "monai-unet-3d": (lambda: monai_unet(3), x3d, "model.1.submodule.1.submodule", "output", ()),
    "monai-unet-residual": (lambda: monai_nets.UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2),
                                                    num_res_units=2),
                            x2d, "model.1.submodule.1.submodule.1.submodule", "output", ()),
    "monai-attention-unet": (lambda: monai_nets.AttentionUnet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2)),
                             x2d, "model.1.submodule.1.submodule.1.submodule", "output", ()),
    "monai-unetr": (lambda: monai_nets.UNETR(1, 2, img_size=(32, 32), feature_size=4, hidden_size=48, mlp_dim=96,
                                             num_heads=4, spatial_dims=2),
                    x2d, "decoder5", "input", (0,)),
    "monai-basicunet": (lambda: monai_nets.BasicUNet(2, 1, 2, features=(4, 4, 8, 16, 32, 4)), x2d, "down_4",
                        "output", ()),
    "monai-dynunet": (lambda: monai_nets.DynUNet(2, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                                                 upsample_kernel_size=[2, 2, 2], filters=[4, 8, 16, 32]),
                      x2d, "bottleneck", "output", ()),
    "monai-swinunetr": (lambda: monai_nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=2,
                                                     depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
                        lambda: x2d(64), "encoder10", "output", ()),
    "nnunet-plain-2d": (lambda: nnunet(2), x2d, "encoder.stages.3", "output", ()),
    "nnunet-plain-3d": (lambda: nnunet(3), x3d, "encoder.stages.2", "output", ()),
    "nnunet-residual-2d": (lambda: nnunet(2, residual=True), x2d, "encoder.stages.3", "output", ()),
    "torchvision-deeplabv3": (lambda: segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                                      num_classes=2),
                              lambda: torch.randn(2, 3, 64, 64), "backbone", "output", ("out",)),
    "torchvision-fcn": (lambda: segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=2),
                        lambda: torch.randn(2, 3, 64, 64), "backbone", "output", ("out",)),
    "torchvision-lraspp": (lambda: segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                         num_classes=2),
                           lambda: torch.randn(2, 3, 64, 64), "backbone", "output", ("high",)),
}


def outputs(model, x):
    out = model(x)
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def assert_frem_acts_exactly_at(model, handle, x, at, entry):
    """In training, the layer's feature map reaches the rest of the model with exactly B channels x X."""
    target = handle._target_ref()
    seen = {}

    def grab(key):
        def hook(_module, *args):
            value = args[-1] if at == "output" else args[0]
            seen[key] = get_entry(value, entry).detach().clone()
        return hook

    register = target.register_forward_hook if at == "output" else target.register_forward_pre_hook
    handles = [register(grab("raw"), prepend=True), register(grab("enhanced"))]
    torch.manual_seed(0)
    model.train()(x)
    for h in handles:
        h.remove()
    raw, enhanced = seen["raw"], seen["enhanced"]
    changed = (enhanced != raw).flatten(2).any(-1).any(0)
    assert changed.sum() == handle.B
    assert torch.equal(changed.nonzero().flatten(), handle.channels)
    assert torch.allclose(enhanced, raw * handle.scale.view((1, -1) + (1,) * (raw.dim() - 2)))


@pytest.mark.parametrize("name", NETWORKS)
def test_attach_finds_the_real_bottleneck(name):
    build, make_input, layer, at, entry = NETWORKS[name]
    torch.manual_seed(0)
    model, x = build(), make_input()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    with torch.no_grad():
        bare = outputs(model.eval(), x)
    handle = frem.attach(model, "bottleneck", B=2, X=7.0, example_input=x)
    assert (handle.layer, handle._at) == (layer, at)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(outputs(model.eval(), x), bare))  # eval: untouched
    assert_frem_acts_exactly_at(model, handle, x, at, entry)
    assert frem.detach(model) == 1
    assert [n for n, _ in model.named_modules()] == modules
    model.load_state_dict(initial)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(outputs(model.eval(), x), bare))


@pytest.mark.parametrize("name", [n for n in NETWORKS if not n.startswith("monai-unetr")])
def test_the_measured_rule_agrees_with_the_names(name):
    """Without the known-name rules, the survey alone lands on the same feature map."""
    build, make_input, layer, at, entry = NETWORKS[name]
    torch.manual_seed(0)
    chosen = choose(survey(build(), make_input()))
    sites = {(s.layer, s.at, s.entry) for s in (chosen.site, *chosen.also)}
    assert (layer, at, entry) in sites


def test_unetr_measured_alone_is_ambiguous_and_says_so():
    build, make_input, *_ = NETWORKS["monai-unetr"]
    with pytest.raises(BottleneckNotFound, match=r"bottleneck of the model: 4 parallel maps .*\(decoder5 input\[0\] "
                                                 r"\(2, 48, 2, 2\); encoder4 input\[0\].*encoder2 input\[0\]"):
        choose(survey(build(), make_input()))


class Preprocess(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return self.conv(x) / 10


def test_a_wrapped_model_gets_the_wrapped_bottleneck():
    torch.manual_seed(0)
    model = nn.Sequential(Preprocess(), monai_unet(2))
    handle = frem.attach(model, "bottleneck", B=2, X=7.0, example_input=x2d())
    assert handle.layer == "1.model.1.submodule.1.submodule.1.submodule"
    assert len(model) == 2 and [type(m) for m in model] == [Preprocess, type(model[1])]
    assert_frem_acts_exactly_at(model, handle, x2d(), "output", ())
    wrapped = nn.Sequential(Preprocess(), nnunet(2))  # a known-name architecture inside a wrapper
    assert frem.attach(wrapped, "bottleneck", B=2, X=7.0).layer == "1.encoder.stages.3"


def test_data_parallel_and_dynamo_wrappers_are_seen_through():
    model = monai_unet(2)
    handle = frem.attach(nn.DataParallel(model), "bottleneck", B=2, X=7.0, example_input=x2d())
    assert handle in frem.attached(model)
    model2 = nnunet(2)
    compiled = torch.compile(model2)
    assert frem.attach(compiled, "bottleneck", B=2, X=7.0).layer == "encoder.stages.3"
    assert frem.attached(compiled) == frem.attached(model2)


class FeaturesAndExtra(nn.Module):
    """A bottleneck block returning its features with an auxiliary map, as a tuple or a dict."""

    def __init__(self, dict_output: bool):
        super().__init__()
        self.dict_output = dict_output
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 16, 3, padding=1), nn.ReLU())
        self.aux = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        features = self.down(x)
        extra = self.aux(features)
        return {"features": features, "aux": extra} if self.dict_output else (features, extra)


class TwoOutputUNet(nn.Module):
    def __init__(self, dict_output=False):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.middle = FeaturesAndExtra(dict_output)
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = self.enc(x)
        out = self.middle(e)
        features, extra = (out["features"], out["aux"]) if isinstance(out, dict) else out
        up = self.up(features) + nn.functional.interpolate(extra, scale_factor=2.0)
        return self.head(torch.cat([up, e], 1))


@pytest.mark.parametrize("dict_output", [False, True], ids=["tuple", "dict"])
def test_a_block_returning_several_maps_gets_frem_on_its_features(dict_output):
    torch.manual_seed(0)
    model = TwoOutputUNet(dict_output)
    handle = frem.attach(model, "bottleneck", B=3, X=7.0, example_input=x2d(16))
    entry = ("features",) if dict_output else (0,)
    assert (handle.layer, handle.num_channels) == ("middle", 16)
    assert_frem_acts_exactly_at(model, handle, x2d(16), "output", entry)
    frem.detach(model)
    named = frem.attach(model, "middle", B=3, X=7.0)  # named: the deepest map, not the last entry
    model.train()(x2d(16))
    assert named.num_channels == 16
    assert_frem_acts_exactly_at(model, named, x2d(16), "output", entry)


def test_candidates_table_says_what_attach_picks_and_why():
    model, x = monai_unet(2), x2d()
    table = frem.candidates(model, x)
    text = str(table)
    assert text.splitlines()[0].split() == ["layer", "at", "shape", "channels", "distance", "to", "output"]
    assert re.search(r"\nmodel\.1\.submodule\.1\.submodule\.1\.submodule +output +2x32x4x4 +32 +\d+ +<- bottleneck",
                     text)
    assert "<- bottleneck: lowest resolution 4x4, most channels there (32)" in text
    assert "a concatenation" in text and "fewer channels at that resolution" in text
    assert text.splitlines()[-1] == "attach picks model.1.submodule.1.submodule.1.submodule output"
    assert table.chosen.site.layer == frem.attach(model, example_input=x, B=1, X=2.0).layer
    unetr = NETWORKS["monai-unetr"][0]()
    text = str(frem.candidates(unetr, x2d()))
    assert text.splitlines()[-1] == "attach picks decoder5 input[0]: known by name for this architecture"
    assert re.search(r"\ndecoder5 +input\[0\] +2x48x2x2 +48 +\d+ +<- bottleneck \(known by name\)", text)
    assert "parallel branch: ambiguous" in text


def test_3d_training_step_with_frem_on_monai_and_nnunet():
    for model in (monai_unet(3), nnunet(3)):
        handle = frem.attach(model, "bottleneck", B=0.5, X=50.0, example_input=x3d())
        frem.resample(model, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        out = outputs(model.train(), x3d())[0]
        loss = nn.functional.cross_entropy(out, torch.randint(0, out.shape[1], (2,) + out.shape[2:]))
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and handle.channels.numel() == handle.num_channels // 2


def test_the_nnunet_example_attaches_at_the_last_encoder_stage():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "nnunet_trainer.py"
    spec = importlib.util.spec_from_file_location("nnunet_trainer", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for dims in (2, 3):
        network = example.with_frem(nnunet(dims))
        (handle,) = frem.attached(network)
        assert handle.layer == f"encoder.stages.{3 if dims == 2 else 2}"
        assert handle.B == round(example.FREM_B * handle.num_channels)


KNOWN_BY_NAME = {  # network -> (layer, at, entry, channels) with no example input at all
    "monai-unetr": ("decoder5", "input", (0,), 48),
    "monai-dynunet": ("bottleneck", "output", (), 32),
    "nnunet-plain-2d": ("encoder.stages.3", "output", (), 32),
    "nnunet-plain-3d": ("encoder.stages.2", "output", (), 16),
    "nnunet-residual-2d": ("encoder.stages.3", "output", (), 32),
    "torchvision-deeplabv3": ("backbone", "output", ("out",), None),
    "torchvision-fcn": ("backbone", "output", ("out",), None),
    "torchvision-lraspp": ("backbone", "output", ("high",), None),
}


@pytest.mark.parametrize("name", KNOWN_BY_NAME)
def test_libraries_that_name_their_bottleneck_need_no_example_input(name):
    model = NETWORKS[name][0]()
    site = frem.locate_bottleneck(model)
    assert (site.layer, site.at, site.entry, site.channels) == KNOWN_BY_NAME[name]
    assert frem.attach(model, "bottleneck", B=2, X=7.0).layer == KNOWN_BY_NAME[name][0]
    for unknown in ("monai-unet-2d", "monai-basicunet", "monai-swinunetr"):
        assert frem.bottleneck.known_bottleneck(NETWORKS[unknown][0]()) is None, unknown


def test_timm_and_smp_encoders_are_known_by_name():
    import segmentation_models_pytorch as smp
    import timm
    features = timm.create_model("resnet18", features_only=True, pretrained=False, in_chans=1)
    assert frem.locate_bottleneck(features) == frem.Site("", "output", (-1,), 512)
    as_dict = timm.create_model("resnet18", features_only=True, pretrained=False, in_chans=1,
                                feature_cls="dict")
    assert frem.locate_bottleneck(as_dict) == frem.Site("", "output", None, 512)  # picked at the first call

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = timm.create_model("resnet18", features_only=True, pretrained=False, in_chans=1)

    assert frem.locate_bottleneck(Wrapped()) == frem.Site("encoder", "output", (-1,), 512)
    unet = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4))
    assert frem.locate_bottleneck(unet) == frem.Site("encoder", "output", (-1,), 128)


class TwoEncoders(nn.Module):
    """Two parallel encoders meeting only in the head: no single bottleneck."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.ConvTranspose2d(16, 2, 2, stride=2)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


def test_parallel_candidates_are_refused_by_attach_and_shown_in_the_table():
    with pytest.raises(BottleneckNotFound, match=r"bottleneck of TwoEncoders: 3 parallel maps share the lowest "
                                                 r"resolution and the most channels \(b output \(1, 8, 8, 8\); "
                                                 r"a output \(1, 8, 8, 8\); a\.0 output \(1, 8, 8, 8\)\)"):
        frem.attach(TwoEncoders(), B=1, X=2.0, example_input=torch.randn(1, 1, 16, 16))
    text = str(frem.candidates(TwoEncoders(), torch.randn(1, 1, 16, 16)))
    assert text.splitlines()[-1] == ("attach picks nothing: frem cannot tell which feature map is the "
                                     "bottleneck of TwoEncoders")
    assert "<-" not in text
    assert any(line.endswith("  parallel branch: ambiguous") for line in text.splitlines())


def test_the_table_is_sorted_readable_and_points_at_one_row():
    from models import HandUNet
    table = frem.candidates(HandUNet(), torch.randn(1, 1, 16, 16), limit=50)
    keys = [(c.resolution, -c.channels) for c in table]
    assert keys == sorted(keys)
    lines = str(table).splitlines()
    assert sum("<-" in line for line in lines) == 1
    assert not any(line != line.rstrip() for line in lines)
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert re.search(r"^head +output +1x2x16x16 +2 +0 +higher resolution$", rows["head"])  # the output itself
    assert re.search(r"^dec1 +output +1x8x16x16 +8 +1 +higher resolution$", rows["dec1"])
    root = frem.candidates(__import__("timm").create_model("resnet18", features_only=True, pretrained=False,
                                                           in_chans=1), torch.randn(1, 1, 64, 64))
    assert str(root).splitlines()[-1] == "attach picks <model> output[-1]: known by name for this architecture"


class Gated(nn.Module):
    """A squeeze-excitation gate (N, C, 1, 1) beside the real bottleneck."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.gate = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Sigmoid())
        self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)

    def forward(self, x):
        d = self.down(x)
        return self.up(d * self.gate(self.squeeze(d))[:, :8])


def test_gates_are_not_bottlenecks():
    table = frem.candidates(Gated(), torch.randn(1, 1, 16, 16))
    assert (table.chosen.site.layer, table.chosen.site.at) == ("up", "input")  # the gated map the decoder takes
    assert re.search(r"\ngate +output +1x16x1x1 +16 +\d+ +a gate \(every spatial size 1\)", str(table))


class TokensBeside(nn.Module):
    """A transformer-like side branch whose (N, L, D) tokens must not count as a feature map."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.tokens = nn.Linear(4, 2)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x):
        d = self.down(x)
        t = self.tokens(d.flatten(2).transpose(1, 2))  # (N, 64, 2)
        return self.up(d) + t.mean()


def test_token_sequences_are_not_candidates():
    found = survey(TokensBeside(), torch.randn(1, 1, 16, 16))
    assert "tokens" not in {c.site.layer for c in found}
    assert choose(found).site.layer == "down"


def test_one_dimensional_signals_have_a_bottleneck_too():
    model = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.Conv1d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.ConvTranspose1d(8, 2, 2, stride=2))
    assert frem.find_bottleneck(model, torch.randn(2, 1, 32)) == "2"


class SharedActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.act = nn.ReLU()  # called twice: no single place
        self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)

    def forward(self, x):
        return self.up(self.act(self.down(self.act(self.enc(x)))))


def test_a_module_called_twice_is_never_the_pick():
    found = survey(SharedActivation(), torch.randn(1, 1, 16, 16))
    assert "act" not in {s.layer for c in found for s in (c.site, *c.also)}
    chosen = choose(found).site  # the activated map, reached as the decoder's input instead
    assert (chosen.layer, chosen.at) == ("up", "input")


class NoParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool, self.up = nn.MaxPool2d(2), nn.Upsample(scale_factor=2.0)

    def forward(self, x, factor):
        return self.up(self.pool(x) * factor)


def test_the_survey_takes_several_inputs_and_needs_no_parameters():
    pool = NoParameters()
    found = survey(pool, (torch.randn(1, 3, 8, 8), 2.0))  # the graph starts at the input itself
    assert choose(found).site.describe() == "up input[0]"  # the pooled map, scaled


def test_the_table_shows_twelve_rows_unless_asked():
    model, x = monai_unet(2), x2d()
    assert len(frem.candidates(model, x)) == 12 and len(frem.candidates(model, x, limit=3)) == 3


def test_entries_are_described_and_replaced_at_any_depth():
    from collections import namedtuple

    from frem.bottleneck import Site, deepest_entry, replace_entry
    assert Site("backbone", entry=("out", 0)).describe() == "backbone output['out'][0]"
    Out = namedtuple("Out", "features extra")
    value = {"a": [torch.zeros(1), Out(torch.zeros(1), torch.zeros(2))], "b": 1}
    new = replace_entry(value, ("a", 1, 0), torch.ones(3))
    assert type(new["a"][1]) is Out and torch.equal(new["a"][1].features, torch.ones(3))
    assert torch.equal(new["a"][1].extra, torch.zeros(2)) and new["b"] == 1 and torch.equal(new["a"][0], torch.zeros(1))
    assert value["a"][1].features.numel() == 1  # the original is left as it was
    features, extra = torch.zeros(2, 8, 4), torch.zeros(2, 1, 16)  # 1-D maps: (N, C, L)
    assert deepest_entry((features, extra)) == (0,)
    assert deepest_entry((torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 4, 4))) == (0,)  # resolution, not width
    assert deepest_entry((torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))) == (1,)  # alike: the last
    assert deepest_entry(("text", 3)) is None and deepest_entry((torch.zeros(3), torch.zeros(4))) == (1,)


class LookAlike(nn.Module):
    """Modules with some of a library's attribute names, but not that library's model."""


def lookalikes():
    smp_like = LookAlike()
    smp_like.encoder = LookAlike()
    smp_like.encoder.out_channels = ["a", "b"]
    feature_info_only = LookAlike()
    feature_info_only.feature_info = type("Info", (), {"channels": lambda self: [3]})()
    dyn = LookAlike()
    dyn.bottleneck = nn.Conv2d(1, 1, 1)
    unetr = type("UNETR", (nn.Module,), {})()
    half_nnunet = LookAlike()
    half_nnunet.encoder = LookAlike()
    half_nnunet.encoder.stages = nn.Sequential(nn.Conv2d(1, 1, 1))
    half_nnunet.encoder.output_channels = [1]
    only_decoder = LookAlike()
    only_decoder.decoder = nn.Conv2d(1, 1, 1)
    tv = LookAlike()
    tv.backbone = LookAlike()
    tv.backbone.return_layers = {"layer4": "out"}
    return [smp_like, feature_info_only, nn.ModuleDict(), dyn, unetr, half_nnunet, only_decoder, tv]


@pytest.mark.parametrize("model", lookalikes(), ids=["smp", "feature_info", "moduledict", "dynunet", "unetr",
                                                     "nnunet-without-decoder", "decoder-only", "torchvision"])
def test_look_alikes_are_not_taken_for_the_libraries(model):
    assert frem.bottleneck.known_bottleneck(model) is None


def test_a_module_with_an_orig_mod_attribute_is_not_a_dynamo_wrapper():
    model = LookAlike()
    model._orig_mod = nn.Conv2d(1, 1, 1)
    assert frem.bottleneck.unwrap(model) is model


class IntegerOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x):
        logits = self.up(self.down(x))
        return logits, logits.argmax(1)  # a label map: no autograd history


def test_outputs_without_autograd_history_are_fine():
    assert choose(survey(IntegerOutput(), x2d(16))).site.layer == "down"


class HandOver(nn.Module):
    """The bottleneck block is called inside its parent (never the parent itself), and handed to a
    shallower decoder module: its output site is deeper than the decoder's input site."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Module()
        self.enc.block = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)

    def forward(self, x):
        return self.up(self.enc.block(x))


def test_an_output_site_is_preferred_over_a_shallower_input_site():
    site = choose(survey(HandOver(), x2d(16))).site
    assert (site.layer, site.at) == ("enc.block", "output")


class PackedHandOver(nn.Module):
    """One map under two sites at one depth: whole from its block, as an entry of a tuple."""

    def __init__(self):
        super().__init__()
        self.zblock = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
        self.pack = Pack()
        self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)

    def forward(self, x):
        features, total = self.pack(self.zblock(x))
        return self.up(features) + total


class Pack(nn.Module):
    def forward(self, f):
        return f, f.mean()


def test_a_whole_output_is_preferred_over_the_same_map_as_an_entry():
    assert choose(survey(PackedHandOver(), x2d(16))).site.describe() == "zblock output"
