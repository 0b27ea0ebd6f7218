"""Hypothesis strategies for feature maps in every memory layout: (N, C, *spatial), and with the
channels in another dim (channels-last maps (N, *spatial, C), tokens (N, L, C))."""

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted", "expanded")

# One rounding of an exact product to the output dtype: half an ulp on
# hardware; a whole ulp under the Triton interpreter, which truncates to bf16.
RTOL = {torch.float64: 1e-15, torch.float32: 2.0**-23, torch.float16: 2.0**-10,
        torch.bfloat16: 2.0**-7}


def make_layout(base: torch.Tensor, layout: str, draw) -> torch.Tensor:
    """A tensor equal in value to ``base`` but laid out as ``layout``."""
    rank = base.dim()
    if layout == "channels_last" and rank in (4, 5):
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        return base.contiguous(memory_format=fmt)
    if layout == "sliced":
        dim = draw(st.integers(0, rank - 1))
        step = draw(st.integers(2, 3))
        big_shape = list(base.shape)
        big_shape[dim] = base.shape[dim] * step
        big = torch.full(big_shape, float("nan"), dtype=base.dtype)
        index = [slice(None)] * rank
        index[dim] = slice(None, None, step)
        big[tuple(index)] = base
        return big[tuple(index)]
    if layout == "permuted":
        perm = draw(st.permutations(range(rank)))
        inverse = [perm.index(d) for d in range(rank)]
        return base.permute(perm).contiguous().permute(inverse)
    if layout == "expanded":
        # Stride 0 along every dim of size > 1 but one: the layout of the
        # gradient that y.sum() sends back, and of broadcast inputs.
        keep = draw(st.integers(0, rank - 1))
        small = base.clone()
        index = [slice(0, 1) if d != keep else slice(None) for d in range(rank)]
        return small[tuple(index)].expand(base.shape)
    return base.contiguous()


@st.composite
def feature_maps(draw, dtypes=FLOAT_DTYPES, max_side=6, max_channels=9):
    rank = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 3)), draw(st.integers(1, max_channels))]
    shape += [draw(st.integers(1, max_side)) for _ in range(rank - 2)]
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g, dtype=torch.float64) * 10).to(dtype)
    return make_layout(base, layout, draw)


@st.composite
def scales(draw, channels):
    """A (C,) scale: ones with some channels set to a FREM-like X."""
    # Paper values fit bf16 exactly (a fast path on CPU); 10000 and most floats do not.
    X = draw(st.one_of(st.sampled_from([632.0, 250.0, 2.0, 0.5, 10000.0]),
                       st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False)))
    mask = draw(st.lists(st.booleans(), min_size=channels, max_size=channels))
    return torch.tensor([X if m else 1.0 for m in mask], dtype=torch.float32)


@st.composite
def maps_with_channel_dim(draw, dtypes=FLOAT_DTYPES, max_side=6, max_channels=9):
    """(x, dim): a tensor of rank 2-5 whose channels are in ``dim`` (-1 most often: channels last and
    tokens; sometimes a middle dim, or 1), in any memory layout."""
    rank = draw(st.integers(2, 5))
    dim = draw(st.sampled_from([-1, -1, 1] + list(range(2, rank))))
    shape = [draw(st.integers(1, 3))] + [draw(st.integers(1, max_side)) for _ in range(rank - 1)]
    shape[dim] = draw(st.integers(1, max_channels))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(LAYOUTS))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = (torch.randn(shape, generator=g, dtype=torch.float64) * 10).to(dtype)
    return make_layout(base, layout, draw), dim


def reference(x: torch.Tensor, scale: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """float64 ``x * scale`` over ``dim``."""
    shape = [1] * x.dim()
    shape[dim] = -1
    return x.double() * scale.double().view(shape)


def assert_close_to_reference(actual: torch.Tensor, ref64: torch.Tensor, dtype) -> None:
    assert actual.dtype == dtype
    assert actual.shape == ref64.shape
    actual64 = actual.double().cpu()
    assert not actual64.isnan().any(), "an output element was never written"
    overflow = ref64.isinf()  # past float16's 65504: both must be the same infinity
    assert torch.equal(actual64[overflow], ref64[overflow])
    err = (actual64 - ref64).abs()[~overflow]
    bound = RTOL[dtype] * ref64.abs()[~overflow]
    assert (err <= bound).all(), f"max error {err.max().item():.3g}"
