"""``y = x * scale[c]``: per-channel scaling, the one op FREM needs.

Layout: ``x`` is (N, C, *spatial) with 0 to 3 spatial dims; ``scale`` is (C,).

The backward of a channel scaling is the same channel scaling of the incoming
gradient (``dx = dy * scale``), so one pair of kernels serves both passes:

* ``_scale_dense_kernel``: ``x`` is non-overlapping and dense in any dim order
  (contiguous, channels_last, channels_last_3d, permuted). ``y`` gets the same
  strides, so both are walked as flat memory; the channel of memory offset
  ``i`` is ``(i // stride_c) % C``. One read, one write, 16-byte vectors.
* ``_scale_strided_kernel``: anything else (slices, transposes, the stride-0
  expanded gradient of ``y.sum()``). ``y`` is allocated dense and walked in its
  own memory order; each element's coordinates give the address in ``x``.

Both compute in fp32 (fp64 for fp64 inputs) and write the input's dtype.
Offsets switch to int64 only when a tensor's address span passes 2**31.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

try:  # triton is a Linux-only dependency; elsewhere the op runs its torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on platforms without triton
    triton = None

MAX_RANK = 5  # (N, C) plus up to three spatial dims
_INT32_LIMIT = 2**31 - 1
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


if triton is not None:

    @triton.jit
    def _block_offsets(numel, BLOCK: tl.constexpr, INT64: tl.constexpr):
        pid = tl.program_id(0)
        if INT64:
            start = pid.to(tl.int64) * BLOCK
        else:
            start = pid * BLOCK
        offs = start + tl.arange(0, BLOCK)
        return offs, offs < numel

    @triton.jit
    def _scale_and_store(x_ptrs, scale_ptrs, y_ptrs, mask, COMPUTE: tl.constexpr):
        s = tl.load(scale_ptrs, mask=mask, other=0.0)
        x = tl.load(x_ptrs, mask=mask, other=0.0)
        y = x.to(COMPUTE) * s.to(COMPUTE)
        tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_dense_kernel(
        x_ptr, scale_ptr, y_ptr, numel, stride_c, C,
        BLOCK: tl.constexpr, INT64: tl.constexpr, COMPUTE: tl.constexpr,
    ):
        offs, mask = _block_offsets(numel, BLOCK, INT64)
        channel = (offs // stride_c) % C
        _scale_and_store(x_ptr + offs, scale_ptr + channel, y_ptr + offs, mask, COMPUTE)

    @triton.jit
    def _scale_strided_kernel(
        x_ptr, scale_ptr, y_ptr, numel,
        size1, size2, size3, size4,
        xs0, xs1, xs2, xs3, xs4,
        C_DIM: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr,
        COMPUTE: tl.constexpr,
    ):
        # Dims arrive permuted into y's memory order, so y's offset is the flat
        # index and only x needs the coordinate arithmetic.
        offs, mask = _block_offsets(numel, BLOCK, INT64)
        rest = offs
        i4 = rest % size4
        rest = rest // size4
        i3 = rest % size3
        rest = rest // size3
        i2 = rest % size2
        rest = rest // size2
        i1 = rest % size1
        i0 = rest // size1
        x_off = i0 * xs0 + i1 * xs1 + i2 * xs2 + i3 * xs3 + i4 * xs4
        if C_DIM == 0:
            channel = i0
        elif C_DIM == 1:
            channel = i1
        elif C_DIM == 2:
            channel = i2
        elif C_DIM == 3:
            channel = i3
        else:
            channel = i4
        _scale_and_store(x_ptr + x_off, scale_ptr + channel, y_ptr + offs, mask, COMPUTE)


def _block_size(element_size: int) -> int:
    # 16 bytes per thread per access, 4 warps, 4 accesses in flight per thread.
    return 128 * 4 * (16 // element_size)


def launch_scale_channels(x: torch.Tensor, scale: torch.Tensor, y: torch.Tensor,
                          wrap=lambda kernel: kernel) -> torch.Tensor:
    """Write ``x * scale[c]`` into ``y`` (allocated by ``torch.empty_like(x)``).

    ``wrap`` is ``torch.library.wrap_triton`` inside the registered op and the
    identity when tests call the launcher directly (``TRITON_INTERPRET=1``).
    """
    numel = x.numel()
    if numel == 0:
        return y
    block = _block_size(x.element_size())
    grid = (triton.cdiv(numel, block),)
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.stride() == y.stride():
        int64 = numel > _INT32_LIMIT
        wrap(_scale_dense_kernel)[grid](
            x, scale, y, numel, y.stride(1), x.shape[1],
            BLOCK=block, INT64=int64, COMPUTE=compute, num_warps=4,
        )
        return y
    # Walk y in memory order: sort its dims by stride, largest first, and pad to
    # MAX_RANK with leading size-1 dims that cost nothing.
    order = sorted(range(x.dim()), key=lambda d: (y.stride(d), y.shape[d]), reverse=True)
    pad = MAX_RANK - x.dim()
    sizes = [1] * pad + [x.shape[d] for d in order]
    x_strides = [0] * pad + [x.stride(d) for d in order]
    x_span = sum((n - 1) * s for n, s in zip(sizes, x_strides)) + 1
    int64 = max(numel, x_span) > _INT32_LIMIT
    wrap(_scale_strided_kernel)[grid](
        x, scale, y, numel, *sizes[1:], *x_strides,
        C_DIM=pad + order.index(1), BLOCK=block, INT64=int64, COMPUTE=compute, num_warps=4,
    )
    return y


def _scale_channels_torch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = torch.empty_like(x)  # exactly the CUDA path's and the fake's strides
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        narrow = scale.to(x.dtype)
        # A half-precision product of two half-precision numbers is exact in
        # fp32, so when the scale fits x's dtype the vectorised same-dtype mul
        # (fp32 inside, one rounding) equals the fp32 computation bit for bit.
        # Checking that reads host memory only: no device sync.
        if torch.equal(narrow.to(scale.dtype), scale):
            return torch.mul(x, narrow.view(shape), out=out)
        return out.copy_(x.float().mul_(scale.view(shape)))
    # The fp32 scale promotes the product to fp32 (fp64 for fp64 x); out= casts on store.
    return torch.mul(x, scale.view(shape), out=out)


@triton_op("frem::scale_channels", mutates_args=())
def _scale_channels_op(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cuda" or triton is None:
        # Inductor traces this body and would lower the Triton kernel for CPU
        # tensors too (ignoring register_kernel), which no CPU build can run.
        return _scale_channels_torch(x, scale)
    y = torch.empty_like(x)
    return launch_scale_channels(x, scale, y, wrap=wrap_triton)


# Eager CPU calls land here: wrap_triton refuses interpreted kernels in eager
# mode (pytorch#152868), so tests drive the kernels via launch_scale_channels.
_scale_channels_op.register_kernel("cpu")(_scale_channels_torch)


@_scale_channels_op.register_fake
def _scale_channels_fake(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward(ctx, grad):
    (scale,) = ctx.saved_tensors
    return _scale_channels_op(grad, scale), None


_scale_channels_op.register_autograd(_backward, setup_context=_setup_context)


def scale_channels(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return ``x * scale`` broadcast over dim 1, differentiable in ``x``.

    ``x``: (N, C, *spatial) with 0-3 spatial dims, floating point, any strides.
    ``scale``: (C,); cast to fp32 (fp64 for fp64 ``x``) on ``x``'s device. It
    gets no gradient. The result has ``x``'s dtype and memory format.
    """
    if not isinstance(x, torch.Tensor) or not 2 <= x.dim() <= MAX_RANK:
        raise ValueError(
            f"scale_channels expects x of shape (N, C, *spatial) with 2 to {MAX_RANK} dims, "
            f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scale_channels supports {[str(d) for d in SUPPORTED_DTYPES]}, got {x.dtype}")
    if scale.dim() != 1 or scale.shape[0] != x.shape[1]:
        raise ValueError(
            f"scale must have shape (C,) = ({x.shape[1]},) for x of shape {tuple(x.shape)}, "
            f"got {tuple(scale.shape)}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = scale.detach().to(device=x.device, dtype=compute).contiguous()
    return _scale_channels_op(x, scale)
