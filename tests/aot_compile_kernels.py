"""Compile every kernel variant for Hopper (sm_90) with Triton's CUDA backend.

Run without TRITON_INTERPRET (the test runs it in a subprocess): on a machine
with no GPU this still takes each kernel through Triton's real code
generation down to PTX and cubin (Triton ships ptxas), which the interpreter
never does. Prints one line per variant.
"""

import itertools
import warnings

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import frem.kernels.scale_channels as k

warnings.filterwarnings("ignore")
TARGET = GPUTarget("cuda", 90, 32)
POINTER = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}


def compile_variant(fn, signature, constexprs):
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=TARGET, options={"num_warps": 4})
    assert compiled.asm["cubin"], "no cubin"
    return compiled


for dtype, int64 in itertools.product(POINTER, (False, True)):
    compute = tl.float64 if dtype == "fp64" else tl.float32
    index = "i64" if int64 else "i32"
    scale = "*fp64" if dtype == "fp64" else "*fp32"
    compile_variant(k._scale_dense_kernel,
                    {"x_ptr": POINTER[dtype], "scale_ptr": scale, "y_ptr": POINTER[dtype], "numel": index,
                     "stride_c": index, "C": "i32", "BLOCK": "constexpr", "INT64": "constexpr",
                     "COMPUTE": "constexpr"},
                    {"BLOCK": k._block_size(8 if dtype == "fp64" else 4 if dtype == "fp32" else 2),
                     "INT64": int64, "COMPUTE": compute})
    print(f"dense {dtype} int64={int64} ok")

for c_dim, int64 in itertools.product(range(5), (False, True)):
    index = "i64" if int64 else "i32"
    signature = {"x_ptr": "*bf16", "scale_ptr": "*fp32", "y_ptr": "*bf16", "numel": index,
                 **{f"size{d}": "i32" for d in range(1, 5)}, **{f"xs{d}": index for d in range(5)},
                 "C_DIM": "constexpr", "BLOCK": "constexpr", "INT64": "constexpr", "COMPUTE": "constexpr"}
    compile_variant(k._scale_strided_kernel, signature,
                    {"C_DIM": c_dim, "BLOCK": k._block_size(2), "INT64": int64, "COMPUTE": tl.float32})
    print(f"strided C_DIM={c_dim} int64={int64} ok")
