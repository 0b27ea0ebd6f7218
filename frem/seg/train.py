"""The trainer: the whole data set on the device, augmented there, one Adam loop.

Per epoch: re-draw FREM's channels, shuffle (a pure function of seed and
epoch), train, validate every ``val_every`` epochs, keep the best validation
mIoU model, write a resumable checkpoint. At the end the best model is scored
on the test split and everything goes to ``RUN_DIR/metrics.json``.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

import frem
from frem.seg import checkpoint, distributed
from frem.seg.config import TrainConfig
from frem.seg.data import SegmentationData
from frem.seg.data.images import fit_normalization, normalize
from frem.seg.evaluate import autocast, evaluate, evaluate_run
from frem.seg.models import build_model
from frem.seg.variants import variant_settings


class TrainingDiverged(ValueError):
    """The loss stopped being finite; the last finite checkpoint is kept."""


def diverged_message(config, settings, epoch: int, loss: float, out: Path) -> str:
    causes = [f"the learning rate (--lr {config.lr:g}) is too high"]
    if "X" in settings:
        causes.insert(0, f"X={settings['X']:g} overflows the features (try a smaller --X)")
    kept = (f"{out / checkpoint.LAST} still holds epoch {epoch - 1}, the last finite one"
            if epoch > 0 else "no epoch finished with a finite loss, so nothing was kept")
    return (f"training diverged in epoch {epoch}: the training loss is {loss}. Likely cause: "
            f"{' or '.join(causes)}. {kept}")


def epoch_generator(seed: int, epoch: int, purpose: str) -> torch.Generator:
    """A CPU generator that depends on (seed, epoch, purpose) alone, so a
    resumed run and every DDP rank see the same shuffles and augmentations."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def augment(images: torch.Tensor, masks: torch.Tensor, flips: torch.Tensor):
    """Per-tile flips and transposes (the 8 symmetries of a square), on device.

    ``flips`` is (3, N) booleans: horizontal flip, vertical flip, transpose.
    """
    for flag, op in zip(flips, (lambda t: t.flip(-1), lambda t: t.flip(-2),
                                lambda t: t.transpose(-1, -2))):
        if op(masks).shape != masks.shape:
            break  # a non-square tile cannot be transposed in place
        images = torch.where(flag.view(-1, 1, 1, 1), op(images), images)
        masks = torch.where(flag.view(-1, 1, 1), op(masks), masks)
    return images, masks


def loss_fn(output, target: torch.Tensor, lambda_: float | None) -> torch.Tensor:
    """Softmax cross entropy; with deep supervision (1-lambda)*main + lambda*aux (eq. 1)."""
    if isinstance(output, tuple):
        main, aux = output
        return (1 - lambda_) * F.cross_entropy(main, target) + lambda_ * F.cross_entropy(aux, target)
    return F.cross_entropy(output, target)


def frem_settings(model) -> list[dict]:
    return [{"layer": m.layer, "B": m.B, "X": m.X, "mode": m.mode, "seed": m.seed, "epoch": m.epoch,
             "channels": m.channels.tolist()} for m in frem.attached(model)]


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(config: TrainConfig, data: SegmentationData | None = None, on_validation=None, on_epoch=None) -> dict:
    """Run (or resume) training as configured; return the metrics written to metrics.json.

    ``on_validation(epoch, val_miou)`` is called after each validation (the
    tuner reports to Optuna there and may raise ``optuna.TrialPruned``);
    ``on_epoch(epoch)`` after each epoch's checkpoint (progress of a reproduction).
    """
    return run_training(config, data, on_validation, on_epoch)[0]


def check_run_folder(config: TrainConfig) -> None:
    """A run folder holds one run: refuse to overwrite it, or to resume what is not there."""
    out = Path(config.out)
    last, finished = out / checkpoint.LAST, out / checkpoint.METRICS
    if config.resume and not last.exists():
        if finished.exists():
            raise ValueError(f"--resume: {out} holds a finished run that kept only {checkpoint.BEST} (--keep best), "
                             "so it cannot be continued; start a new run with another --out")
        raise ValueError(f"--resume: {out} holds no run to resume (no {checkpoint.LAST}); "
                         "leave out --resume to start one there")
    if not config.resume and (last.exists() or finished.exists()):
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")


def run_training(config: TrainConfig, data: SegmentationData | None = None, on_validation=None, on_epoch=None):
    """``train``, also returning the trained model (this process's replica under DDP).

    Everything a user can get wrong (options, the data, B and X against the
    network) is checked before the run folder is created.
    """
    config.validate()
    settings = variant_settings(config.variant, config.B, config.X, config.lambda_)
    check_run_folder(config)
    if data is None:
        data = config.load_data()
    data.announce()
    # The run remembers where its data was: evaluate and predict need the run folder alone; and the share of
    # training images it held out for validation where the folder has no val/ (the default, said explicitly).
    config = config.with_(data=data.root or config.data)
    if (data.split or {}).get("fraction") is not None and config.val_fraction is None:
        config = config.with_(val_fraction=data.split["fraction"])
    normalization = fit_normalization(data.train, config.normalize)
    torch.manual_seed(config.seed)
    model = build_model(config.variant, encoder=config.encoder, in_channels=data.in_channels,
                        classes=len(data.classes), B=config.B, X=config.X,
                        lambda_=config.lambda_, seed=config.seed)
    context, device = distributed.setup(config.device)
    try:
        # One process a run folder: rank 0 holds the lock for all ranks.
        with checkpoint.run_lock(config.out) if context.is_main else nullcontext():
            return _train(config, settings, data, normalization, model, context, device, on_validation, on_epoch)
    finally:
        distributed.teardown(context)


def _train(config, settings, data, normalization, model, context, device, on_validation, on_epoch):
    out = Path(config.out)
    last_path = out / checkpoint.LAST
    if context.is_main:
        checkpoint.clean_stale_temporaries(out)  # a write killed mid-way left its temporary file
    started = time.perf_counter()
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    state = {"epoch": -1, "best_val_miou": -math.inf, "best_epoch": None, "history": []}

    if config.resume:  # check_run_folder made sure last.pt is there
        # On the CPU: set_rng_state takes CPU ByteTensors; load_state_dict moves the rest.
        saved = checkpoint.load(last_path, required=("config", "model", "optimizer", "rng", "state"),
                                hint=f"{out / checkpoint.BEST} may still be intact (frem evaluate {out}); "
                                     "otherwise start afresh with another --out")
        differences = config.differences(TrainConfig.from_dict(saved["config"]))
        if data.differs_from(saved.get("data")):
            differences.append(f"data {saved['data'].get('source')} (now: {data.source})")
        if differences:
            raise ValueError(f"cannot resume {out}: it was trained with " + ", ".join(differences))
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        _set_rng_state(saved["rng"], device)

    net = model
    if context.active:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.batch_size % context.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must divide evenly over "
                         f"{context.world_size} processes")
    rank_batch = config.batch_size // context.world_size

    train_split = data.train.to(device)
    classes = data.classes
    lambda_ = settings.get("lambda_")
    epochs = range(state["epoch"] + 1, config.epochs)
    talk = config.progress and context.is_main
    steps_per_epoch = -(-(len(train_split) // context.world_size) // rank_batch)
    if talk:  # what this run will train on, before the first step: a run sized wrongly is stopped at once
        print(f"frem train: {size_line(data)}; {steps_per_epoch} steps of {config.batch_size} an epoch, "
              f"{len(epochs)} epoch{'s' if len(epochs) != 1 else ''} to go", file=sys.stderr)
    estimate_after = min(ESTIMATE_STEPS, steps_per_epoch)
    bar = tqdm(epochs, desc=f"{config.variant}", disable=not talk,
               initial=state["epoch"] + 1, total=config.epochs, unit="epoch")
    for epoch in bar:
        epoch_start = time.perf_counter()
        if frem.attached(model):
            frem.resample(model, epoch)
        net.train()
        order = torch.randperm(len(train_split), generator=epoch_generator(config.seed, epoch, "order"))
        order = order[: len(order) // context.world_size * context.world_size][context.rank::context.world_size]
        # The epoch's order and flips cross to the device once, not once a step.
        flips = torch.rand(3, len(order), generator=epoch_generator(config.seed, epoch, f"augment:{context.rank}"))
        order, flips = order.to(device), flips.lt(0.5).to(device)
        loss_sum = torch.zeros((), device=device)
        steps = 0
        for start in range(0, len(order), rank_batch):
            index = order[start:start + rank_batch]
            images, masks = augment(train_split.images[index], train_split.masks[index],
                                    flips[:, start:start + rank_batch])
            x = normalize(images, normalization, train_split.stats[index])
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                loss = loss_fn(net(x), masks.long(), lambda_)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
            if talk and epoch == epochs.start and steps == estimate_after:
                seconds = (time.perf_counter() - epoch_start) / steps * steps_per_epoch
                tqdm.write(f"frem train: an epoch takes about {_duration(seconds)} here (from its first {steps} "
                           f"steps, which include warming up), so about {_duration(seconds * len(epochs))} for "
                           f"the {len(epochs)} to go, validation not counted", file=sys.stderr)
        record = {"epoch": epoch, "train_loss": float(loss_sum) / max(steps, 1),  # one sync per epoch
                  "train_time_s": time.perf_counter() - epoch_start, "train_images": len(order)}
        if not math.isfinite(record["train_loss"]):
            raise TrainingDiverged(diverged_message(config, settings, epoch, record["train_loss"], out))
        if frem.attached(model):
            record["frem_channels"] = frem.attached(model)[0].channels.tolist()
        if (epoch + 1) % config.val_every == 0 or epoch == config.epochs - 1:
            val = evaluate(model, data.val, classes, normalization, batch_size=2 * config.batch_size,
                           probe=True)
            record.update(val_miou=val["miou"], val_iou=val["iou"], **val["features"])
            if val["miou"] > state["best_val_miou"]:
                state["best_val_miou"], state["best_epoch"] = val["miou"], epoch
                if context.is_main:
                    checkpoint.save(_model_state(config, model, data, normalization, epoch), out / checkpoint.BEST)
            bar.set_postfix(loss=f"{record['train_loss']:.4f}", val_miou=f"{val['miou']:.4f}")
        else:
            bar.set_postfix(loss=f"{record['train_loss']:.4f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record["epoch_time_s"] = time.perf_counter() - epoch_start
        state["history"].append(record)
        state["epoch"] = epoch
        if context.is_main:
            checkpoint.save({**_model_state(config, model, data, normalization, epoch),
                             "optimizer": optimizer.state_dict(), "rng": _rng_state(device),
                             "state": state}, last_path)
        if on_epoch is not None:
            on_epoch(epoch)
        if on_validation is not None and "val_miou" in record:
            on_validation(epoch, record["val_miou"])  # after the checkpoint: a prune loses nothing
    bar.close()
    distributed.barrier(context)

    test = evaluate_run(out, data=data, device=device)
    epoch_times = [h["epoch_time_s"] for h in state["history"]]
    metrics = {
        "variant": config.variant,
        "settings": settings,
        "classes": list(classes),
        "test": test,
        "best_epoch": state["best_epoch"],
        "best_val_miou": state["best_val_miou"],
        "device": _device_name(device),
        "world_size": context.world_size,
        "wall_time_s": time.perf_counter() - started,
        "median_epoch_time_s": sorted(epoch_times)[len(epoch_times) // 2] if epoch_times else None,
        "data": {**data.identity(), **{k: len(v) for k, v in data.splits().items()}},
        "frem": frem_settings(model),
        "config": config.to_dict(),
        "history": state["history"],
    }
    if context.is_main:
        checkpoint.save_json(metrics, out / checkpoint.METRICS, checkpoint.RESUME)
        if config.keep == "best":  # last.pt (with the optimiser state) only serves to continue the run
            last_path.unlink(missing_ok=True)
    return metrics, model


ESTIMATE_STEPS = 5  # training steps timed for the first estimate of an epoch


def size_line(data: SegmentationData) -> str:
    """How many images and tiles each split has: "3 training images (96 tiles of 64x64 px), 1 validation ..."."""
    parts = []
    for name, label in (("train", "training"), ("val", "validation"), ("test", "test")):
        split = data.splits()[name]
        images = len({tile.split("@")[0] for tile in split.names})
        height, width = split.images.shape[-2:]
        parts.append(f"{images} {label} image{'s' if images != 1 else ''} ({len(split)} tiles of {height}x{width} px)")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _model_state(config, model, data, normalization, epoch) -> dict:
    return {"config": config.to_dict(), "model": model.state_dict(), "epoch": epoch,
            "classes": list(data.classes), "in_channels": data.in_channels,
            "normalization": normalization, "frem": frem_settings(model), "data": data.identity()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
