"""PyTorch's own custom-op checker over dtypes x layouts x ranks (CPU, and CUDA where present)."""

import itertools

import pytest
import torch

from frem.kernels.scale_channels import op

op()  # registers torch.ops.frem.scale_channels (on first use, not at import)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = {2: (3, 5), 3: (2, 5, 7), 4: (2, 5, 4, 3), 5: (2, 5, 3, 2, 4)}


def layouts(rank):
    yield "contiguous", lambda t: t
    if rank == 4:
        yield "channels_last", lambda t: t.contiguous(memory_format=torch.channels_last)
    if rank == 5:
        yield "channels_last_3d", lambda t: t.contiguous(memory_format=torch.channels_last_3d)
    yield "sliced", lambda t: torch.cat([t, t], -1)[..., ::2]
    yield "transposed", lambda t: t.transpose(0, -1).contiguous().transpose(0, -1)


CASES = [(device, dtype, rank, name, make)
         for device, dtype, rank in itertools.product(DEVICES, DTYPES, SHAPES)
         for name, make in layouts(rank)]


@pytest.mark.parametrize("device, dtype, rank, layout, make", CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}-{c[2]}d-{c[3]}" for c in CASES])
def test_opcheck(device, dtype, rank, layout, make):
    x = make(torch.randn(SHAPES[rank], dtype=dtype, device=device)).requires_grad_(True)
    scale = torch.tensor([1.0, 632.0, 3.0, 1.0, 250.0],
                         dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    torch.library.opcheck(torch.ops.frem.scale_channels.default, (x, scale))
