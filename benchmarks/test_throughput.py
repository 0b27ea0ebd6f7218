"""End to end: ``frem train`` images per second against the bare model step.

If the trainer's throughput is close to the model's own forward+backward+Adam
throughput at the same batch and crop, the data pipeline costs nothing.
"""

import os
import statistics
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, SMALL, device_name, interleaved_ms
from torch.nn import functional as F

from frem.seg.config import TrainConfig
from frem.seg.evaluate import autocast
from frem.seg.models import build_model
from frem.seg.train import run_training

DATA = Path(os.environ.get("FREM_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "drosophila-vnc")


@pytest.mark.skipif(not DATA.is_dir(), reason="needs the Drosophila data (FREM_DATA)")
def test_trainer_throughput(benchmark, tmp_path):
    if SMALL:
        config = TrainConfig.build(quick=True, data=str(DATA), out=str(tmp_path / "run"), epochs=2,
                                   tiles_per_section=4, batch_size=4, progress=False)
    elif DEVICE.type == "cuda":  # the paper's protocol: 192 tiles of 256, batch 16
        config = TrainConfig.build(data=str(DATA), out=str(tmp_path / "run"), epochs=6, progress=False)
    else:
        config = TrainConfig.build(quick=True, data=str(DATA), out=str(tmp_path / "run"), epochs=3,
                                   progress=False)
    metrics, model = run_training(config)
    steady = metrics["history"][1:]  # the first epoch pays for cudnn autotuning
    trainer_ips = statistics.median(h["train_images"] / h["train_time_s"] for h in steady)
    epoch_s = statistics.median(h["epoch_time_s"] for h in steady)

    model = build_model(config.variant, encoder=config.encoder, in_channels=1, classes=4).to(DEVICE).train()
    if DEVICE.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    x = torch.randn(config.batch_size, 1, config.crop, config.crop, device=DEVICE)
    if DEVICE.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 4, (config.batch_size, config.crop, config.crop), device=DEVICE)

    def step():
        with autocast(DEVICE):
            loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model_ips = config.batch_size / (interleaved_ms({"step": step}, repeat=3 if SMALL else 20)["step"] * 1e-3)
    benchmark.extra_info.update(device=device_name(), trainer_images_per_s=trainer_ips,
                                model_images_per_s=model_ips, epoch_s=epoch_s,
                                protocol=f"{config.encoder}, batch {config.batch_size}, crop {config.crop}, "
                                         f"{metrics['history'][0]['train_images']} tiles/epoch")
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
