"""Memory that must stay bounded: ``frem predict``'s peak at two image sizes.

What grows with the image is the slope between the two peaks (bytes per pixel):
the image itself (1 byte a pixel, 8-bit greyscale), its uint8 labels and its
uint8 RGB overlay, and what Pillow copies to write them; nothing image-sized in
float. The rest of the peak (the model, one tile's activations) does not grow.
Each size runs in a fresh process, which reads its own peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` once the model is loaded).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
SIZES = (256, 512) if SMALL else (4096, 8192)  # square 8-bit greyscale sections

SCRIPT = r"""
import json, sys, numpy as np, torch
from PIL import Image
from frem.seg import checkpoint
from frem.seg.config import TrainConfig
from frem.seg.models import build_model
from frem.seg.predict import predict

size, folder = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(2)
config = TrainConfig.build(quick=True, variant="baseline")
model = build_model("baseline", encoder=config.encoder, in_channels=1, classes=4, seed=0)
checkpoint.save({"config": config.to_dict(), "model": model.state_dict(), "classes": ["a", "b", "c", "background"],
                 "in_channels": 1, "normalization": {"mode": "image"}}, f"{folder}/best.pt")
rng = np.random.default_rng(0)
Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(f"{folder}/section.png")
Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(f"{folder}/warm.png")
predict(f"{folder}/best.pt", [f"{folder}/warm.png"], f"{folder}/out", device="cpu")  # imports, allocator warm

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from what is resident now
before = status("VmRSS")
predict(f"{folder}/best.pt", [f"{folder}/section.png"], f"{folder}/out", device="cpu")
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def peak_above_start(size: int, folder: Path) -> int:
    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(size), str(folder)], capture_output=True, text=True,
                          timeout=1200, check=True)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return measured["peak"] - measured["before"]


def test_predict_peak_memory_grows_by_bytes_per_pixel(benchmark, tmp_path):
    peaks = {}

    def measure():
        for size in SIZES:
            peaks[size] = peak_above_start(size, tmp_path / f"{size}-{len(peaks)}")

    benchmark.pedantic(measure, rounds=1, iterations=1)
    small, large = SIZES
    slope = (peaks[large] - peaks[small]) / (large ** 2 - small ** 2)
    benchmark.extra_info.update(predict_peak_bytes={str(s): peaks[s] for s in SIZES}, bytes_per_pixel=slope,
                                image="8-bit greyscale PNG", model="smp.Unet resnet18 (the --quick model)")
