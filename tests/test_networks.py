"""attach(model, "bottleneck") on the networks people train: the corpus, 2-D and 3-D, and the mechanics.

Every network of ``tests/corpus.py`` must end right, by name or measured, or
refuse with a ``BottleneckNotFound`` that lists a right site: never silently
wrong. Where attach picks a site, training scales exactly B channels of that
feature map, eval is bit-identical to the bare model and detach restores it.
Tiny widths and 16-64 px inputs keep it CPU-fast.
"""

import re
import warnings

import pytest
import torch
from corpus import CASES, MEASURED_REFUSALS, NAMED_REFUSALS, layout, resolve, x2d, x3d
from torch import nn

import frem
from frem.bottleneck import BottleneckNotFound, choose, get_entry, survey

pytest.importorskip("monai.networks.nets")
pytest.importorskip("torchvision.models.segmentation")

warnings.filterwarnings("ignore", category=UserWarning, module="monai")


def monai_unet(dims=2):
    return CASES[f"monai-unet-{dims}d"].build()


def nnunet(dims=2):
    return CASES[f"nnunet-plain-{dims}d"].build()


def call(model, x):
    """The model on a corpus input: a tuple is positional arguments (a diffusion U-Net's image and timesteps)."""
    return model(*x) if isinstance(x, tuple) else model(x)


def outputs(model, x):
    """Every tensor the model returns, in a fixed order (nested lists and dicts too: CPnet returns its levels;
    None is left out: SegResNetVAE's eval output is (logits, None))."""
    from frem.sites import tensor_entries
    out = call(model, x)
    return [t for _, t in sorted(tensor_entries(out), key=lambda entry: str(entry[0]))]


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
    call(model.train(), x)
    for h in handles:
        h.remove()
    raw, enhanced = seen["raw"].movedim(handle.dim, 1), seen["enhanced"].movedim(handle.dim, 1)  # channels in dim 1
    changed = (enhanced != raw).flatten(2).any(-1).any(0)
    alive = (raw != 0).flatten(2).any(-1).any(0)  # a channel a ReLU zeroed stays zero, scaled or not
    assert handle.channels.numel() == handle.B and alive[handle.channels].any()
    assert torch.equal(changed.nonzero().flatten(), handle.channels[alive[handle.channels]])
    assert torch.allclose(enhanced, raw * handle.scale.view((1, -1) + (1,) * (raw.dim() - 2)))


def build(name):
    torch.manual_seed(0)
    case = CASES[name]
    return case, case.build(), case.make_input()


def right_maps(found, texts):
    maps = [resolve(found, text) for text in texts]
    assert all(m is not None for m in maps), f"a right site of the corpus is not in the survey: {texts}"
    return maps


def describe_site(handle, entry):
    return frem.Site(handle.layer, handle._at, entry).describe()


@pytest.mark.parametrize("name", CASES)
def test_attach_is_right_or_refuses_and_says_where(name):
    case, model, x = build(name)
    found = survey(model, x)
    right = right_maps(found, case.right)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    with torch.no_grad():
        bare = outputs(model.eval(), x)
    try:
        handle = frem.attach(model, "bottleneck", B=2, X=7.0, example_input=x)
    except BottleneckNotFound as refusal:
        listed = [resolve(found, m.site.describe()) for m in refusal.candidates]
        assert not right or any(r is m for r in right for m in listed), \
            f"{name}: refused without listing a right site ({case.right}): {refusal}"
        assert {**MEASURED_REFUSALS, **NAMED_REFUSALS}.get(name, "<picks>") in str(refusal), f"{name}: {refusal}"
        assert re.search(rf"\b{type(model).__name__}\b", str(refusal))  # the message names the network it is about
        return
    assert right, f"{name} has no single bottleneck, but attach picked {handle.layer!r}"
    assert name not in MEASURED_REFUSALS or frem.bottleneck.known_bottleneck(model) is not None, name
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(outputs(model.eval(), x), bare))  # eval: untouched
    call(model.train(), x)  # a dict output's entry is decided at the first training call
    hook = next(h for hooks in (handle._target_ref()._forward_hooks, handle._target_ref()._forward_pre_hooks)
                for h in hooks.values() if getattr(h, "frem", None) is handle)
    picked = resolve(found, describe_site(handle, hook.entry))
    assert any(picked is r for r in right), f"{name}: attach picked {describe_site(handle, hook.entry)}, " \
                                            f"not one of {case.right}"
    # the layout too: channels first or last as the corpus says (a channels-last map scaled along dim 1 scales rows)
    rank = picked.tensor.dim()
    assert any(r is picked and layout(text) % rank == handle.dim % rank
               for r, text in zip(right, case.right)), f"{name}: dim {handle.dim}, the corpus says {case.right}"
    assert handle._reach["state"] in ("yes", "output"), f"{name}: its effect does not reach the outputs"
    # On a module's input, the module matters too: a pre-hook changes what that one module takes
    assert handle._at == "output" or describe_site(handle, hook.entry) in case.right, describe_site(handle, hook.entry)
    assert_frem_acts_exactly_at(model, handle, x, handle._at, hook.entry)
    assert frem.detach(model) == 1
    assert [n for n, _ in model.named_modules()] == modules
    model.load_state_dict(initial)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(outputs(model.eval(), x), bare))


def _known_by_name(name) -> bool:
    try:
        return frem.bottleneck.known_bottleneck(CASES[name].build()) is not None
    except pytest.skip.Exception:  # its extra is missing: kept, so that the test itself reports the skip
        return True


@pytest.mark.parametrize("name", [n for n in CASES if _known_by_name(n)])
def test_the_measured_rule_alone_is_right_or_refuses(name):
    """Without the name rules, the survey alone lands on a right map or says it cannot tell."""
    case, model, x = build(name)
    found = survey(model, x)
    right = right_maps(found, case.measured_right())
    try:
        chosen = choose(found, name)
    except BottleneckNotFound as refusal:
        assert any(r is m for r in right for m in refusal.candidates), str(refusal)
        assert MEASURED_REFUSALS.get(name, "<picks>") in str(refusal), f"{name}: {refusal}"
        return
    assert name not in MEASURED_REFUSALS, f"{name}: measured {chosen.site.describe()}, expected a refusal"
    assert any(chosen is r for r in right), f"{name}: measured {chosen.site.describe()}"
    rank = chosen.tensor.dim()
    assert any(r is chosen and layout(text) % rank == chosen.dim % rank for r, text in
               zip(right, case.measured_right())), f"{name}: dim {chosen.dim}, the corpus says {case.measured_right()}"


def test_every_category_of_the_issue_is_in_the_corpus():
    categories = {case.category for case in CASES.values()}
    assert {"channel-expanding blocks", "side branch", "sub-pixel decoder", "concatenation", "no downsampling",
            "small example input", "attention gates", "transformer", "head at the lowest resolution",
            "narrowing projection", "parallel branches", "channels last", "tokens",
            # issue 28's kinds 2-5
            "decoder starts at the bottleneck", "pyramid of ordinary pools", "search-space cells", "pool indices",
            "dense block", "two decoders",
            # issue 35's: a tensor returned twice, a library encoder inside a bigger one, a pool whose kernel is the
            # whole map, nested consumers, a context block before a partial decoder, no skips, object queries
            "returned twice", "library encoder inside", "global pool by kernel", "nested consumers", "context block",
            "no skip connections", "object queries"} <= categories
    assert len(CASES) >= 125 and set(MEASURED_REFUSALS) < set(CASES) and set(NAMED_REFUSALS) < set(CASES)
    assert {n.rsplit("-", 1)[-1] for n in CASES} >= {"2d", "3d"}


@pytest.mark.parametrize("name, notes", [
    ("flat-projection", ["wider than the last map: encoder or decoder?", "narrower than an earlier map on the main path",
                         "upstream of the pick"]),
    ("smp-pspnet-resnet", ["last map at the lowest resolution, but no decoder follows"]),
    ("subpixel-unet-flat", ["sub-pixel channels: a pixel shuffle folds them into space",
                            "entry into the lowest resolution"]),
    ("smp-pan-resnet", ["parallel branch after the last main-path map, as wide: feeds the decoder"]),
    ("smp-segformer-mit", ["detour: the encoder goes back to a finer resolution after it"]),
    ("ce-net", ["pyramid context (pooled with a fixed kernel beside others, brought back up)"]),
    ("resunetpp-2d", ["decoder: attention.0 brings a finer map down to this resolution and merges it with the one "
                      "it was handed"]),
    ("segnet", ["bottleneck: it stands for the pooled map below it, the last at the lowest resolution "
                "(scaling channels commutes with the pool)", "pooled by code no module hands over: FREM acts on "
                                                             "encoders.2 output, the same"])])
def test_each_map_the_rule_passes_over_says_why(name, notes):
    """The notes frem.candidates prints: what a user reads to see why attach refused or picked."""
    _, model, x = build(name)
    found = survey(model, x)
    try:
        choose(found, name)
    except BottleneckNotFound:
        pass
    said = {m.note for m in found.maps.values()}
    assert set(notes) <= said, sorted(said - {None})


def test_unetr_measured_alone_is_ambiguous_and_says_so():
    """The ViT's hidden states are token maps at the patch grid, each feeding a decoder path of its own
    (encoder2-4, decoder5): parallel, none on every path, so the measured rule refuses and names them."""
    _, model, x = build("monai-unetr")
    with pytest.raises(BottleneckNotFound, match=r"bottleneck of the model: the 13 maps at the lowest resolution lie "
                                                 r"on parallel paths and none is on all of them \(decoder5 input\[0\] "
                                                 r"\(2, 48, 2, 2\); .*vit output\[0\] \(channels in dim -1\) "
                                                 r"\(2, 4, 48\)"):
        choose(survey(model, x))


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
    from handwritten import PlainUNet
    model, x = PlainUNet(), x2d()
    table = frem.candidates(model, x)
    lines = str(table).splitlines()
    assert lines[0].split() == ["layer", "at", "shape", "layout", "channels", "distance", "to", "output"]
    assert re.match(r"middle +input\[0\] +2x16x4x4 +NCHW +16 +\d+ +entry into the lowest resolution$", lines[1])
    assert re.match(r"middle\.0 +output +2x32x4x4 +NCHW +32 +\d+ +inside middle, whose output is on the main path$",
                    lines[2])
    assert re.match(r"middle +output +2x32x4x4 +NCHW +32 +\d+ +<- bottleneck: the last map at the lowest resolution 4x4 "
                    r"on the main path, where the decoder takes over$", lines[5])
    assert all("higher resolution" in line for line in lines[6:-2])
    assert lines[-2].startswith("... 14 more (finer maps, gates, global context)")
    assert lines[-1] == "attach picks middle output"
    assert table.chosen.site.layer == frem.attach(model, example_input=x, B=1, X=2.0).layer


def test_the_table_marks_a_known_pick_even_at_a_negative_entry():
    _, model, x = build("timm-efficientnet-fpn")  # encoder output[-1], 46 maps at the lowest resolution
    lines = str(frem.candidates(model, x)).splitlines()
    assert sum("<-" in line for line in lines) == 1
    assert re.match(r"encoder +output\[-1\] +2x320x2x2 +NCHW +320 +\d+ +<- bottleneck \(known by name\)$",
                    next(line for line in lines if "<-" in line))
    assert "encoder.blocks.6.0.conv_pw" in str(lines) and "decoder (made inside decoder, which upsamples)" in str(lines)
    assert lines[-1] == "attach picks encoder output[-1]: known by name for this architecture"
    _, unetr, x = build("monai-unetr")
    text = str(frem.candidates(unetr, x))
    assert text.splitlines()[-1] == "attach picks decoder5 input[0]: known by name for this architecture"
    assert re.search(r"\ndecoder5 +input\[0\] +2x48x2x2 +NCHW +48 +\d+ +<- bottleneck \(known by name\)", text)
    chosen = frem.candidates(unetr, x).chosen  # the row marked is that map, not one of its shape
    assert any((s.layer, s.at, s.entry) == ("decoder5", "input", (0,)) for s in chosen.sites)
    assert "side branch: not on every path through the lowest resolution" in text  # the hidden states, parallel


@pytest.mark.parametrize("features", [dict(feature_cls="dict"),
                                      dict(feature_cls="hook", feature_cfg=dict(return_dict=True))],
                         ids=["FeatureDictNet", "FeatureHookNet-dict"])
def test_the_table_marks_a_known_pick_whose_entry_is_chosen_at_training_the_deepest(features):
    """A timm dict of features is known by name with its entry left to the first training call."""
    import timm
    from handwritten import FeatureUNet

    class DictUNet(FeatureUNet):
        def forward(self, x):
            return self.decoder(list(self.encoder(x).values()), x.shape[2:])

    encoder = timm.create_model("resnet18", features_only=True, pretrained=False, in_chans=1, **features)
    model, x = DictUNet(encoder, encoder.feature_info.channels()), x2d(64)
    table = frem.candidates(model, x)
    deepest = list(encoder(x))[-1]
    assert ("encoder", "output", (deepest,)) in [(s.layer, s.at, s.entry) for s in table.chosen.sites]
    assert sum("<- bottleneck (known by name)" in line for line in str(table).splitlines()) == 1
    assert_frem_acts_exactly_at(model, frem.attach(model, B=2, X=3.0), x, "output", (deepest,))


def test_a_refusal_lists_six_sites_and_counts_the_rest():
    from types import SimpleNamespace

    from frem.rule import _describe
    maps = [SimpleNamespace(site=frem.Site(f"stage{i}"), order=i, shape=(1, 8, 4, 4)) for i in range(8)]
    assert _describe(maps[:6]).count("stage") == 6 and "more" not in _describe(maps[:6])
    listed = _describe(maps)
    assert listed.count("stage") == 6 and listed.endswith("; and 2 more")
    assert listed.startswith("stage7 output (1, 8, 4, 4); stage6")  # the latest first


def test_the_table_starts_at_the_lowest_resolution_of_the_features_not_of_pyramid_context():
    _, model, x = build("ce-net")
    table = frem.candidates(model, x, limit=None)
    pyramid = [i for i, m in enumerate(table) if m.pyramid]
    assert table[0].grid == (6, 6) and pyramid and min(pyramid) > table.index(table.chosen)
    # the branch whose kernel covers the whole 6x6 map is global context, the others pyramid context
    assert all(table[i].note.startswith(("pyramid context", "global context")) for i in pyramid)
    assert any(table[i].note.startswith("pyramid context") for i in pyramid)


def test_the_pick_always_shows_however_small_the_limit():
    from handwritten import PlainUNet
    table = frem.candidates(PlainUNet(), x2d(), limit=0)
    assert table.chosen in table and len(table) == 5  # every map at the lowest resolution, nothing finer
    assert len(frem.candidates(PlainUNet(), x2d(), limit=None)) == 5 + 21


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
    from frem.integrations.nnunet import FREMMixin

    class Builder:  # what the mixin wraps: nnU-Net's static build_network_architecture
        @staticmethod
        def build_network_architecture(dims):
            return nnunet(dims)

    class WithFREM(FREMMixin, Builder):
        pass

    for dims in (2, 3):
        network = WithFREM.build_network_architecture(dims)  # skips without the nnunet extra
        (handle,) = frem.attached(network)
        assert handle.layer == f"encoder.stages.{3 if dims == 2 else 2}"
        assert handle.B == round(162 / 512 * handle.num_channels) and handle.X == 632.0
    if example.nnUNetTrainer is not None:  # nnunetv2 itself (its dynamic_network_architectures may stand alone)
        assert example.nnUNetTrainerFREM.__mro__[1] is FREMMixin


KNOWN_BY_NAME = {  # network -> (layer, at, entry, channels) with no example input at all
    "monai-unet-2d": ("model.1.submodule.1.submodule.1.submodule", "output", (), 32),
    "monai-unet-3d": ("model.1.submodule.1.submodule", "output", (), 16),
    "monai-unet-residual": ("model.1.submodule.1.submodule.1.submodule", "output", (), 32),
    "monai-attention-unet": ("model.1.submodule.1.submodule.1.submodule", "output", (), 32),
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
    model = CASES[name].build()
    site = frem.locate_bottleneck(model)
    assert (site.layer, site.at, site.entry, site.channels) == KNOWN_BY_NAME[name]
    assert frem.attach(model, "bottleneck", B=2, X=7.0).layer == KNOWN_BY_NAME[name][0]


@pytest.mark.parametrize("name", ["monai-basicunet", "monai-swinunetr", "monai-segresnet-2d", "unet-2d"])
def test_other_networks_are_not_known_by_name(name):
    assert frem.bottleneck.known_bottleneck(CASES[name].build()) is None


def test_timm_and_smp_encoders_are_known_by_name():
    import segmentation_models_pytorch as smp
    import timm
    features = timm.create_model("resnet18", features_only=True, pretrained=False, in_chans=1)
    assert frem.locate_bottleneck(features) == frem.Site("", "output", (-1,), 512)
    as_dict = timm.create_model("resnet18", features_only=True, pretrained=False, in_chans=1,
                                feature_cls="dict")
    assert frem.locate_bottleneck(as_dict) == frem.Site("", "output", None, 512)  # picked at the first call
    efficient = timm.create_model("efficientnet_b0", features_only=True, pretrained=False, in_chans=1)
    assert type(efficient).__name__ == "EfficientNetFeatures"  # not a ModuleDict, still timm's features
    assert frem.locate_bottleneck(efficient) == frem.Site("", "output", (-1,), 320)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = timm.create_model("resnet18", features_only=True, pretrained=False, in_chans=1)

    assert frem.locate_bottleneck(Wrapped()) == frem.Site("encoder", "output", (-1,), 512)
    unet = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4))
    assert frem.locate_bottleneck(unet) == frem.Site("encoder", "output", (-1,), 128)


class SumTakenTwice(nn.Module):
    """A bottleneck summed in forward (no module hands it over) that a decoder and a deep-supervision head
    both take in: a pre-hook on either one's input would leave the other the unscaled map."""

    def __init__(self, w=8):
        super().__init__()
        self.down = nn.Conv2d(1, w, 3, stride=2, padding=1)
        self.a, self.b = nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1)
        self.up, self.aux = nn.ConvTranspose2d(w, 2, 2, stride=2), nn.Conv2d(w, 2, 1)

    def forward(self, x):
        d = self.down(x)
        bottom = self.a(d) + self.b(d)
        return self.up(bottom), self.aux(bottom)


def test_a_map_several_modules_take_in_and_none_hands_over_is_refused():
    model = SumTakenTwice()
    with pytest.raises(BottleneckNotFound, match=r"taken in by 2 modules \(aux, up\).*nn.Identity"):
        frem.attach(model, "bottleneck", B=2, X=7.0, example_input=x2d())
    assert frem.attach(model, "up", at="input", B=2, X=7.0).layer == "up"  # said at='input': one is enough


def test_parallel_candidates_are_refused_by_attach_and_shown_in_the_table():
    from handwritten import TwoEncoders
    with pytest.raises(BottleneckNotFound, match=r"bottleneck of TwoEncoders: the 4 maps at the lowest resolution "
                                                 r"lie on parallel paths and none is on all of them \(b output "
                                                 r"\(1, 8, 8, 8\); a output \(1, 8, 8, 8\); b\.0 output"):
        frem.attach(TwoEncoders(), B=1, X=2.0, example_input=torch.randn(1, 1, 16, 16))
    text = str(frem.candidates(TwoEncoders(), torch.randn(1, 1, 16, 16)))
    assert text.splitlines()[-1] == ("attach picks nothing: frem cannot tell which feature map is the "
                                     "bottleneck of TwoEncoders")
    assert "<-" not in text
    assert sum(line.endswith("  side branch: not on every path through the lowest resolution")
               for line in text.splitlines()) == 4


def test_the_table_is_readable_and_points_at_one_row():
    from models import HandUNet
    table = frem.candidates(HandUNet(), torch.randn(1, 1, 16, 16), limit=50)
    lines = str(table).splitlines()
    assert sum("<-" in line for line in lines) == 1
    assert not any(line != line.rstrip() for line in lines)
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert re.search(r"^head +output +1x2x16x16 +NCHW +2 +0 +higher resolution$", rows["head"])  # the output itself
    assert re.search(r"^dec1 +output +1x8x16x16 +NCHW +8 +1 +higher resolution$", rows["dec1"])
    keys = [(c.resolution, c.order) for c in table[5:]]
    assert keys == sorted(keys)  # finer maps after the lowest level, coarsest first
    root = frem.candidates(__import__("timm").create_model("resnet18", features_only=True, pretrained=False,
                                                           in_chans=1), torch.randn(1, 1, 64, 64))
    assert str(root).splitlines()[-1] == "attach picks <model> output[-1]: known by name for this architecture"
    assert sum("<-" in line for line in str(root).splitlines()) == 1


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
    assert re.search(r"\ngate +output +1x16x1x1 +NCHW +16 +\d+ +global context \(from a global or adaptive pool\)",
                     str(table))


class BroadcastGate(nn.Module):
    """A spatial attention map (N, 1, H, W) from a conv, multiplied into the bottleneck: not pooled, still a gate.
    ``expand``: the map expanded to the full shape first, as many elements as the map it gates."""

    def __init__(self, channels=8, expand=False):
        super().__init__()
        self.expand = expand
        self.down = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.attention = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())
        self.up = nn.ConvTranspose2d(channels, 2, 2, stride=2)

    def forward(self, x):
        d = self.down(x)
        gate = self.attention(d)
        return self.up(d * (gate.expand_as(d) if self.expand else gate))


def test_a_gate_expanded_to_the_maps_shape_is_still_a_gate():
    # two channels: the expanded dim has size 2
    found = survey(BroadcastGate(channels=2, expand=True), torch.randn(1, 1, 16, 16))
    attention = next(m for m in found if m.site.layer == "attention")
    assert not attention.live and choose(found).site.describe() == "up input[0]"


class CustomActivation(torch.autograd.Function):
    """An op written as an autograd Function, which the survey's recorder does not see."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class UNetWithCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.down, self.middle = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.up, self.head = nn.ConvTranspose2d(8, 8, 2, stride=2), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.up(self.middle(CustomActivation.apply(self.down(x)))))


def test_maps_made_by_an_op_the_survey_cannot_see_are_not_taken_for_global_context():
    found = survey(UNetWithCustomOp(), torch.randn(1, 1, 16, 16))
    assert not any(m.pooled for m in found.maps.values())
    assert choose(found).site.describe() == "middle output"


class CustomActivationLayer(nn.Module):
    def forward(self, x):
        return CustomActivation.apply(x)


def test_a_bottleneck_made_by_an_op_the_survey_cannot_see_is_found_from_its_module():
    model = UNetWithCustomOp()
    model.middle = nn.Sequential(model.middle, CustomActivationLayer())  # the block's last op is unseen
    model.train()
    found = survey(model, torch.randn(1, 1, 16, 16))
    assert all(m.training is True for m in model.modules())  # the flags put back as they were
    pick = choose(found)
    assert pick.site.describe() == "middle output" and pick.op == ""  # made where the recorder cannot see
    assert found.maps[pick.node] is pick


def test_a_model_without_feature_maps_gets_an_empty_table_that_says_so():
    table = frem.candidates(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), torch.randn(1, 1, 8, 8))
    assert list(table) == [] and table.chosen is None
    assert "attach picks nothing: frem found no feature map (N, C, *spatial) in Sequential" in str(table)


@pytest.mark.parametrize("size, pooled", [(2, False), ((2, 4), True)], ids=["1x1", "1x2"])
def test_an_adaptive_pool_is_global_context_only_over_more_than_one_pixel(size, pooled):
    found = survey(Gated(), torch.randn(1, 1, *((size, size) if isinstance(size, int) else size)))
    assert [m.pooled for m in found.maps.values() if m.op == "adaptive_avg_pool2d"] == [pooled]


def test_a_map_that_only_multiplies_by_broadcasting_is_a_gate():
    found = survey(BroadcastGate(), torch.randn(1, 1, 16, 16))
    attention = next(m for m in found if m.site.layer == "attention")
    assert not attention.pooled and not attention.live
    assert choose(found).site.describe() == "up input[0]"


class CoarseGate(nn.Module):
    """Spatial attention computed one level coarser than the bottleneck, then upsampled into it."""

    def __init__(self):
        super().__init__()
        self.down, self.mid = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.attention = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 1, 1))
        self.up, self.head = nn.Upsample(scale_factor=2.0), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        d = self.down(x)
        gate = nn.functional.interpolate(self.attention(d), scale_factor=2.0).sigmoid()
        return self.head(self.up(self.mid(d * gate)))


def test_the_table_starts_at_the_main_paths_lowest_level_and_ends_with_gates_however_coarse():
    table = frem.candidates(CoarseGate(), torch.randn(1, 1, 16, 16))
    rows = [(m.site.layer, m.resolution) for m in table]
    assert rows[:3] == [("down", 64), ("mid", 64), ("mid", 64)] and table.chosen is table[2]
    assert rows[3:5] == [("up", 256), ("head", 256)]  # then finer maps
    assert {layer for layer, _ in rows[5:]} == {"attention", "attention.0"}  # gates last


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


def test_a_token_side_branch_is_seen_as_tokens_but_is_not_the_pick():
    """(N, L, D) tokens of the 8x8 grid are maps with their channels last, not (N, C, *spatial) ones with 64 channels
    on a grid of 2: the flattened (N, C, L) view reads as a 2x2 grid only by accident; a grid a spatial op made wins."""
    found = survey(TokensBeside(), torch.randn(1, 1, 16, 16))
    tokens = [c for c in found if c.site.layer == "tokens"]
    assert [(c.site.at, c.layout, c.grid, c.channels) for c in tokens] == [("input", "NLC", (8, 8), 4),
                                                                          ("output", "NLC", (8, 8), 2)]
    assert all(c.site.dim == -1 for c in tokens)
    assert choose(found).site.layer == "down" and tokens[1].note.startswith("side branch")


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


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool, self.up = nn.MaxPool2d(2), nn.ConvTranspose2d(3, 2, 2, stride=2)

    def forward(self, x, factor):
        return self.up(self.pool(x) * factor)


def test_the_survey_takes_several_inputs():
    found = survey(TwoInputs(), (torch.randn(1, 3, 8, 8), 2.0))  # the graph starts at the input itself
    assert choose(found).site.describe() == "up input[0]"  # the pooled map, scaled


def test_a_model_without_weights_after_its_lowest_resolution_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Upsample(scale_factor=2.0))
    with pytest.raises(BottleneckNotFound, match="nothing with weights works at a higher resolution"):
        choose(survey(model, x2d(16)))


def test_the_table_shows_twelve_rows_unless_asked():
    model, x = monai_unet(2), x2d()
    assert len(frem.candidates(model, x)) == 12 and len(frem.candidates(model, x, limit=3)) == 7  # 7 at 4x4


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
    assert deepest_entry([torch.zeros(3), torch.zeros(4), torch.zeros(5)]) == (2,)  # no maps: the last tensor


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
    skip = type("SkipConnection", (nn.Module,), {})()  # MONAI's nesting, in a class of another library
    skip.submodule = nn.Conv2d(1, 1, 1)
    unet_elsewhere = type("UNet", (nn.Module,), {})()
    unet_elsewhere.model = nn.Sequential(nn.Conv2d(1, 1, 1), skip)
    classifier = __import__("timm").create_model("resnet18", pretrained=False, in_chans=1, num_classes=2)
    return [smp_like, feature_info_only, nn.ModuleDict(), dyn, unetr, half_nnunet, only_decoder, tv, unet_elsewhere,
            classifier]


@pytest.mark.parametrize("model", lookalikes(), ids=["smp", "feature_info", "moduledict", "dynunet", "unetr",
                                                     "nnunet-without-decoder", "decoder-only", "torchvision",
                                                     "unet-not-monai", "timm-classifier"])
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


def test_a_network_that_never_lowers_the_resolution_is_refused_for_that_reason():
    from handwritten import NoDownsampling
    with pytest.raises(BottleneckNotFound, match="never lowers the resolution of its input"):
        frem.attach(NoDownsampling(), "bottleneck", B=1, X=2.0, example_input=x2d())


@pytest.mark.parametrize("dims, spatial", [(None, True), ((2, 3), True), ((-2, -1), True), ((1, 2, 3), True),
                                           (1, False), (3, False), ((1, 3), False), (2, False)])
def test_a_reduction_is_global_context_only_over_every_spatial_dim(dims, spatial):
    """A global pool feeding a multiply is a gate (squeeze-excitation); a channel mean (CBAM's spatial
    attention) or a pool over one axis keeps a map that can be a bottleneck."""
    from frem.survey import _reduces_space
    t = torch.zeros(2, 8, 4, 4)
    assert _reduces_space(t, (t,) if dims is None else (t, dims), {}) is spatial
    if dims is not None:
        assert _reduces_space(t, (t,), {"dim": dims}) is spatial
        assert _reduces_space(t, (t, True), {"dim": dims}) is spatial  # keepdim given by position


def test_a_mean_over_a_single_pixel_is_no_global_context():
    """At 1x1 a mean over space changes nothing: what comes of it is still the map, not a squeeze."""
    from frem.survey import _reduces_space
    one, two = torch.zeros(2, 8, 1, 1), torch.zeros(2, 8, 1, 2)
    assert not _reduces_space(one, (one, (2, 3)), {}) and _reduces_space(two, (two, (2, 3)), {})


class SqueezeByMean(nn.Module):
    """timm's squeeze-excitation squeezes with x.mean((2, 3)), not an adaptive pool."""

    def __init__(self):
        super().__init__()
        self.down, self.fc, self.head = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.down(x)
        y = y * self.fc(y.mean((2, 3), keepdim=True)).sigmoid()
        return nn.functional.interpolate(self.head(y), scale_factor=2.0)


class DepthToSpaceByReshape(nn.Module):
    """A sub-pixel decoder written with view/permute/reshape instead of nn.PixelShuffle."""

    def __init__(self):
        super().__init__()
        self.down, self.expand, self.head = nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.expand(self.down(x))
        n, c, h, w = y.shape
        return self.head(y.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c // 4, 2 * h, 2 * w))


def test_a_squeeze_by_mean_is_global_context_and_so_is_what_is_made_from_it_alone():
    maps = [(m.op, m.pooled) for m in survey(SqueezeByMean(), x2d(16)).maps.values()]
    assert maps == [("conv2d", False), ("mean", True), ("conv2d", True), ("sigmoid", True), ("mul", False),
                    ("conv2d", False), ("interpolate", False)]


@pytest.mark.parametrize("height, width", [(16, 16), (16, 32)])
def test_channels_folded_into_space_by_reshapes_are_sub_pixel(height, width):
    found = survey(DepthToSpaceByReshape(), torch.randn(2, 1, height, width))
    maps = [(m.op, tuple(m.tensor.shape[1:]), m.sub_pixel) for m in found.maps.values()]
    h, w = height // 2, width // 2
    assert maps[:3] == [("conv2d", (8, h, w), False), ("conv2d", (8, h, w), True), ("reshape", (2, height, width), False)]


def test_without_an_example_input_the_error_suggests_a_layer_the_model_has():
    # containers nested deep enough that a suggestion counting them would land on one
    down = nn.Sequential(nn.Sequential(nn.Sequential(nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 1)))))
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), down, nn.Upsample(scale_factor=2), nn.Conv2d(8, 2, 1))
    with pytest.raises(ValueError, match="example_input") as refusal:
        frem.bottleneck.locate_bottleneck(model)
    suggested = re.search(r"layer='([^']+)'", str(refusal.value)).group(1)
    layer = dict(model.named_modules()).get(suggested)
    assert layer is not None and not isinstance(layer, frem.bottleneck.CONTAINERS), suggested
    assert "layer=" not in str(pytest.raises(ValueError, frem.bottleneck.locate_bottleneck, nn.Sequential()).value)
