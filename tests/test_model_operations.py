"""What people do to models keeps working with FREM attached."""

import copy
import io
import warnings

import pytest
import torch
from models import HandUNet, tiny_unet
from torch import nn

import frem
import frem.module


def x16():
    return torch.randn(2, 1, 16, 16)


def test_deepcopy_gives_a_copy_driven_by_its_own_frem():
    torch.manual_seed(0)
    model = HandUNet()
    original = frem.attach(model, example_input=x16(), B=4, X=50.0)
    twin = copy.deepcopy(model)
    (twin_frem,) = frem.attached(twin)
    assert twin_frem is not original and twin_frem._target_ref() is twin.middle
    frem.resample(model, 5)
    assert not torch.equal(original.channels, twin_frem.channels)  # the copy did not follow
    x = x16()
    bare_twin = copy.deepcopy(twin)
    assert frem.detach(bare_twin) == 1
    model.train()
    twin.eval()  # the copy's own flag decides, whatever the original does
    with torch.no_grad():
        assert torch.equal(twin(x), bare_twin.eval()(x))
    assert frem.detach(twin) == 1
    assert not [m for m in twin.modules() if isinstance(m, frem.FREM)]  # nothing left behind
    assert frem.attached(model) == [original]  # the original keeps its FREM


def test_averaged_model_in_eval_is_the_bare_model():
    torch.manual_seed(0)
    model = HandUNet()
    bare = copy.deepcopy(model).eval()
    frem.attach(model, example_input=x16(), B=4, X=50.0)
    averaged = torch.optim.swa_utils.AveragedModel(model)
    model.train()
    x = x16()
    with torch.no_grad():
        assert torch.equal(averaged.eval()(x), bare(x))
        assert not torch.equal(averaged.train()(x), bare(x))  # its own FREM acts when it trains


def test_torch_save_of_a_whole_model_round_trips():
    torch.manual_seed(0)
    model = HandUNet()
    handle = frem.attach(model, example_input=x16(), B=4, X=50.0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    (loaded_frem,) = frem.attached(loaded)
    assert torch.equal(loaded_frem.channels, handle.channels)
    x = x16()
    with torch.no_grad():
        assert torch.equal(loaded.train()(x), model.train()(x))
    assert frem.detach(loaded) == 1 and frem.attached(model) == [handle]


def test_attach_and_find_leave_every_train_eval_flag_as_found():
    model = tiny_unet().train()
    model.encoder.bn1.eval()  # frozen statistics, on purpose
    flags = {name: m.training for name, m in model.named_modules()}
    frem.find_bottleneck(model, torch.randn(1, 1, 32, 32))
    frem.candidates(model, torch.randn(1, 1, 32, 32))
    frem.attach(model, example_input=torch.randn(1, 1, 32, 32), B=2, X=5.0, layer="encoder.layer2")
    assert {name: m.training for name, m in model.named_modules() if "frem" not in name} == flags


def test_a_layer_the_forward_never_calls_is_refused_at_attach_when_frem_can_look():
    """tiny_unet has depth 3: its encoder never runs layer3, so FREM there would silently never act."""
    model = tiny_unet()
    with pytest.raises(ValueError, match=r"^layer 'encoder.layer3' never ran on example_input: FREM there would "
                                         r"never act"):
        frem.attach(model, "encoder.layer3", B=2, X=5.0, example_input=torch.randn(1, 1, 32, 32))
    assert not frem.attached(model)
    frem.attach(model, "encoder.layer3", B=2, X=5.0)  # without an example frem cannot know, and does as told


def test_a_second_frem_on_the_same_feature_map_is_refused():
    model = tiny_unet()  # depth 3: its encoder's last feature is encoder.layer2's output
    frem.attach(model, "bottleneck", B=2, X=5.0)
    frem.attach(model, "encoder.layer2", B=2, X=5.0)
    with pytest.raises(RuntimeError, match=r"FREM at layer 'encoder' got a tensor that the FREM at "
                                           r"'encoder.layer2' already enhanced.*scaled by X twice"):
        model.train()(torch.randn(1, 1, 32, 32))
    frem.detach(model)
    shared = nn.Conv2d(1, 4, 1)
    aliased = nn.Module()
    aliased.a, aliased.b = shared, shared  # one module under two names
    frem.attach(aliased, "a", B=1, X=2.0)
    with pytest.raises(ValueError, match=r"already attached to the output of layer 'b' \(as 'a'\)"):
        frem.attach(aliased, "b", B=1, X=2.0)


def test_generated_child_names_do_not_collide():
    model = nn.Module()
    model.a = nn.Sequential(nn.Conv2d(1, 2, 1))
    model.a_0 = nn.Conv2d(1, 2, 1)
    first = frem.attach(model, "a.0", B=1, X=2.0)
    second = frem.attach(model, "a_0", B=1, X=2.0)
    assert first._child_name != second._child_name
    assert {n for n, _ in model.named_children()} >= {first._child_name, second._child_name}
    assert frem.detach(model) == 2 and {n for n, _ in model.named_children()} == {"a", "a_0"}


def test_a_sequential_keeps_its_length_and_iteration():
    layers = [nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)]
    model = nn.Sequential(*layers)
    handle = frem.attach(model, "1", B=2, X=3.0)
    assert len(model) == 3 and list(model) == layers
    assert handle in frem.attached(model)
    model.eval()
    assert not handle.training  # train()/eval() still reach it


def test_the_example_input_error_names_layers_the_model_has():
    model = HandUNet()
    with pytest.raises(ValueError, match=r"pass example_input=") as error:
        frem.attach(model, B=4, X=10.0)
    suggested = error.value.args[0].split("layer=")[-1].strip("')")
    assert not isinstance(model.get_submodule(suggested), (nn.Sequential, nn.ModuleList, nn.ModuleDict))
    bare = nn.Linear(2, 2)  # no submodules: nothing to suggest
    with pytest.raises(ValueError, match=r"or name the layer$"):
        frem.attach(bare, B=1, X=2.0)


def test_a_forgotten_resample_warns_once(monkeypatch):
    monkeypatch.setattr(frem.module, "STALE_DRAW_STEPS", 3)
    module = frem.FREM(2, 5.0, layer="enc").train()
    x = torch.randn(1, 4, 2, 2)
    with pytest.warns(UserWarning, match=r"same 2 channels for 3 training steps and was never re-drawn"):
        for _ in range(5):
            module(x)
    fixed = frem.FREM(2, 5.0, mode="fixed").train()
    resampled = frem.FREM(2, 5.0).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(9):
            if step % 2 == 0:  # epochs of two steps, each re-drawn
                resampled.resample(step // 2)
            fixed(x), resampled(x)
    # one re-draw before the loop and none after: as stale as none at all
    once = frem.FREM(2, 5.0, layer="enc").train().resample(0)
    with pytest.warns(UserWarning, match=r"same 2 channels for 3 training steps since its last re-draw \(epoch 0"):
        for _ in range(5):
            once(x)
    # epochs longer than the threshold, re-drawn each: said once in the first, then known to be long
    long = frem.FREM(2, 5.0).train().resample(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(4):
            long.resample(epoch)
            for _ in range(4):
                long(x)
    assert len([w for w in caught if "same 2 channels" in str(w.message)]) == 1


def test_resample_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="has no FREM to re-draw"):
        frem.resample(HandUNet(), 1)
    model = HandUNet()
    frem.attach(model, "middle", B=2, X=3.0)
    for bad in (2.7, -1, True, "3"):
        with pytest.raises(ValueError, match="epoch must be an integer >= 0"):
            frem.resample(model, bad)


def test_inline_frem_first_called_inside_compile_fullgraph():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 6, 3, padding=1)
            self.frem = frem.FREM(2, 50.0)  # width unknown until the first call
            self.head = nn.Conv2d(6, 1, 1)

        def forward(self, x):
            return self.head(self.frem(self.conv(x)))

    torch.manual_seed(0)
    model = Net().train()
    x = torch.randn(2, 1, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    assert model.frem.num_channels == 6
    assert torch.allclose(out, model(x), rtol=1e-5, atol=1e-6)


def test_a_bound_frem_survives_data_parallel_replication():
    module = frem.FREM(2, 5.0, num_channels=4)
    replica = module._replicate_for_data_parallel()
    assert replica.num_channels == 4
