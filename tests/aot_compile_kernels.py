"""Compile the kernels for Hopper (sm_90) through the real launcher, with no GPU.

Run without TRITON_INTERPRET (the test runs it in a subprocess). A stand-in
for Triton's CUDA driver reports an sm_90 device, and ``launch_scale_channels``
is called on meta tensors with a ``wrap`` that compiles (``warmup``) instead of
launching: the launcher's own argument binding decides the specialisation
(divisibility-by-16 and ==1 hints, int32/int64), exactly as on a GPU, and
Triton's CUDA backend takes it down to PTX and cubin. Prints one line per case:
its name, the widest global load and store in the PTX, in bytes, and the width
of its index arithmetic (64 where offsets may pass 2**31: the kernels widen the
program id to int64 only then).
"""

import re
import warnings

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

import frem.kernels.scale_channels as k

warnings.filterwarnings("ignore")


class HopperDriver:
    """What the launcher asks of Triton's active driver, for an sm_90 device."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class Compile:
    """A ``wrap`` for the launcher: ``kernel[grid](...)`` compiles and keeps the result."""

    compiled = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            Compile.compiled.append(self.kernel.warmup(*args, grid=grid, **kwargs))
        return compile_only


def widest(ptx: str, op: str) -> int:
    """Bytes of the widest ``ld.global`` / ``st.global`` of x or y in the PTX."""
    widths = [(int(vec or 1)) * int(bits) // 8
              for vec, bits in re.findall(rf"{op}\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.b(\d+)", ptx)]
    return max(widths, default=0)


def index_bits(ptx: str) -> int:
    """64 if the program id is widened (sign-extended) or offsets multiplied out in 64-bit, else 32."""
    return 64 if re.search(r"\bcvt\.s64\.s32\b|\b(?:mad|mul)\.lo\.s64\b", ptx) else 32


def program_id_bits(ptx: str) -> int:
    """64 if the program id's first use widens it (``mul.wide``/``cvt`` to 64 bits): the strided
    kernel's ``pid.to(tl.int64) * BLOCK``; 32 if it is multiplied out in 32 bits (``shl.b32``)."""
    register = re.search(r"mov\.u32\s+(%r\d+),\s*%ctaid\.x;", ptx).group(1)
    first_use = next(line for line in ptx.splitlines()
                     if re.search(re.escape(register) + r"\b", line) and "ctaid" not in line)
    return 64 if re.search(r"\b(?:mul|mad)\.wide\.|\bcvt\.[su]64\.", first_use) else 32


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
CASES = {  # name -> (shape, memory format or a transform making a strided view)
    "nchw-16x512x8x8": ((16, 512, 8, 8), torch.contiguous_format),
    "nchw-64x512x64x64": ((64, 512, 64, 64), torch.contiguous_format),
    "channels_last-16x512x8x8": ((16, 512, 8, 8), torch.channels_last),
    "channels_last-64x512x64x64": ((64, 512, 64, 64), torch.channels_last),
    "nchw-7x7": ((16, 512, 7, 7), torch.contiguous_format),
    "channels_last-C500": ((16, 500, 8, 8), torch.channels_last),
    "ncdhw-3d": ((2, 32, 16, 16, 16), torch.contiguous_format),
    "channels_last_3d": ((2, 32, 16, 16, 16), torch.channels_last_3d),
    "past-2^31": ((1, 64, 2**25 + 2**12), torch.contiguous_format),
}

driver.set_active(HopperDriver())
for dtype_name, dtype in DTYPES.items():
    for case, (shape, fmt) in CASES.items():
        x = torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=fmt)
        scale = torch.empty(shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                            device="meta")
        k.launch_scale_channels(x, scale, torch.empty_like(x), wrap=Compile)
        kernel = Compile.compiled[-1]
        assert kernel.asm["cubin"], "no cubin"
        ptx = kernel.asm["ptx"]
        print(f"{case} {dtype_name} tiles load={widest(ptx, 'ld')} store={widest(ptx, 'st')} "
              f"index={index_bits(ptx)} ok")
for dim in range(4):  # slices along each dim: not dense, the strided kernel
    base = torch.empty(4, 8, 6, 10, dtype=torch.bfloat16, device="meta")
    x = base[(slice(None),) * dim + (slice(None, None, 2),)]
    scale = torch.empty(x.shape[1], device="meta")
    k.launch_scale_channels(x, scale, torch.empty_like(x, memory_format=torch.contiguous_format), wrap=Compile)
    kernel = Compile.compiled[-1]
    assert kernel.asm["cubin"], "no cubin"
    print(f"sliced-dim{dim} bf16 strided load={widest(kernel.asm['ptx'], 'ld')} "
          f"store={widest(kernel.asm['ptx'], 'st')} index={index_bits(kernel.asm['ptx'])} "
          f"pid={program_id_bits(kernel.asm['ptx'])} ok")
# a strided view whose addresses span past 2**31 elements: the strided kernel with 64-bit offsets
x = torch.empty(2**31 + 64, dtype=torch.bfloat16, device="meta").as_strided((2, 3, 2), (2**31, 7, 1))
k.launch_scale_channels(x, torch.empty(3, device="meta"), torch.empty((2, 3, 2), dtype=torch.bfloat16, device="meta"),
                        wrap=Compile)
ptx = Compile.compiled[-1].asm["ptx"]
print(f"sliced-past-2^31 bf16 strided load={widest(ptx, 'ld')} store={widest(ptx, 'st')} index={index_bits(ptx)} "
      f"pid={program_id_bits(ptx)} ok")
# a strided tensor of more than 2**31 elements: the flat index itself passes int32
x = torch.empty(2**32 + 2**20, dtype=torch.bfloat16, device="meta").as_strided((1, 2, 2**31 + 8), (1, 2**31 + 16, 1))
k.launch_scale_channels(x, torch.empty(2, device="meta"),
                        torch.empty((1, 2, 2**31 + 8), dtype=torch.bfloat16, device="meta"), wrap=Compile)
ptx = Compile.compiled[-1].asm["ptx"]
print(f"sliced-numel-past-2^31 bf16 strided load={widest(ptx, 'ld')} store={widest(ptx, 'st')} index={index_bits(ptx)} "
      f"pid={program_id_bits(ptx)} ok")
