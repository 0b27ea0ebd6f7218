"""DDP on two CPU processes (gloo): same FREM channels, identical weights."""

import pytest
import socket

import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # minutes in all: left out of `-m "not slow"`


def _worker(rank, world_size, port, config, results):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from frem.seg.train import run_training
    metrics, model = run_training(config)
    torch.save({"history": metrics["history"],
                "params": {k: v for k, v in model.named_parameters()}}, f"{results}/rank{rank}.pt")


def test_two_ranks_draw_the_same_channels_and_end_identical(tiny_config, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tiny_config(epochs=2, tiles_per_section=4, batch_size=4, device="cpu")  # gloo, on any machine
    mp.spawn(_worker, args=(2, port, config, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    channels0 = [h["frem_channels"] for h in rank0["history"]]
    assert channels0 == [h["frem_channels"] for h in rank1["history"]]
    assert channels0[0] != channels0[1]
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in rank0["params"])
    assert (tmp_path / "run" / "metrics.json").is_file()  # written once, by rank 0
