"""``y = x * scale[c]``: per-channel scaling, the one op FREM needs.

Layout: ``x`` is (N, C, *spatial) with 0 to 3 spatial dims; ``scale`` is (C,).
Channels elsewhere (``dim``: channels-last maps (N, *spatial, C), a
transformer's tokens (N, L, C)) are a permuted view of that: ``x.movedim(dim,
1)`` is (N, C, ...) with the channels innermost in memory, which the dense
kernel's column path serves with one read and one write, and the result is
moved back. No copy is made either way.

The backward of a channel scaling is the same channel scaling of the incoming
gradient (``dx = dy * scale``), so one pair of kernels serves both passes:

* ``_scale_tiles_kernel``: ``x`` is non-overlapping and dense in any dim
  order (contiguous, channels_last, channels_last_3d, permuted). ``y`` gets
  the same strides, and memory is read as (outer, C, inner) with
  ``inner = stride_c``. Where a channel's run is long (``inner >= 16``,
  NCHW-like) the tiles are (rows = outer * C, cols = inner) and each row's
  scale is loaded once; otherwise (channels_last-like) they are (rows = outer,
  cols = C * inner) and each column's scale is loaded once. No per-element
  division or gather, and the contiguous axis stays contiguous for 16-byte
  vectors.
* ``_scale_strided_kernel``: anything else (slices, transposes, the stride-0
  expanded gradient of ``y.sum()``). ``y`` is allocated dense and walked in its
  own memory order; each element's coordinates give the address in ``x``.

Both compute in fp32 (fp64 for fp64 inputs) and write the input's dtype.
Offsets switch to int64 only when a tensor's address span passes 2**31.

Which path runs (``scale_channels``): under ``torch.compile`` plain torch
ops, which Inductor fuses into the neighbouring kernels; in eager mode on CUDA
the Triton kernels for tensors of at least ``KERNEL_MIN_NUMEL`` elements, and
plain torch ops below that and on CPU, where a custom op's host cost (tens of
microseconds a call) would exceed the work.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

# Triton (and, through torch.library.triton_op, Inductor and Dynamo) is imported
# on first use, not by ``import frem``: together they take seconds to import,
# and most processes never launch the kernel (CPU, small tensors, torch.compile).
triton = tl = None

MAX_RANK = 5  # (N, C) plus up to three spatial dims
_INT32_LIMIT = 2**31 - 1
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Eager CUDA calls below this many elements take plain torch ops. A prediction
# (benchmarks/NOTES.md): the custom op's extra host time (~20-40 us) equals the
# device time it saves (8 of 12 bytes an element in bf16) near 2**22
# elements at 3 TB/s. The GPU benchmark measures the crossover.
KERNEL_MIN_NUMEL = 1 << 22
TILE_BYTES = 16384  # per program: 8 16-byte vectors a thread with 4 warps
ROW_MIN_INNER = 16  # a channel's run at least this long: one scale per row


# The two kernels, JIT-compiled by load_triton(); their tl.constexpr annotations are
# strings until then (postponed annotations), which Triton reads as written. Not
# mutated by mutmut (Triton compiles them from their source, which mutmut's wrappers
# replace): tests/audit_mutants.sh holds their hand-written mutants.
def _scale_tiles_kernel(  # pragma: no mutate block
    x_ptr, scale_ptr, y_ptr, R, K, C, inner, tiles_k,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ROW_CHANNEL: tl.constexpr,
    INT64: tl.constexpr, COMPUTE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_r = pid // tiles_k
    pid_k = pid - pid_r * tiles_k
    if INT64:
        pid_r = pid_r.to(tl.int64)
        pid_k = pid_k.to(tl.int64)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < R
    col_ok = cols < K
    if ROW_CHANNEL:  # a row is one (outer, channel) run: one scale per row
        s = tl.load(scale_ptr + rows % C, mask=row_ok, other=0.0)[:, None]
    else:  # the channel is the column's: one scale per column
        s = tl.load(scale_ptr + cols // inner, mask=col_ok, other=0.0)[None, :]
    offs = rows[:, None] * K + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = x.to(COMPUTE) * s.to(COMPUTE)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _scale_strided_kernel(  # pragma: no mutate block
    x_ptr, scale_ptr, y_ptr, numel,
    size1, size2, size3, size4,
    xs0, xs1, xs2, xs3, xs4,
    C_DIM: tl.constexpr, BLOCK: tl.constexpr, INT64: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    # Dims arrive permuted into y's memory order, so y's offset is the flat
    # index and only x needs the coordinate arithmetic.
    pid = tl.program_id(0)
    if INT64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
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
    s = tl.load(scale_ptr + channel, mask=mask, other=0.0)
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    y = x.to(COMPUTE) * s.to(COMPUTE)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def load_triton() -> bool:
    """Import Triton and JIT-compile the kernels, once; False where Triton is not installed."""
    global triton, tl, _scale_tiles_kernel, _scale_strided_kernel
    if triton is not None:
        return True
    try:
        import triton as triton_module
        import triton.language as language
    except ImportError:  # pragma: no cover - exercised only on platforms without triton
        return False
    tl = language
    _scale_tiles_kernel = triton_module.jit(_scale_tiles_kernel)
    _scale_strided_kernel = triton_module.jit(_scale_strided_kernel)
    triton = triton_module
    return True


def needs_int64(x: torch.Tensor) -> bool:
    """Whether an offset into ``x`` can pass int32: by its address span, not its element
    count (a small view of a large storage spans far more than it holds)."""
    span = sum((n - 1) * abs(s) for n, s in zip(x.shape, x.stride())) + 1
    return max(x.numel(), span) > _INT32_LIMIT


def tile_plan(x: torch.Tensor, y: torch.Tensor) -> dict:
    """The dense kernel's view of ``x``: rows, columns, tile shape, which axis holds the channel."""
    numel, C = x.numel(), x.shape[1]
    inner = y.stride(1) if C > 1 else numel // x.shape[0]
    outer = numel // (C * inner)
    row_channel = inner >= ROW_MIN_INNER or C == 1
    R, K = (outer * C, inner) if row_channel else (outer, C * inner)
    elements = TILE_BYTES // x.element_size()
    block_k = min(1 << max(K - 1, 0).bit_length(), elements)
    block_r = max(1, elements // block_k)
    return {"R": R, "K": K, "C": C, "inner": inner, "BLOCK_R": block_r, "BLOCK_K": block_k,
            "ROW_CHANNEL": row_channel, "INT64": needs_int64(x)}


def _strided_block(element_size: int) -> int:
    # 16 bytes per thread per access, 4 warps, 4 accesses in flight per thread.
    return 128 * 4 * (16 // element_size)


def launch_scale_channels(x: torch.Tensor, scale: torch.Tensor, y: torch.Tensor,
                          wrap=lambda kernel: kernel) -> torch.Tensor:
    """Write ``x * scale[c]`` into ``y`` (allocated by ``torch.empty_like(x)``).

    ``wrap`` is ``torch.library.wrap_triton`` inside the registered op and the
    identity when tests call the launcher directly (``TRITON_INTERPRET=1``).
    """
    if not load_triton():
        raise RuntimeError("the scale_channels kernels need triton (pip install triton)")
    numel = x.numel()
    if numel == 0:
        return y
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.stride() == y.stride():  # empty_like kept x's strides: x is dense
        plan = tile_plan(x, y)
        tiles_k = triton.cdiv(plan["K"], plan["BLOCK_K"])
        grid = (triton.cdiv(plan["R"], plan["BLOCK_R"]) * tiles_k,)
        wrap(_scale_tiles_kernel)[grid](
            x, scale, y, plan["R"], plan["K"], plan["C"], plan["inner"], tiles_k,
            BLOCK_R=plan["BLOCK_R"], BLOCK_K=plan["BLOCK_K"], ROW_CHANNEL=plan["ROW_CHANNEL"],
            INT64=plan["INT64"], COMPUTE=compute, num_warps=4,
        )
        return y
    # Walk y in memory order: sort its dims by stride, largest first, and pad to
    # MAX_RANK with leading size-1 dims that cost nothing.
    order = sorted(range(x.dim()), key=lambda d: (y.stride(d), y.shape[d]), reverse=True)
    pad = MAX_RANK - x.dim()
    sizes = [1] * pad + [x.shape[d] for d in order]
    x_strides = [0] * pad + [x.stride(d) for d in order]
    int64 = needs_int64(x)
    block = _strided_block(x.element_size())
    wrap(_scale_strided_kernel)[(triton.cdiv(numel, block),)](
        x, scale, y, numel, *sizes[1:], *x_strides,
        C_DIM=pad + order.index(1), BLOCK=block, INT64=int64, COMPUTE=compute, num_warps=4,
    )
    return y


def _broadcast(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return scale.view((1, -1) + (1,) * (x.dim() - 2))


def _scale_channels_torch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The op on CPU: the fp32 (fp64) product, rounded once into x's dtype and strides."""
    return torch.mul(x, _broadcast(scale, x), out=torch.empty_like(x))


def _registered():
    """Define the op (imports Triton and Inductor: triton_op reads the launcher for its kernels)."""
    from torch.library import triton_op, wrap_triton
    load_triton()

    @triton_op("frem::scale_channels", mutates_args=())
    def scale_channels_op(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or triton is None:
            # Inductor traces this body and would lower the Triton kernel for CPU
            # tensors too (ignoring register_kernel), which no CPU build can run.
            return _scale_channels_torch(x, scale)
        y = torch.empty_like(x)
        # Triton launches on the current device: a tensor on cuda:1 needs cuda:1 current.
        with torch.cuda.device(x.device) if x.device.index != torch.cuda.current_device() else nullcontext():
            return launch_scale_channels(x, scale, y, wrap=wrap_triton)

    # No CPU kernel to register: the body serves CPU tensors. (wrap_triton refuses interpreted
    # kernels in eager mode, pytorch#152868, so tests drive the kernels via launch_scale_channels.)
    # The fake is explicit although triton_op could derive it from the body: on CUDA that would
    # plan tiles under fake tensors, which no CPU test can check.
    scale_channels_op.register_fake(lambda x, scale: torch.empty_like(x))
    scale_channels_op.register_autograd(_backward, setup_context=_setup_context)
    return scale_channels_op


_op = None


def op():
    """The registered op, ``torch.ops.frem.scale_channels``: defined at the first call."""
    global _op
    if _op is None:
        _op = _registered()
    return _op


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _backward(ctx, grad):
    (scale,) = ctx.saved_tensors
    return op()(grad, scale), None


def scale_channels_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain differentiable torch ops with the op's numerics: fp32 product, one rounding.

    What ``torch.compile`` sees (Inductor fuses it into one pointwise kernel
    with its neighbours) and what small tensors and CPU tensors run eagerly.
    """
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu" \
            and not torch.compiler.is_compiling():
        narrow = scale.to(x.dtype)
        # CPU multiplies half-precision pairs in fp32 and rounds once, and the
        # product of two half-precision numbers is exact in fp32: when the
        # scale fits x's dtype this vectorised same-dtype multiply is the fp32
        # result bit for bit, without the slow mixed-dtype CPU loop. Checking
        # it reads host memory: no device sync.
        if torch.equal(narrow.to(scale.dtype), scale):
            return x * _broadcast(narrow, x)
    y = x * _broadcast(scale, x)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def scale_channels(x: torch.Tensor, scale: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Return ``x * scale`` broadcast over ``dim`` (the channels), differentiable in ``x``.

    ``x``: (N, C, *spatial) with 0-3 spatial dims for ``dim=1``; (N, *spatial, C)
    or tokens (N, L, C) for ``dim=-1``; floating point, any strides.
    ``scale``: (C,); cast to fp32 (fp64 for fp64 ``x``) on ``x``'s device. It
    gets no gradient. The result has ``x``'s dtype; for dense inputs also its
    memory format. Every path computes the fp32 product and rounds once.
    """
    if not isinstance(x, torch.Tensor) or not 2 <= x.dim() <= MAX_RANK:
        raise ValueError(
            f"scale_channels expects x of shape (N, C, *spatial) with 2 to {MAX_RANK} dims, "
            f"got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not (-x.dim() < dim < x.dim()) or dim % x.dim() == 0:
        raise ValueError(f"dim must name a channel dim of x (1 to {x.dim() - 1}, or -1 to {1 - x.dim()}; "
                         f"0 is the batch), got dim={dim!r} for x of shape {tuple(x.shape)}")
    dim %= x.dim()
    if dim != 1:  # a permuted view, scaled as (N, C, ...) and moved back: no copy
        return scale_channels(x.movedim(dim, 1), scale).movedim(1, dim)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scale_channels supports {[str(d) for d in SUPPORTED_DTYPES]}, got {x.dtype}")
    if scale.dim() != 1 or scale.shape[0] != x.shape[1]:
        raise ValueError(
            f"scale must have shape (C,) = ({x.shape[1]},) for x of shape {tuple(x.shape)}, "
            f"got {tuple(scale.shape)}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = scale.detach().to(device=x.device, dtype=compute)
    if torch.compiler.is_compiling() or x.device.type != "cuda" or x.numel() < KERNEL_MIN_NUMEL \
            or not load_triton():
        return scale_channels_reference(x, scale)
    return op()(x, scale.contiguous())
