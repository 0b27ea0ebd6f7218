"""attach / resample / detach on smp, timm and hand-written models."""

from collections import Counter

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from models import HandUNet, tiny_unet
from torch import nn

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
    capture(model.encoder, raw)  # registered first: sees the encoder's own output
    module = frem.attach(model, "bottleneck", B=16, X=100.0)
    capture(model.encoder, enhanced)  # registered after FREM: sees what the decoder gets
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
    # Traced (export, torch.compile), FREM is one plain multiply that Inductor can fuse.
    added = Counter(ops(model.train())) - Counter(bare_train)
    no_compute = {"aten.detach.default", "aten.to.device", "aten.view.default",
                  "aten._assert_tensor_metadata.default"}
    assert {op: n for op, n in added.items() if op not in no_compute} == {"aten.mul.Tensor": 1}
