"""Is FREM acting? frem.status's counters, the warning when a FREM never ran, frem.disabled, several sites."""

import warnings

import pytest
import torch
from models import HandUNet
from torch import nn

import frem


def steps(model, n, opt=None, size=16):
    opt = opt or torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(2, 1, size, size)).square().mean().backward()
        opt.step()
    return opt


def redraw(model, epoch):
    """frem.resample, returning the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frem.resample(model, epoch)
    return [str(w.message) for w in caught]


def test_status_counts_training_calls_since_the_last_redraw_and_not_eval_calls():
    net = HandUNet()
    frem.attach(net, "middle", B=4, X=50.0)
    assert frem.status(net)[0].calls == 0 and frem.status(net)[0].channels is None  # lazy: width unknown
    steps(net, 3)
    net.eval()
    net(torch.randn(2, 1, 16, 16))
    net.train()
    (row,) = frem.status(net)
    assert (row.layer, row.at, row.B, row.X, row.channels, row.dim, row.calls, row.capped, row.epoch) == (
        "middle", "output", 4, 50.0, 32, 1, 3, 0, 0)
    frem.resample(net, 1)
    assert frem.status(net)[0].calls == 0 and frem.status(net)[0].epoch == 1
    steps(net, 2)
    assert frem.status(net)[0].calls == 2


def test_status_reads_through_wrappers_and_prints_a_table():
    net = HandUNet()
    frem.attach(net, "middle", B=4, X=50.0)
    steps(nn.DataParallel(net), 2)  # on CPU DataParallel calls the module itself
    table = frem.status(nn.DataParallel(net))
    assert table[0].calls == 2
    text = str(table).splitlines()
    assert text[0].split() == list(frem.monitor.StatusTable.COLUMNS)
    assert text[1].split() == ["middle", "output", "4", "50", "32", "1", "random", "0", "0", "2", "0", "0", "yes"]
    assert str(frem.status(HandUNet())).startswith("no FREM")


def test_a_frem_used_as_a_module_is_listed_under_its_own_name():
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), frem.FREM(B=2, X=3.0), nn.Conv2d(8, 1, 1))
    steps(net, 1)
    (row,) = frem.status(net)
    assert (row.layer, row.at, row.calls, row.channels) == ("1", "module", 1, 8)


def test_a_hook_on_a_layer_the_forward_never_calls_warns_at_the_next_redraw_naming_it_once():
    net = HandUNet()
    net.spare = nn.Conv2d(32, 32, 1)  # built, never called by forward
    frem.attach(net, "middle", B=4, X=50.0)
    frem.attach(net, "spare", B=4, X=50.0)
    assert redraw(net, 0) == []  # nothing trained yet
    steps(net, 2)
    (message,) = redraw(net, 1)
    assert "FREM at 'spare' never ran" in message and "gradients reached" in message and "frem.status" in message
    assert "'middle'" not in message
    steps(net, 2)
    assert redraw(net, 2) == []  # once a FREM, not every epoch


def test_a_wrapper_that_goes_around_the_hooks_is_caught():
    net = HandUNet()
    frem.attach(net, "middle", B=4, X=50.0)

    class Bypass(nn.Module):  # calls the layers' .forward() directly: no hook runs, no FREM code at all
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            n = self.inner
            e1 = n.enc1.forward(x)
            e2 = n.enc2.forward(e1)
            b = n.middle.forward(e2)
            d2 = n.dec2(torch.cat([n.up2(b), e2], 1))
            return n.head(n.dec1(torch.cat([n.up1(d2), e1], 1)))

    redraw(net, 0)
    steps(Bypass(net), 2)
    (message,) = redraw(net, 1)
    assert "FREM at 'middle' never ran" in message


def test_training_in_eval_mode_warns_and_an_epoch_without_updates_does_not():
    net = HandUNet()
    frem.attach(net, "middle", B=4, X=50.0)
    redraw(net, 0)
    net.eval()
    net(torch.randn(2, 1, 16, 16))  # evaluation only: no parameter moved
    assert redraw(net, 1) == []
    steps(net, 1)  # trained, but in eval mode
    (message,) = redraw(net, 2)
    assert "eval mode" in message


def test_a_frem_that_ran_does_not_warn():
    net = HandUNet()
    frem.attach(net, "middle", B=4, X=50.0)
    for epoch in range(3):
        assert redraw(net, epoch) == []
        steps(net, 2)


def test_disabled_is_the_identity_in_train_mode_and_restores_the_same_draw():
    torch.manual_seed(0)
    net = HandUNet()
    x = torch.randn(2, 1, 16, 16)
    bare = net(x)
    handle = frem.attach(net, "middle", B=4, X=50.0)
    enhanced = net(x)
    assert not torch.allclose(bare, enhanced)
    drawn = handle.channels.clone()
    with frem.disabled(net) as modules:
        assert modules == [handle] and net.training
        assert torch.equal(net(x), bare)
        with frem.disabled(net):  # nests
            assert torch.equal(net(x), bare)
        assert torch.equal(net(x), bare)
    assert torch.equal(net(x), enhanced) and torch.equal(handle.channels, drawn)
    with pytest.raises(KeyError), frem.disabled(net):
        raise KeyError("a failing block")
    assert torch.equal(net(x), enhanced)  # left on again despite the error
    with pytest.raises(ValueError, match="has no FREM to disable"):
        with frem.disabled(HandUNet()):
            pass


def test_an_epoch_inside_disabled_is_not_an_idle_frem():
    net = HandUNet()
    frem.attach(net, "middle", B=4, X=50.0)
    redraw(net, 0)
    with frem.disabled(net):
        steps(net, 2)
    assert frem.status(net)[0].calls == 0
    assert redraw(net, 1) == []


def test_compiled_fullgraph_counts_and_disables_without_breaking_the_graph():
    torch._dynamo.reset()
    net = HandUNet()
    handle = frem.attach(net, "middle", B=4, X=50.0, example_input=torch.randn(1, 1, 16, 16))
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 1, 16, 16)
    compiled(x).sum().backward()
    compiled(x).sum().backward()
    assert frem.status(compiled)[0].calls == 2
    with frem.disabled(compiled):
        off = compiled(x)
    assert frem.status(compiled)[0].calls == 2
    net.eval()
    assert torch.allclose(off, net(x), atol=1e-6)  # disabled in train mode = the bare model
    net.train()
    frem.resample(compiled, 1)
    compiled(x)
    assert frem.status(compiled)[0].calls == 1 and handle.epoch == 1


def test_several_sites_have_their_own_setting_and_are_redrawn_together():
    net = HandUNet()
    deep = frem.attach(net, "middle", B=8, X=50.0, seed=1)
    skip = frem.attach(net, "enc2", B=3, X=4.0, seed=2)
    seen = {}
    for name in ("enc2", "middle"):  # registered after FREM's hooks: each sees its input and FREM's result
        net.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
    with torch.no_grad():
        net(torch.randn(2, 1, 16, 16).abs() + 0.1)
        for name, handle, width in (("enc2", skip, 16), ("middle", deep, 32)):
            layer_input, result = seen[name]
            own = net.get_submodule(name).forward(layer_input)  # the layer without its hooks
            scale = torch.ones(width)
            scale[handle.channels] = handle.X
            assert torch.allclose(result, own * scale.view(1, -1, 1, 1), rtol=1e-5, atol=1e-6)
    for epoch in range(3):
        frem.resample(net, epoch)
        assert deep.channels.tolist() == frem.select_channels(32, 8, 1, epoch).tolist()
        assert skip.channels.tolist() == frem.select_channels(16, 3, 2, epoch).tolist()
    steps(net, 2)
    assert [(r.layer, r.B, r.X, r.seed, r.calls) for r in frem.status(net)] == [
        ("middle", 8, 50.0, 1, 2), ("enc2", 3, 4.0, 2, 2)]


def test_an_epoch_inside_disabled_does_not_silence_the_next_real_idle_epoch():
    net = HandUNet()
    net.spare = nn.Conv2d(32, 32, 1)  # built, never called by forward
    frem.attach(net, "spare", B=4, X=50.0)
    redraw(net, 0)
    with frem.disabled(net):
        steps(net, 2)
    assert redraw(net, 1) == []  # an epoch off is the user's choice
    steps(net, 2)
    (message,) = redraw(net, 2)  # the next epoch it is idle for real
    assert "FREM at 'spare' never ran" in message


def test_parameters_updated_by_hand_still_count_as_training():
    """p.data.add_() moves no version counter: the gradients say the network trained."""
    net = HandUNet()
    frem.attach(net, "middle", B=4, X=50.0)
    net.spare = nn.Conv2d(32, 32, 1)
    frem.attach(net, "spare", B=4, X=50.0)
    redraw(net, 0)
    for _ in range(2):
        net.zero_grad()
        net(torch.randn(2, 1, 16, 16)).square().mean().backward()
        with torch.no_grad():
            for p in net.parameters():
                if p.grad is not None:
                    p.data.add_(p.grad, alpha=-1e-3)
    (message,) = redraw(net, 1)
    assert "FREM at 'spare' never ran" in message


def test_validation_in_train_mode_without_gradients_is_enhanced_counted_apart_and_said_once():
    net = HandUNet()
    handle = frem.attach(net, "middle", B=4, X=50.0)
    x = torch.randn(2, 1, 16, 16)
    with pytest.warns(RuntimeWarning, match=r"train mode with gradients off.*Call model.eval\(\) first"):
        with torch.no_grad():
            validated = net.train()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            net(x)
    with torch.no_grad():
        assert not torch.equal(validated, net.eval()(x))  # enhanced, as train mode asks
    row = frem.status(net)[0]
    assert (row.calls, row.nograd) == (0, 2) and handle._steps_on_draw == 0


def test_redraw_at_every_train_call_needs_no_call_from_the_loop():
    net = HandUNet()
    handle = frem.attach(net, "middle", B=4, X=50.0, redraw="train", example_input=torch.randn(1, 1, 16, 16))
    drawn = []
    for epoch in range(3):
        net.train()  # what a loop does at each epoch's start (Cellpose's train_seg does)
        drawn.append(handle.channels.tolist())
        steps(net, 2)
        net.eval()
    assert drawn == [frem.select_channels(32, 4, 0, e).tolist() for e in range(3)] and handle.epoch == 2
    assert "redraw='train'" in repr(handle)


def test_redraw_every_n_steps():
    net = HandUNet()
    handle = frem.attach(net, "middle", B=4, X=50.0, redraw=3, example_input=torch.randn(1, 1, 16, 16))
    seen = []
    for _ in range(7):
        steps(net, 1)
        seen.append((handle.epoch, int(handle.calls)))
    assert seen == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1)]
    for bad in (0, -1, "epoch", True, 2.5):
        with pytest.raises(ValueError, match="redraw says who re-draws"):
            frem.attach(HandUNet(), "middle", B=4, X=5.0, redraw=bad)
    # Compiled: FREM's step count breaks the graph and runs in Python, so it counts right; a whole graph
    # (fullgraph=True) cannot count, and is refused. Torch 2.6, the floor, drops the message from the
    # refusal ("Observed exception"); later versions keep it.
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="eager")
    for _ in range(3):
        compiled(torch.randn(2, 1, 16, 16)).square().mean().backward()
        seen.append((handle.epoch, int(handle.calls)))
    assert seen[-3:] == [(2, 2), (2, 3), (3, 1)]
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    with pytest.raises(Exception) as refused:
        compiled(torch.randn(2, 1, 16, 16))
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) > (2, 6):
        assert "redraw=3" in str(refused.value)


def test_disabled_and_resample_on_a_submodule_reach_the_frems_attached_inside_it():
    net = HandUNet()
    deep = frem.attach(net, "middle", B=4, X=50.0)
    skip = frem.attach(net, "enc2", B=2, X=5.0)
    with frem.disabled(net.middle) as modules:
        assert modules == [deep] and deep._paused and not skip._paused
    assert frem.resample(net.enc2, 3) == [skip] and skip.epoch == 3 and deep.epoch == 0
    with pytest.raises(ValueError, match=r"Sequential has no FREM to disable, and none is attached to a layer "
                                         r"inside it"):
        with frem.disabled(net.dec1):
            pass
