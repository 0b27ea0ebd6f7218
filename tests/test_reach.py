"""frem.reach: FREM's effect must reach the model's outputs, verified at attach (example_input) or at the
first training call, and refused where it does not; frem.status says per FREM what was seen."""

import pytest
import torch
from models import HandUNet
from torch import nn

import frem
from frem.reach import EffectDoesNotReach


class ReturnsACopy(nn.Module):
    """The trap of transformers' SegFormer and MaskFormer: the encoder returns its last hidden state as an
    entry AND inside a tuple of hidden states; the head reads the tuple, the caller gets both."""

    def __init__(self, return_last=True):
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 2, 1))
        self.return_last = return_last

    def forward(self, x):
        out = self.encoder(x)
        logits = self.head(out["hidden_states"][-1])
        return {"logits": logits, "last": out["last_hidden_state"]} if self.return_last else logits


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return {"last_hidden_state": h, "hidden_states": (x, h)}


class Dropped(nn.Module):
    """A module whose output the forward computes and drops."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.aux = nn.Conv2d(8, 8, 1)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 2, 1))

    def forward(self, x):
        h = self.down(x)
        self.aux(h)  # a leftover: its result goes nowhere
        return self.up(h)


def train_step(model, x):
    model.train()
    out = model(x)
    logits = out["logits"] if isinstance(out, dict) else out
    logits.square().mean().backward()
    return out


@pytest.mark.parametrize("return_last", [True, False])
def test_a_tensor_the_head_reads_elsewhere_is_refused_at_attach_and_nothing_is_attached(return_last):
    model, x = ReturnsACopy(return_last), torch.randn(2, 1, 16, 16)
    with pytest.raises(EffectDoesNotReach, match=r"FREM at encoder output\['last_hidden_state'\] would run in "
                                                 r"training and change nothing the loss sees: "
                                                 + (r"ReturnsACopy returns that tensor as an output entry"
                                                    if return_last else r"nothing the model returns is computed")):
        frem.attach(model, "encoder", entry="last_hidden_state", B=2, X=10.0, example_input=x)
    assert not frem.attached(model) and not any(isinstance(m, frem.FREM) for m in model.modules())
    # the entry the head reads is right, and verified
    handle = frem.attach(model, "encoder", entry=("hidden_states", 1), B=2, X=10.0, example_input=x)
    assert handle._reach["state"] == "yes" and frem.status(model)[0].reaches == "yes"


def test_without_example_input_the_first_training_call_refuses_and_status_says_so():
    model, x = ReturnsACopy(), torch.randn(2, 1, 16, 16)
    handle = frem.attach(model, "encoder", entry="last_hidden_state", B=2, X=10.0)
    assert frem.status(model)[0].reaches == "?"
    model.eval()(x)  # evaluation checks nothing and costs nothing
    assert frem.status(model)[0].reaches == "?"
    with pytest.raises(EffectDoesNotReach, match=r"returns that tensor as an output entry.*frem.detach"):
        train_step(model, x)
    assert frem.status(model)[0].reaches == "no" and handle._reach["detail"].startswith("FREM at encoder")
    assert not model._forward_hooks  # the check removed itself


def test_a_module_whose_output_is_dropped_is_refused_and_a_live_one_is_verified_at_its_first_call():
    model, x = Dropped(), torch.randn(2, 1, 16, 16)
    with pytest.raises(EffectDoesNotReach, match="nothing the model returns is computed from it"):
        frem.attach(model, "aux", B=2, X=10.0, example_input=x)
    handle = frem.attach(model, "down", B=2, X=10.0)
    assert handle._reach["state"] is None and len(model._forward_hooks) == 1
    train_step(model, x)
    assert handle._reach["state"] == "yes" and not model._forward_hooks
    y = train_step(model, x)  # no probe after the first call: the bare training graph
    assert y.grad_fn.name() == "ConvolutionBackward0"


def test_the_check_hooks_the_model_only_while_it_trains():
    """Torch 2.6 exports an eval model with a forward hook on it (smp's U-Net) as two graphs and fails: an
    attached model in eval carries no hook of frem's; train() puts the check back until it has a verdict."""
    model, x = Dropped().eval(), torch.randn(2, 1, 16, 16)
    handle = frem.attach(model, "down", B=2, X=10.0)
    assert not model._forward_hooks and handle._reach["state"] is None
    model.train()
    assert len(model._forward_hooks) == 1
    model.eval()
    assert not model._forward_hooks
    for module in model.modules():  # by hand, not train(): the check arms at the first call, judges at the next
        module.training = True
    model(x).square().mean().backward()
    assert handle._reach["state"] is None and len(model._forward_hooks) == 1
    model(x).square().mean().backward()
    assert handle._reach["state"] == "yes" and not model._forward_hooks
    model.eval().train()  # a verdict is final: nothing hooked again
    assert not model._forward_hooks


def test_the_probe_changes_no_value_and_no_gradient():
    torch.manual_seed(0)
    a, x = HandUNet(), torch.randn(2, 1, 16, 16)
    b = HandUNet()
    b.load_state_dict(a.state_dict())
    frem.attach(a, "middle", B=4, X=50.0)                      # probed at its first call
    frem.attach(b, "middle", B=4, X=50.0, example_input=x)     # verified at attach: never probed in training
    ya, yb = a.train()(x), b.train()(x)
    assert torch.equal(ya, yb)
    ya.square().mean().backward()
    yb.square().mean().backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
    assert frem.status(a)[0].reaches == frem.status(b)[0].reaches == "yes"


def test_an_encoders_own_output_reaches_the_caller():
    """FREM on what the model returns (an encoder's deepest feature, which the caller's decoder reads): the
    other entries are earlier features, not copies of it."""
    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1)

        def forward(self, x):
            f1 = self.a(x)
            return [f1, self.b(f1)]

    model, x = Features(), torch.randn(2, 1, 16, 16)
    handle = frem.attach(model, "", entry=-1, B=2, X=10.0, example_input=x)
    assert handle._reach["state"] == "output"
    model = Features()
    other = frem.attach(model, "b", B=2, X=10.0)
    model.train()(x)[1].sum().backward()
    assert other._reach["state"] == "output"


def test_a_detached_path_is_found_by_a_forward_difference():
    """The head reads the site's tensor through .detach(): no graph joins them, but the values do change."""
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
            self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 2, 1))

        def forward(self, x):
            return self.up(self.down(x).detach())

    handle = frem.attach(Detached(), "down", B=2, X=10.0, example_input=torch.randn(2, 1, 16, 16))
    assert handle._reach["state"] == "yes"


def test_reach_survives_copies_and_pickles():
    import copy
    import io
    model, x = HandUNet(), torch.randn(2, 1, 16, 16)
    frem.attach(model, "middle", B=4, X=50.0)
    y = model.train()(x)  # the probe is pending until the model's forward returns; then checked
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert y.requires_grad and frem.status(twin)[0].reaches == "yes"
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert frem.status(loaded)[0].reaches == "yes"
