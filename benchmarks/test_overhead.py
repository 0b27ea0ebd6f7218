"""What FREM costs a model: nothing at inference, one channel scaling in training.

Bare and attached models are timed interleaved (A B A B ...) in one run, so
drifting clocks hit both alike; a bare-vs-bare pair gives the noise floor.
"""

import copy

import segmentation_models_pytorch as smp
import torch
from conftest import DEVICE, SMALL, device_name, interleaved_ms
from torch.nn import functional as F

import frem

ON_GPU = DEVICE.type == "cuda"
# The paper's setting on a GPU; a CPU-sized batch otherwise; a token one in gpu.sh's CI form.
BATCH, SIZE = (1, 64) if SMALL else (16, 256) if ON_GPU else (2, 128)


def default_model():
    torch.manual_seed(0)
    model = smp.Unet("tu-seresnet34", encoder_weights=None, in_channels=1, classes=4).to(DEVICE)
    return model.to(memory_format=torch.channels_last) if ON_GPU else model


def autocast():
    return torch.autocast("cuda", dtype=torch.bfloat16) if ON_GPU else torch.autocast("cpu", enabled=False)


def pair():
    bare = default_model()
    twin = copy.deepcopy(bare)
    attached = copy.deepcopy(bare)
    frem.attach(attached, "bottleneck", B=162, X=632)
    return bare, twin, attached


def training_step(model, optimizer, x, target):
    """One step (forward, loss, backward, the optimizer) as a call to time."""
    def run():
        with autocast():
            loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return run


def eval_ops(model, example) -> list[str]:
    graph = torch.export.export(model, example).graph
    return [str(node.target) for node in graph.nodes if node.op == "call_function"]


def test_inference_overhead(benchmark):
    bare, twin, attached = (m.eval() for m in pair())
    x = torch.randn(BATCH, 1, SIZE, SIZE, device=DEVICE)
    if ON_GPU:
        x = x.contiguous(memory_format=torch.channels_last)

    def infer(model):
        def run():
            with torch.no_grad(), autocast():
                model(x)
        return run

    for model in (bare, twin, attached):
        infer(model)()  # warm-up
    ms = interleaved_ms({"bare": infer(bare), "bare_again": infer(twin), "attached": infer(attached)},
                        repeat=2 if SMALL else 30 if ON_GPU else 10, warmup=0)
    # The eval graph itself: the attached model exports to the very same
    # operations (FREM's two unused buffers only add graph inputs).
    ops = {name: eval_ops(m, (x[:1],)) for name, m in (("bare", bare), ("attached", attached))}
    assert ops["bare"] == ops["attached"]
    nodes = {name: len(o) for name, o in ops.items()}
    benchmark.extra_info.update(device=device_name(), batch=BATCH, size=SIZE, ms=ms,
                                ratio=ms["attached"] / ms["bare"], noise_ratio=ms["bare_again"] / ms["bare"],
                                export_nodes=nodes)
    benchmark.pedantic(infer(attached), rounds=5, warmup_rounds=1)


def test_training_overhead(benchmark):
    bare, twin, attached = (m.train() for m in pair())
    optimizers = {id(m): torch.optim.Adam(m.parameters(), lr=1e-4) for m in (bare, twin, attached)}
    x = torch.randn(BATCH, 1, SIZE, SIZE, device=DEVICE)
    if ON_GPU:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 4, (BATCH, SIZE, SIZE), device=DEVICE)

    def step(model):
        return training_step(model, optimizers[id(model)], x, target)

    for model in (bare, twin, attached):
        step(model)()
    ms = interleaved_ms({"bare": step(bare), "bare_again": step(twin), "attached": step(attached)},
                        repeat=2 if SMALL else 20 if ON_GPU else 6, warmup=0)
    peak = {}
    if ON_GPU:
        for name, model in (("bare", bare), ("attached", attached)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(model)()
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated()
        # FREM writes one extra activation: the scaled bottleneck (bf16 under autocast).
        channels = attached.encoder.out_channels[-1]
        peak["one_activation"] = BATCH * channels * (SIZE // 32) ** 2 * 2
    benchmark.extra_info.update(device=device_name(), batch=BATCH, size=SIZE, ms=ms,
                                ratio=ms["attached"] / ms["bare"], noise_ratio=ms["bare_again"] / ms["bare"],
                                peak_bytes=peak)
    benchmark.pedantic(step(attached), rounds=3, warmup_rounds=1)


def test_status_counter_overhead(benchmark):
    """frem.status's call counter (one in-place add on a device scalar a training call): a training step of
    the attached model with the counter against the same model with it switched off, interleaved."""
    bare = default_model().train()
    counted, uncounted = copy.deepcopy(bare), copy.deepcopy(bare)
    frem.attach(counted, "bottleneck", B=162, X=632)
    frem.attach(uncounted, "bottleneck", B=162, X=632)
    frem.attached(uncounted)[0]._count_call = lambda: None  # the same FREM, without the count
    optimizers = {id(m): torch.optim.Adam(m.parameters(), lr=1e-4) for m in (counted, uncounted)}
    x = torch.randn(BATCH, 1, SIZE, SIZE, device=DEVICE)
    if ON_GPU:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 4, (BATCH, SIZE, SIZE), device=DEVICE)

    def step(model):
        return training_step(model, optimizers[id(model)], x, target)

    for model in (counted, uncounted):
        step(model)()
    ms = interleaved_ms({"uncounted": step(uncounted), "counted": step(counted),
                         "uncounted_again": step(uncounted)}, repeat=2 if SMALL else 20 if ON_GPU else 6, warmup=0)
    assert frem.status(counted)[0].calls > 0 and frem.status(uncounted)[0].calls == 0
    benchmark.extra_info.update(device=device_name(), batch=BATCH, size=SIZE, ms=ms,
                                ratio=ms["counted"] / ms["uncounted"],
                                noise_ratio=ms["uncounted_again"] / ms["uncounted"])
    benchmark.pedantic(step(counted), rounds=3, warmup_rounds=1)


def test_reach_check_cost(benchmark):
    """frem.reach's check that FREM's effect reaches the outputs: the first training step of a FREM attached
    without example_input (its output probed, the autograd graph walked once its forward returns) against a
    steady step of the same model, interleaved; and attach with example_input (one probed pass) against attach
    without. Every later step carries nothing: the check removed itself."""
    from frem.reach import FirstTrainingCall

    model = default_model().train()
    handle = frem.attach(model, "bottleneck", B=162, X=632)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(BATCH, 1, SIZE, SIZE, device=DEVICE)
    if ON_GPU:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 4, (BATCH, SIZE, SIZE), device=DEVICE)
    step = training_step(model, optimizer, x, target)

    def first_step():
        handle._reach.clear()
        handle._reach.update(state=None, detail="")  # as attach leaves it: unverified, its check registered
        model.register_forward_hook(FirstTrainingCall(handle))
        step()
        assert handle._reach["state"] == "yes" and not model._forward_hooks

    step()
    ms = interleaved_ms({"steady": step, "first": first_step, "steady_again": step},
                        repeat=2 if SMALL else 20 if ON_GPU else 6, warmup=0)
    benchmark.pedantic(first_step, rounds=3, warmup_rounds=1)

    example = x[:1]

    def attach_with(example_input):
        def run():
            frem.detach(model)
            frem.attach(model, "bottleneck", B=162, X=632, example_input=example_input)
        return run
    attach_ms = interleaved_ms({"without": attach_with(None), "with_example": attach_with(example)},
                               repeat=2 if SMALL else 5, warmup=1)
    benchmark.extra_info.update(device=device_name(), batch=BATCH, size=SIZE, ms=ms, attach_ms=attach_ms,
                                first_step_ratio=ms["first"] / ms["steady"],
                                noise_ratio=ms["steady_again"] / ms["steady"])
