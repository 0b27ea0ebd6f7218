"""The FREM module: selection, training/eval behaviour, buffers, errors."""

import math
import warnings

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
    unbound = FREM(2, 10)  # nothing drawn until it knows its width
    assert unbound.channels.numel() == unbound.scale.numel() == 0 and unbound.channels.dtype == torch.long
    assert unbound.state_dict() == {}
    module = FREM(2, 10).bind(4)
    assert module.state_dict() == {}
    module.to(torch.float64)
    assert module.scale.dtype == torch.float32 and module.channels.dtype == torch.long  # X is held in fp32
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


def test_bfloat16_and_float16_train_in_their_own_dtype():
    module = FREM(2, 632, layer="encoder").train()
    assert module(torch.randn(1, 4, 2, 2).bfloat16()).dtype == torch.bfloat16
    assert module(torch.randn(1, 4, 2, 2).half()).dtype == torch.float16  # capped, test_mixed_precision.py
    x = torch.randn(1, 4, 2, 2).half()
    assert module.eval()(x) is x  # inference: untouched


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


@pytest.mark.parametrize("X", ["8", True, None, 1e300, float(torch.finfo(torch.float32).max) * 1.01])
def test_X_must_be_a_real_number_the_float32_scale_can_hold(X):
    with pytest.raises(ValueError, match=r"X must be a finite number in \(0, 3\.403e\+38\]"):
        FREM(8, X)


def test_the_largest_float32_X_is_allowed():
    assert FREM(1, float(torch.finfo(torch.float32).max)).bind(2).scale.max() == torch.finfo(torch.float32).max


DRAW_OF_RECORD = [104, 119, 124, 141, 149, 241, 264, 416]  # seed 0, epoch 0, 8 of 512: since frem 0.1


def test_the_draw_is_pinned_so_results_stay_reproducible_across_versions():
    """Changing the draw silently changes every FREM result: these are the channels of record."""
    assert frem.select_channels(512, 8, 0, 0).tolist() == DRAW_OF_RECORD
    assert torch.equal(FREM(8, 250).bind(512).channels, frem.select_channels(512, 8, 0, 0))  # epoch 0 first


def test_bind_puts_the_buffers_where_asked_or_where_the_module_is():
    assert FREM(2, 5.0).bind(4, device="meta").scale.device.type == "meta"
    moved = FREM(2, 5.0).to("meta").bind(4)
    assert moved.scale.device.type == moved.channels.device.type == "meta"
    # the float16 counters too, as integers: summed on the device each step, read once an epoch
    assert moved.capped.device.type == moved.overflowed.device.type == "meta"
    assert moved.capped.dtype == moved.overflowed.dtype == torch.long
    lazy = FREM(2, 5.0).train()
    lazy(torch.empty(3, 4, 2, device="meta"))  # learnt at the first call, on the input's device
    assert lazy.num_channels == 4 and lazy.scale.device.type == "meta"


def test_a_two_dimensional_input_is_a_feature_map_too():
    module = FREM(1, 5.0).train()
    x = torch.randn(3, 4)
    y = module(x)
    assert module.num_channels == 4
    assert torch.equal(y, x * module.scale)


def test_binding_removes_the_lazy_hook():
    module = FREM(1, 5.0)
    assert "_initialize_hook" in module.__dict__ and len(module._forward_pre_hooks) == 1
    module.train()(torch.randn(1, 3, 2))
    assert "_initialize_hook" not in module.__dict__ and not module._forward_pre_hooks
    assert "_initialize_hook" not in FREM(1, 5.0, num_channels=3).__dict__


def test_messages_for_an_unnamed_frem():
    with pytest.raises(ValueError, match=r"^FREM's input has no channel dimension 1 \(output \(5,\)\)"):
        FREM(1, 2.0).train()(torch.randn(5))
    with pytest.raises(ValueError, match=r"^FREM's input has no channel dimension 1 \(output list\)"):
        FREM(1, 2.0).train()([1.0, 2.0])
    with pytest.raises(ValueError, match=r"B=10 is larger than the 4 channels of the layer$"):
        FREM(10, 2.0).bind(4)
    assert "channels=?" in repr(FREM(1, 2.0))


def test_remove_on_a_frem_that_was_never_attached():
    with pytest.raises(RuntimeError, match="not attached with frem.attach"):
        FREM(1, 2.0).remove()


def test_the_stale_draw_warning_comes_exactly_once(monkeypatch):
    import warnings

    import frem.module
    monkeypatch.setattr(frem.module, "STALE_DRAW_STEPS", 3)
    module = FREM(2, 5.0).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            module(torch.randn(1, 4, 2, 2))
    assert len([w for w in caught if "never re-drawn" in str(w.message)]) == 1


def test_binding_again_to_another_width():
    module = FREM(2, 5.0, num_channels=4)
    module.bind(6)
    assert module.num_channels == 6 and module.scale.numel() == 6 and module.channels.numel() == 2


def _built_on_meta(**attach):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                    torch.nn.Conv2d(8, 2, 1))
    return model, frem.attach(model, layer="1", B=3, X=10.0, seed=4, **attach)


def _enhances_exactly(model, handle):
    """A float32 training step multiplies exactly B channels by X and counts nothing capped."""
    x = torch.randn(2, 1, 8, 8)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.detach().clone()
        return hook
    handles = [model[1].register_forward_hook(record("bare"), prepend=True),
               model[1].register_forward_hook(record("enhanced"))]
    model.train()(x)
    for h in handles:
        h.remove()
    expected = torch.ones(8)
    expected[frem.select_channels(8, 3, 4, handle.epoch)] = 10.0
    assert torch.equal(handle.scale, expected)
    assert torch.equal(seen["enhanced"], seen["bare"] * expected.view(1, -1, 1, 1))
    assert int(handle.capped) == int(handle.overflowed) == 0


@pytest.mark.parametrize("lazy", [False, True])
def test_a_model_built_on_the_meta_device_gets_defined_state_from_to_empty(lazy):
    """Large-model code builds on the meta device and calls to_empty: FREM's buffers must not keep the
    uninitialised memory to_empty hands out (a float32 run warned of 10^14 capped values)."""
    model, handle = _built_on_meta()
    if lazy:
        handle.remove()
        handle = frem.attach(model, layer="2", at="input", B=3, X=10.0, seed=4)
        assert handle.num_channels is None
    model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p)
    if lazy:
        model.train()(torch.randn(2, 1, 8, 8))  # binds; then the output hook below sees the bound FREM
        handle.remove()
        handle = frem.attach(model, layer="1", B=3, X=10.0, seed=4)
    assert handle.scale.device.type == "cpu"
    _enhances_exactly(model, handle)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frem.resample(model, 1)  # no warning of capped values


def test_state_stays_defined_after_reset_parameters_and_load_state_dict():
    model, handle = _built_on_meta()
    bare = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1),
                               torch.nn.Conv2d(8, 2, 1))
    model.load_state_dict(bare.state_dict(), assign=True)  # the parameters are real, FREM's buffers still meta
    assert handle.scale.is_meta
    _enhances_exactly(model, handle)  # the first training call defines them on the input's device
    handle.resample(2)
    handle.capped.fill_(5)
    handle.scale.fill_(0.0)
    handle.reset_parameters()  # what FSDP's default param_init_fn calls on every module
    assert int(handle.capped) == 0 and handle.epoch == 2
    _enhances_exactly(model, handle)


def test_half_keeps_X_exact():
    """X=2.9 in float16 is 2.9004: a scale converted by .half() would enhance by another X."""
    module = FREM(2, 2.9).bind(4).half()
    assert module.scale.dtype == torch.float32
    assert module.scale[module.channels].eq(torch.tensor(2.9, dtype=torch.float32)).all()
    module.capped.fill_(3)
    module.to(torch.float64)
    assert int(module.capped) == 3  # a plain move keeps what the counters hold


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_channels_last_maps_and_tokens_get_exactly_B_channels_times_X(data):
    """dim=-1: (N, H, W, C) maps and (N, L, C) tokens. Training multiplies exactly the B drawn channels of the
    last dim by X (gradients too, against float64), eval returns the input object."""
    from strategies import maps_with_channel_dim, reference
    x, dim = data.draw(maps_with_channel_dim(dtypes=(torch.float64,)))
    C = x.shape[dim]
    B = data.draw(st.integers(1, C))
    module = FREM(B, 250.0, seed=data.draw(st.integers(0, 99)), dim=dim).train()
    x.requires_grad_(True)
    y = module(x)
    assert module.num_channels == C and module.channels.numel() == B
    scale = torch.ones(C, dtype=torch.float64)
    scale[module.channels] = 250.0
    assert torch.equal(y, reference(x.detach(), scale, dim))
    grad = torch.randn(x.shape, dtype=torch.float64)
    y.backward(grad)
    assert torch.equal(x.grad, reference(grad, scale, dim))
    assert module.eval()(x) is x


def test_a_channel_dim_of_zero_or_past_the_tensor_is_named():
    with pytest.raises(ValueError, match=r"dim is the channel dim: 1 for \(N, C, \*spatial\), -1 for"):
        FREM(1, 2.0, dim=0)
    with pytest.raises(ValueError, match=r"has no channel dimension 3 \(output \(2, 4, 5\)\)"):
        FREM(1, 2.0, dim=3).train()(torch.randn(2, 4, 5))
    module = FREM(2, 2.0, dim=-1).train()
    module(torch.randn(1, 3, 3, 8))
    with pytest.raises(ValueError, match=r"has 3 channels in dim -1, but this FREM was bound to 8: the layer's layout"):
        module(torch.randn(1, 8, 3, 3))  # the same map channels first: refused, not scaled along the width
    assert "dim=-1" in repr(module) and "dim=" not in repr(FREM(1, 2.0))


def test_fullgraph_compile_of_a_frem_on_tokens():
    import torch._dynamo
    torch._dynamo.reset()
    module = FREM(3, 10.0, dim=-1, num_channels=8).train()
    x = torch.randn(2, 49, 8, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    scale = torch.ones(8)
    scale[module.channels] = 10.0
    assert torch.equal(y, x * scale)
    y.sum().backward()
    assert torch.equal(x.grad, scale.expand(2, 49, 8))
