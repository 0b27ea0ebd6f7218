"""The FREM module: selection, training/eval behaviour, buffers, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import frem
from frem import FREM


@settings(max_examples=50, deadline=None)
@given(C=st.integers(1, 600), data=st.data(), seed=st.integers(0, 2**40), epoch=st.integers(0, 10**6))
def test_selection_is_a_pure_function_of_seed_and_epoch(C, data, seed, epoch):
    B = data.draw(st.integers(1, C))
    first = frem.select_channels(C, B, seed, epoch)
    assert torch.equal(first, frem.select_channels(C, B, seed, epoch))
    assert first.numel() == B == first.unique().numel()
    assert first.min() >= 0 and first.max() < C


def test_random_mode_redraws_each_epoch_and_fixed_mode_does_not():
    random, fixed = FREM(8, 250).bind(512), FREM(8, 250, mode="fixed").bind(512)
    draws = {tuple(random.resample(e).channels.tolist()) for e in range(20)}
    assert len(draws) == 20
    first = fixed.channels.clone()
    assert all(torch.equal(fixed.resample(e).channels, first) for e in range(20))
    # two modules with one seed, as on two DDP ranks, agree without talking
    assert torch.equal(FREM(8, 250, seed=3).bind(512).resample(7).channels,
                       FREM(8, 250, seed=3).bind(512).resample(7).channels)


@settings(max_examples=40, deadline=None)
@given(C=st.integers(1, 64), data=st.data(), X=st.floats(1e-3, 1e4), seed=st.integers(0, 99))
def test_training_forward_scales_exactly_the_chosen_channels(C, data, X, seed):
    B = data.draw(st.integers(1, C))
    module = FREM(B, X, seed=seed).train()
    x = torch.randn(2, C, 3, 3, dtype=torch.float64, requires_grad=True)
    y = module(x)
    expected = x.detach().clone()
    expected[:, module.channels] *= float(torch.tensor(X, dtype=torch.float32))
    assert torch.allclose(y, expected, rtol=1e-12, atol=0)
    others = torch.ones(C, dtype=torch.bool)
    others[module.channels] = False
    assert module.B == B and module.scale[others].eq(1).all()
    assert module.scale[module.channels].eq(float(torch.tensor(X, dtype=torch.float32))).all()
    y.sum().backward()
    assert torch.equal(x.grad, module.scale.double().view(1, -1, 1, 1).expand_as(x))


def test_eval_returns_the_input_object():
    module = FREM(2, 10).eval()
    x = torch.randn(2, 4, 3, 3)
    assert module(x) is x
    assert module.num_channels is None  # eval never even looks at the tensor


def test_float_B_is_a_fraction_of_the_channels():
    assert FREM(0.25, 10).bind(512).B == 128
    assert FREM(1e-6, 10).bind(512).B == 1
    assert FREM(1.0, 10).bind(3).B == 3


def test_buffers_follow_to_and_stay_out_of_state_dict():
    module = FREM(2, 10).bind(4)
    assert module.state_dict() == {}
    module.to(torch.float64)
    assert module.scale.dtype == torch.float64 and module.channels.dtype == torch.long
    x = torch.randn(1, 4, 2, 2)
    assert module.train()(x).dtype == torch.float32  # the op casts the scale, not x
    module.to("meta")
    assert module.scale.device.type == module.channels.device.type == "meta"
    assert module.state_dict() == {}


def test_a_fractional_B_is_rounded_and_the_channels_come_sorted():
    assert FREM(0.3, 10).bind(512).B == 154  # 153.6 rounds up; truncation would give 153
    assert FREM(0.2, 10).bind(12).B == 2     # 2.4 rounds down
    for epoch in range(5):
        channels = frem.select_channels(512, 40, 3, epoch)
        assert torch.equal(channels, channels.sort().values) and channels.unique().numel() == 40


def test_bfloat16_trains_and_float16_is_refused_with_a_pointer_to_bf16():
    module = FREM(2, 632, layer="encoder").train()
    assert module(torch.randn(1, 4, 2, 2).bfloat16()).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="float16.*bfloat16"):
        module(torch.randn(1, 4, 2, 2).half())
    module.eval()(torch.randn(1, 4, 2, 2).half())  # inference in fp16 is fine


def test_repr_is_readable():
    text = repr(FREM(8, 250, layer="encoder").bind(512).resample(3))
    assert text == "FREM(B=8, X=250, mode='random', seed=0, layer='encoder', channels=512, epoch=3)"


@pytest.mark.parametrize("B, X, mode, message", [
    (0, 1.0, "random", "at least 1"),
    (-3, 1.0, "random", "at least 1"),
    (0.0, 1.0, "random", r"\(0, 1\]"),
    (1.5, 1.0, "random", r"\(0, 1\]"),
    (math.nan, 1.0, "random", r"\(0, 1\]"),
    (True, 1.0, "random", "int count"),
    ("8", 1.0, "random", "int count"),
    (8, 0.0, "random", "X must be"),
    (8, -1.0, "random", "X must be"),
    (8, math.nan, "random", "X must be"),
    (8, math.inf, "random", "X must be"),
    (8, 1.0, "sometimes", "mode must be"),
])
def test_bad_settings_are_named(B, X, mode, message):
    with pytest.raises((ValueError, TypeError), match=message):
        FREM(B, X, mode=mode)


def test_B_larger_than_the_channels_is_named_at_first_forward():
    module = FREM(10, 2.0, layer="block3").train()
    with pytest.raises(ValueError, match=r"B=10 is larger than the 4 channels of layer 'block3'"):
        module(torch.randn(1, 4, 2, 2))


def test_no_channel_dimension_is_named():
    with pytest.raises(ValueError, match="layer 'pool' has no channel dimension"):
        FREM(1, 2.0, layer="pool").train()(torch.randn(5))
