"""attach / resample / detach on smp, timm and hand-written models."""

from collections import Counter

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from models import HandUNet, tiny_unet
from torch import nn
from torch.nn import functional as F

import frem

SMP_ARCHITECTURES = [smp.Unet, smp.UnetPlusPlus, smp.FPN, smp.Linknet, smp.MAnet, smp.PSPNet,
                     smp.DeepLabV3Plus, smp.Segformer]


def capture(layer: nn.Module, store: list):
    return layer.register_forward_hook(lambda m, i, o: store.append(o))


@pytest.mark.parametrize("architecture", SMP_ARCHITECTURES, ids=lambda a: a.__name__)
def test_bottleneck_of_every_smp_architecture_is_the_deepest_encoder_feature(architecture):
    torch.manual_seed(0)
    model = architecture(encoder_name="resnet18", encoder_weights=None, in_channels=1, classes=2)
    raw, enhanced = [], []
    capture(model.encoder, enhanced)  # registered before attach: FREM's hook goes first, as part of the layer
    module = frem.attach(model, "bottleneck", B=16, X=100.0)
    model.encoder.register_forward_hook(lambda m, i, o: raw.append(o), prepend=True)  # the encoder's own output
    assert module.layer == "encoder" and module.num_channels == model.encoder.out_channels[-1]
    model.train()(torch.randn(2, 1, 64, 64))
    *shallow_raw, deep_raw = raw[0]
    *shallow, deep = enhanced[0]
    assert all(a is b for a, b in zip(shallow_raw, shallow))
    assert torch.allclose(deep, deep_raw * module.scale.view(1, -1, 1, 1))
    assert (module.scale == 100.0).sum() == 16


def test_default_model_bottleneck_has_512_channels_like_the_paper():
    model = smp.Unet("tu-seresnet34", encoder_weights=None, classes=4)
    assert frem.attach(model, B=162, X=632).num_channels == 512


def test_timm_features_only_without_example_input():
    model = timm.create_model("resnet18", features_only=True, pretrained=False, in_chans=1)
    module = frem.attach(model, B=0.5, X=50.0)
    assert module.layer == "" and module.num_channels == model.feature_info.channels()[-1]
    x = torch.randn(1, 1, 32, 32)
    expected = model.eval()(x)
    model.train()
    for m in model.modules():  # batch-norm in eval: both passes see the same statistics
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    out = model(x)
    assert len(out) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(out[:-1], expected[:-1]))
    assert torch.allclose(out[-1], expected[-1] * module.scale.view(1, -1, 1, 1))


def test_find_bottleneck_on_a_hand_written_unet():
    model = HandUNet()
    example = torch.randn(1, 1, 16, 16)
    assert frem.find_bottleneck(model, example) == "middle"
    assert model.training  # the measuring pass left the mode as it was
    module = frem.attach(model, example_input=example, B=4, X=10.0)
    assert module.layer == "middle" and module.num_channels == 32
    assert frem.find_bottleneck(tiny_unet(), torch.randn(1, 1, 32, 32)) == "encoder"


def test_bottleneck_of_an_unknown_model_needs_an_example_input():
    with pytest.raises(ValueError, match="example_input"):
        frem.attach(HandUNet(), B=4, X=10.0)


def test_state_dict_keys_unchanged_and_checkpoints_move_between_bare_and_attached():
    bare = tiny_unet()
    keys = list(bare.state_dict())
    attached = tiny_unet()
    frem.attach(attached, B=8, X=10.0)
    assert list(attached.state_dict()) == keys
    attached.load_state_dict(bare.state_dict())  # strict
    bare.load_state_dict(attached.state_dict())


def test_eval_is_the_bare_model_and_train_enhances():
    torch.manual_seed(0)
    model = tiny_unet()
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    bare = model(x)
    module = frem.attach(model, B=8, X=500.0)
    assert torch.equal(model.eval()(x), bare)
    assert not module.training
    model.train()
    assert module.training
    assert not torch.allclose(model(x), model.eval()(x))


def test_detach_restores_the_model_exactly():
    torch.manual_seed(0)
    model = tiny_unet()
    names = [n for n, _ in model.named_modules()]
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}
    x = torch.randn(2, 1, 32, 32)
    model.train()
    bare = model(x)
    frem.attach(model, B=8, X=500.0)
    assert "frem_encoder" in dict(model.named_children())
    assert frem.detach(model) == 1
    assert [n for n, _ in model.named_modules()] == names
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks))
            for n, m in model.named_modules()} == hooks
    assert torch.equal(model(x), bare)
    assert frem.detach(model) == 0


def test_remove_on_the_handle_and_reattach():
    model = tiny_unet()
    module = frem.attach(model, B=8, X=5.0)
    module.remove()
    assert frem.attached(model) == []
    with pytest.raises(RuntimeError, match="not attached"):
        module.remove()
    frem.attach(model, B=8, X=5.0)


def test_resample_redraws_every_attached_frem():
    model = HandUNet()
    a = frem.attach(model, "middle", B=4, X=10.0)
    b = frem.attach(model, model.enc2, B=0.5, X=10.0, seed=1)
    model.train()(torch.randn(1, 1, 16, 16))  # binds b, whose width is known only at forward
    assert frem.resample(model, 5) == [a, b]
    assert a.epoch == b.epoch == 5
    # each one holds exactly the draw for (its seed, epoch 5), not the epoch-0 one
    assert torch.equal(a.channels, frem.select_channels(32, 4, 0, 5))
    assert torch.equal(b.channels, frem.select_channels(16, 8, 1, 5))
    assert not torch.equal(a.channels, frem.select_channels(32, 4, 0, 0))
    assert not torch.equal(b.channels, frem.select_channels(16, 8, 1, 0))


def test_train_and_eval_reach_frem_when_the_smp_encoder_is_frozen():
    model = tiny_unet()
    model.freeze_encoder()
    module = frem.attach(model, B=8, X=5.0)
    model.eval()
    assert not module.training
    model.train()
    assert module.training


def test_containers_that_iterate_their_children_are_unaffected():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    torch.manual_seed(0)
    x = torch.randn(1, 1, 8, 8)
    module = frem.attach(model, "1", B=2, X=3.0)
    y = model.train()(x)
    frem.detach(model)
    relu = torch.relu(model[0](x))
    assert torch.allclose(y, model[2](relu * module.scale.view(1, -1, 1, 1)))


def test_compile_fullgraph_with_frem_attached():
    torch.manual_seed(0)
    model = HandUNet()
    x = torch.randn(2, 1, 16, 16)
    frem.attach(model, example_input=x, B=4, X=50.0)
    model.train()
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(x).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x).square().mean()
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-5)
    assert all(torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6) for g, p in zip(grads, model.parameters()))


def test_unknown_layer_lists_the_closest_names():
    with pytest.raises(ValueError, match=r"no layer 'enc3'; closest: enc2, enc1"):
        frem.attach(HandUNet(), "enc3", B=1, X=2.0)


def test_module_not_in_the_model_is_refused():
    with pytest.raises(ValueError, match="not part of the model"):
        frem.attach(HandUNet(), nn.Conv2d(1, 1, 1), B=1, X=2.0)


def test_attaching_twice_to_one_layer_is_refused():
    model = tiny_unet()
    frem.attach(model, B=8, X=5.0)
    with pytest.raises(ValueError, match="already attached to the output of layer 'encoder'"):
        frem.attach(model, "encoder", B=8, X=5.0)


def test_B_larger_than_the_layer_is_refused_at_attach():
    with pytest.raises(ValueError, match=r"B=600 is larger than the 128 channels of layer 'encoder'"):
        frem.attach(tiny_unet(), B=600, X=5.0)


def test_layer_output_without_channel_dimension_is_refused():
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))  # (N, 4) -> (N,)
    frem.attach(model, "1", B=1, X=2.0)
    with pytest.raises(ValueError, match="layer '1' has no channel dimension"):
        model.train()(torch.randn(3, 4))


def test_eval_graph_of_an_attached_model_is_the_bare_graph():
    def ops(model):
        graph = torch.export.export(model, (torch.randn(2, 1, 32, 32),)).graph
        return [str(n.target) for n in graph.nodes if n.op == "call_function"]

    torch.manual_seed(0)
    model = tiny_unet()
    bare_eval, bare_train = ops(model.eval()), ops(model.train())
    frem.attach(model, B=8, X=632.0)
    assert ops(model.eval()) == bare_eval
    # Traced (export, torch.compile), FREM is one plain multiply that Inductor can fuse, and its call
    # counter (frem.status) one in-place add on a scalar buffer. One training step first: it settles the
    # reach check, whose hook on the model torch 2.6 cannot export (two graphs).
    model.train()(torch.randn(2, 1, 32, 32)).square().mean().backward()
    assert not model._forward_hooks
    added = Counter(ops(model.train())) - Counter(bare_train)
    no_compute = {"aten.detach.default", "aten.to.device", "aten.view.default",
                  "aten._assert_tensor_metadata.default"}
    assert {op: n for op, n in added.items() if op not in no_compute} == {"aten.mul.Tensor": 1,
                                                                          "aten.add_.Tensor": 1}


def test_a_named_layer_with_out_channels_is_bound_at_attach():
    model = HandUNet()
    assert frem.attach(model, "head", B=1, X=2.0).num_channels == 2  # Conv2d.out_channels, no forward yet
    assert frem.attach(model, model.up1, B=1, X=2.0).num_channels == 8  # given as a module
    assert frem.attach(model, "dec1", B=1, X=2.0).num_channels is None  # a Sequential: learnt at first call
    assert frem.attach(model, "dec2.0", at="input", B=1, X=2.0).num_channels is None  # input width unknown
    smp_model = tiny_unet()
    assert frem.attach(smp_model, "encoder", B=1, X=2.0).num_channels == 128  # out_channels[-1]
    flagged = nn.Sequential(nn.Identity())
    flagged[0].out_channels = True  # not a width
    assert frem.attach(flagged, "0", B=1, X=2.0).num_channels is None


def test_the_frem_is_bound_on_the_model_device_and_keeps_its_mode():
    model = HandUNet().to("meta")
    handle = frem.attach(model, "head", B=1, X=2.0, mode="fixed")
    assert handle.scale.device.type == "meta" and handle.mode == "fixed"
    bare = nn.Sequential(nn.Identity())  # no parameters: the CPU
    bare[0].out_channels = 3
    assert frem.attach(bare, "0", B=1, X=2.0).scale.device.type == "cpu"


class Pair(nn.Module):
    def forward(self, x):
        return x, x.flip(1)  # alike: by default the last one would be picked


@pytest.mark.parametrize("entry", [0, (0,), [0]], ids=["int", "tuple", "list"])
@pytest.mark.parametrize("by", ["name", "module"])
def test_an_explicit_entry_picks_the_tensor(entry, by):
    model = nn.Sequential(Pair())
    handle = frem.attach(model, "0" if by == "name" else model[0], B=1, X=10.0, entry=entry)
    x = torch.randn(1, 3, 2, 2)
    first, second = model.train()(x)
    assert torch.equal(first, x * handle.scale.view(1, -1, 1, 1))
    assert torch.equal(second, x.flip(1))


def test_an_explicit_key_picks_the_entry_of_a_dict():
    class Named(nn.Module):
        def forward(self, x):
            return {"small": x[:, :1], "big": x}

    model = nn.Sequential(Named())
    handle = frem.attach(model, "0", B=1, X=10.0, entry="small")
    out = model.train()(torch.ones(1, 3, 2, 2))
    assert handle.num_channels == 1 and out["small"].eq(10.0).all() and out["big"].eq(1.0).all()


def test_generated_names_say_where_and_never_collide():
    model = HandUNet()
    model.frem_middle = 5  # an attribute that is not a module
    a = frem.attach(model, "middle", B=1, X=2.0)
    b = frem.attach(model, "dec2.0", B=1, X=2.0)
    c = frem.attach(model, "dec2.0", at="input", B=1, X=2.0)
    root = frem.attach(model, model, B=1, X=2.0)
    assert [m._child_name for m in (a, b, c, root)] == ["frem_middle_2", "frem_dec2_0", "frem_dec2_0_input",
                                                       "frem_model"]
    wrapped = nn.Sequential(nn.Sequential(HandUNet()))
    first = frem.attach(wrapped, "0.0.middle", B=1, X=2.0)
    second = frem.attach(wrapped, "0.0.dec1", B=1, X=2.0)
    third = frem.attach(wrapped, "0.0.enc1", B=1, X=2.0)
    assert first._holder_ref() is wrapped[0][0]  # the first module on the way that nobody iterates
    assert [m._child_name for m in (first, second, third)] == ["frem_0_0_middle", "frem_0_0_dec1",
                                                               "frem_0_0_enc1"]


def test_the_holder_is_the_first_module_on_the_way_that_is_not_a_container():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.conv(x)

    model = nn.Sequential(nn.Sequential(Block()))
    handle = frem.attach(model, "0.0.conv", B=1, X=2.0)
    assert handle._holder_ref() is model[0][0]
    assert len(model) == len(model[0]) == 1
    only_containers = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 1)))
    assert frem.attach(only_containers, "0", B=1, X=2.0)._holder_ref() is only_containers[0][0]


def test_unknown_layer_without_close_names_lists_the_top_level_layers():
    with pytest.raises(ValueError, match=r"HandUNet has no layer 'zzz'; its top-level layers: enc1, enc2, "
                                         r"middle, up2, dec2, up1, dec1, head$"):
        frem.attach(HandUNet(), "zzz", B=1, X=2.0)
    many = nn.ModuleDict({f"block{i}": nn.Identity() for i in range(1, 10)})
    with pytest.raises(ValueError, match=r"has no layer 'block'; closest: block9, block8, block7, block6, block5$"):
        frem.attach(many, "block", B=1, X=2.0)


def test_the_defaults_are_the_papers_mouse_setting():
    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=4, decoder_channels=(32, 16, 8, 4))
    handle = frem.attach(model)  # 256 bottleneck channels: room for B=162
    assert (handle.B, handle.X, handle.mode, handle.seed) == (162, 632.0, "random", 0)


def test_an_attached_frem_called_directly_is_the_identity_until_removed():
    model = HandUNet()
    handle = frem.attach(model, "middle", B=4, X=10.0)
    x = torch.randn(1, 32, 4, 4)
    handle.train()
    assert handle(x) is x  # a container iterating its children must not apply it twice
    handle.remove()
    assert not handle.applied_by_hook
    assert torch.equal(handle(x), x * handle.scale.view(1, -1, 1, 1))  # inline use after removal


def test_detach_leaves_the_users_own_hooks():
    model = HandUNet()
    seen = []
    model.middle.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model.middle.register_forward_pre_hook(lambda m, i: seen.append("pre"))
    frem.attach(model, "middle", B=4, X=10.0)
    frem.attach(model, "middle", at="input", B=1, X=10.0)
    assert frem.detach(model) == 2
    assert len(model.middle._forward_hooks) == len(model.middle._forward_pre_hooks) == 1
    model(torch.randn(1, 1, 16, 16))
    assert seen == ["pre", torch.Size([1, 32, 4, 4])]


def test_a_close_but_different_name_is_suggested():
    with pytest.raises(ValueError, match=r"has no layer 'abcmid'; closest: middle$"):
        frem.attach(HandUNet(), "abcmid", B=1, X=2.0)


def test_the_holder_of_a_layer_inside_a_block_inside_a_sequential():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(1, 2, 1))

        def forward(self, x):
            return self.seq(x)

    model = nn.Sequential(Block())
    assert frem.attach(model, "0.seq.0", B=1, X=2.0)._holder_ref() is model[0]


def test_two_inline_frems_on_one_tensor_are_refused():
    first, second = frem.FREM(1, 2.0).train(), frem.FREM(1, 2.0).train()
    with pytest.raises(RuntimeError, match=r"^FREM at FREM's input got a tensor that the FREM at 'FREM' already"):
        second(first(torch.randn(1, 3, 2)))


def test_the_holder_is_the_outermost_non_container_not_the_nearest():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)

        def forward(self, x):
            return self.conv(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x)

    model = nn.Sequential(Outer())
    assert frem.attach(model, "0.inner.conv", B=1, X=2.0)._holder_ref() is model[0]


def test_frem_at_a_layers_input_scales_what_the_layer_receives():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        bare = model[1](model[0](x))
        enhanced = model[1](model[0](x) * 3.0)
    frem.attach(model, "1", at="input", B=4, X=3.0)  # every channel: the draw cannot matter
    with torch.no_grad():
        assert torch.allclose(model.train()(x), enhanced) and torch.equal(model.eval()(x), bare)


def test_a_channels_last_map_is_enhanced_along_its_last_dim_and_detach_is_exact():
    """A layer whose output is (N, H, W, C): dim=-1 multiplies exactly B of its C channels by X in training,
    eval is the bare model, detach leaves it exactly as it was; dim=1 there is refused at attach."""
    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
            self.mix = nn.Linear(8, 8)  # acts on the last dim of (N, H, W, C)
            self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)

        def forward(self, x):
            return self.up(self.mix(self.down(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    torch.manual_seed(0)
    model, x = ChannelsLast(), torch.randn(2, 1, 16, 16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"dim=-1 for down output, but its tensor \(2, 8, 8, 16\) measured on "
                                         r"example_input is NCHW \(channels in dim 1\)"):  # a conv's: channels first
        frem.attach(model, "down", B=3, X=50.0, example_input=torch.randn(2, 1, 16, 32), dim=-1)
    assert not frem.attached(model)
    handle = frem.attach(model, "mix", B=3, X=50.0, dim=-1, example_input=x)
    seen = {}
    model.mix.register_forward_hook(lambda m, i, o: seen.update(out=o.detach()))
    with torch.no_grad():
        model.eval()
        bare = model.mix(model.down(x).permute(0, 2, 3, 1))
        model.train()
        model(x)
    scale = torch.ones(8)
    scale[handle.channels] = 50.0
    assert torch.equal(seen["out"], bare * scale) and handle.num_channels == 8 and handle.dim == -1
    frem.detach(model)
    assert model.state_dict().keys() == state.keys() and not any(isinstance(m, frem.FREM) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_timm_says_its_swin_features_are_channels_last_and_smp_dpt_returns_features_then_tokens():
    import segmentation_models_pytorch as smp
    swin = timm.create_model("swin_tiny_patch4_window7_224", features_only=True, pretrained=False, img_size=64,
                             window_size=2, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    site = frem.locate_bottleneck(swin)
    assert (site.layer, site.entry, site.dim, site.channels) == ("", (-1,), -1, 128)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(3)
        bare = swin.train()(x)[-1]
    handle = frem.attach(swin, "bottleneck", B=4, X=10.0, example_input=x)  # checked on the example: right dim
    with torch.no_grad():
        torch.manual_seed(3)
        enhanced = swin.train()(x)[-1]
    swin.eval()
    scale = torch.ones(128)
    scale[handle.channels] = 10.0
    assert enhanced.shape == (2, 2, 2, 128) and torch.allclose(enhanced, bare * scale, atol=1e-5)
    swin.output_fmt = "NCL_UNKNOWN"
    frem.detach(swin)
    with pytest.raises(ValueError, match=r"returns features as 'NCL_UNKNOWN', a layout frem does not know: pass dim="):
        frem.attach(swin, "bottleneck", B=4, X=10.0)
    dpt = smp.DPT("tu-vit_tiny_patch16_224", encoder_weights=None, classes=2, dynamic_img_size=True)
    site = frem.locate_bottleneck(dpt)
    assert (site.layer, site.entry, site.dim) == ("encoder", (0, -1), 1)  # features[-1], not the prefix tokens
    frem.attach(dpt, "bottleneck", B=4, X=10.0, example_input=torch.randn(1, 3, 64, 64))
    assert dpt.train()(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_example_input_may_be_keyword_arguments_as_forward_takes_them():
    """A model called with a dict batch (forward(image=..., mask=...)): the survey and the attach check call it
    so; a tuple is positional arguments, a tensor the one argument."""
    import handwritten as hw
    model, x = hw.DictInput(), torch.randn(2, 1, 32, 32)
    assert frem.find_bottleneck(model, {"image": x}) == "unet.middle"
    assert frem.find_bottleneck(model, {"image": x, "mask": torch.ones_like(x)}) == "unet.middle"
    assert frem.find_bottleneck(model, (x,)) == "unet.middle"
    handle = frem.attach(model, "bottleneck", B=4, X=3.0, example_input={"image": x})
    assert handle.layer == "unet.middle" and "unet.middle" in str(frem.candidates(model, {"image": x}))
    model.train()(image=x)
    assert handle._steps_on_draw == 1


def test_example_input_measures_the_width_and_b_is_refused_at_attach_with_nothing_attached():
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(16, 2, 1))
    with pytest.raises(ValueError, match=r"B=40 is larger than the 16 channels of layer '3'"):
        frem.attach(net, "3", B=40, X=5.0, example_input=torch.randn(2, 1, 16, 16))
    assert not frem.attached(net)
    assert frem.attach(net, "3", B=4, X=5.0, example_input=torch.randn(2, 1, 16, 16)).num_channels == 16


def test_a_channels_last_map_named_by_the_user_gets_its_measured_layout():
    """attach(m, name, example_input=x) on an (N, H, W, C) map: the measured dim, not dim 1 (which would
    scale rows); a dim that contradicts the measurement is refused naming both."""
    class NHWC(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
            self.mix = nn.Linear(8, 12)
            self.up = nn.ConvTranspose2d(12, 2, 2, stride=2)

        def forward(self, x):
            return self.up(self.mix(self.down(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    model, x = NHWC(), torch.randn(2, 1, 16, 32)
    handle = frem.attach(model, "mix", B=3, X=50.0, example_input=x)
    assert handle.dim == -1 and handle.num_channels == 12
    frem.detach(model)
    with pytest.raises(ValueError, match=r"dim=1 for mix output, but its tensor \(2, 8, 16, 12\) measured on "
                                         r"example_input is NHWC \(channels in dim -1\): FREM would scale dim 1 "
                                         r"\(8 rows, columns or tokens\) instead of its 12 channels"):
        frem.attach(model, "mix", B=3, X=50.0, example_input=x, dim=1)
    assert not frem.attached(model)


def test_a_module_named_bottleneck_is_not_confused_with_the_finder():
    class Named(nn.Module):  # MONAI's HoVerNet names a narrowing transition "bottleneck"
        def __init__(self):
            super().__init__()
            self.down = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU())
            self.deep = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
            self.bottleneck = nn.Conv2d(16, 16, 1)
            self.side = nn.Conv2d(16, 16, 1)
            self.up = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(16, 2, 1))

        def forward(self, x):
            deep = self.deep(self.down(x))
            return self.up(self.bottleneck(deep) + self.side(deep))

    model, x = Named(), torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"Named has a module named 'bottleneck', and frem finds the bottleneck "
                                         r"elsewhere \(up input\[0\]\).*Pass layer=model.bottleneck"):
        frem.attach(model, "bottleneck", B=2, X=5.0, example_input=x)
    assert frem.attach(model, model.bottleneck, B=2, X=5.0, example_input=x).layer == "bottleneck"


def test_example_input_that_holds_no_tensor_is_one_line_naming_it():
    model = HandUNet()
    for bad, kind in (("a string", "str"), (np.zeros((1, 1, 16, 16), np.float32), "ndarray"), (None, "NoneType")):
        with pytest.raises(TypeError, match=rf"^example_input must be one batch as the model's forward takes it: "
                                            rf"a tensor.*got {kind}$"):
            frem.attach(model, "bottleneck", B=2, X=5.0, example_input=bad) if bad is not None else \
                frem.candidates(model, bad)
    assert not frem.attached(model)


def test_a_dict_example_input_for_a_forward_that_takes_one_dict_says_how_to_pass_it():
    class TakesADict(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = HandUNet()

        def forward(self, batch):
            return self.net(batch["image"])

    model, batch = TakesADict(), {"image": torch.randn(2, 1, 16, 16)}
    with pytest.raises(TypeError, match=r"example_input is a dict, which frem passes as keyword arguments .*"
                                        r"pass example_input=\(batch,\)"):
        frem.attach(model, "bottleneck", B=2, X=5.0, example_input=batch)
    assert frem.attach(model, "bottleneck", B=2, X=5.0, example_input=(batch,)).layer == "net.middle"


def test_a_layer_returning_channels_last_maps_gets_its_deepest_one_without_entry():
    """A named layer that returns a list of (N, H, W, C) maps, dim=-1 and no entry=: FREM takes the deepest map
    (lowest H x W, most channels) read along its last dim."""
    class Pyramid(nn.Module):
        def forward(self, x):
            return [x.permute(0, 2, 3, 1), F.avg_pool2d(x, 2).permute(0, 2, 3, 1).repeat(1, 1, 1, 2)]

    model = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), Pyramid())
    handle = frem.attach(model, "1", B=2, X=10.0, dim=-1)
    x = torch.randn(2, 1, 8, 16)
    with torch.no_grad():
        fine, deep = model.train()(x)
        bare_fine, bare_deep = model.eval()(x)
    assert handle.num_channels == 12 and torch.equal(fine, bare_fine)  # the 4x8x12 map, not the 8x16x6 one
    scale = torch.ones(12)
    scale[handle.channels] = 10.0
    assert torch.allclose(deep, bare_deep * scale)
