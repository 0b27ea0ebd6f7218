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


def _library_worker(rank, world_size, port, results):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch import nn

    import frem
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same initial weights on both ranks
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))  # tokens (N, L, C): channels last
        handle = frem.attach(model, "0", B=5, X=30.0, dim=-1, seed=3)
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-2)
        torch.manual_seed(rank)  # each rank its own data
        for epoch in range(2):
            frem.resample(ddp, epoch)
            for _ in range(3):
                optimizer.zero_grad()
                ddp(torch.randn(2, 6, 8)).square().mean().backward()
                optimizer.step()
        x = torch.randn(2, 6, 8)
        seen = {}
        model[0].register_forward_hook(lambda m, i, o: seen.__setitem__("enhanced", o.detach()))
        # a backward closes the probe's DDP step: a forward left waiting for its gradients' all-reduce
        # made a rank abort at exit, once in a loaded CI run ("terminate called without an active exception")
        ddp(x).square().mean().backward()
        with torch.no_grad():
            bare = nn.functional.linear(x, model[0].weight, model[0].bias)
        torch.save({"status": [tuple(vars(row).values()) for row in frem.status(ddp)],
                    "channels": handle.channels.tolist(), "weights": model[0].weight.detach().clone(),
                    "ratio": seen["enhanced"] / bare}, f"{results}/library{rank}.pt")
        del ddp, seen
        dist.barrier()  # both ranks done before either tears the group down
    finally:
        dist.destroy_process_group()


def test_under_ddp_each_rank_counts_its_calls_and_a_channels_last_frem_enhances_the_same_channels(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_library_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"library{r}.pt", weights_only=False) for r in (0, 1)]
    import frem
    expected = frem.select_channels(16, 5, 3, 1).tolist()
    for result in ranks:
        (row,) = result["status"]
        assert row == ("0", "output", 5, 30.0, 16, -1, "random", 3, 1, 4, 0, 0, "yes")  # 3 steps + the probe call
        assert result["channels"] == expected
        scale = torch.ones(16)
        scale[expected] = 30.0
        assert torch.allclose(result["ratio"], scale.expand(2, 6, 16), rtol=1e-4)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # DDP kept them in step
