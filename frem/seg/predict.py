"""Segmenting new images with a trained run: label images and colour overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from frem.seg import checkpoint
from frem.seg.data.base import DataError
from frem.seg.evaluate import autocast, model_from_checkpoint, normalize

# One colour a class, in class order; background-like classes stay uncoloured
# in overlays when named "background".
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
MULTIPLE = 32  # the U-Net halves the resolution five times


def read_image(path: Path, channels: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"no image at {path}")
    image = Image.open(path).convert("L" if channels == 1 else "RGB")
    array = np.array(image)
    return array[..., None] if array.ndim == 2 else array


@torch.no_grad()
def predict_image(model, image: np.ndarray, normalization: dict, device) -> np.ndarray:
    """Class index per pixel for a whole image, padded (reflect) to a multiple of 32."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % MULTIPLE, -w % MULTIPLE
    x = normalize(x, normalization)
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    with autocast(torch.device(device)):
        logits = model(x)
    return logits[0, :, :h, :w].argmax(0).byte().cpu().numpy()


def overlay(image: np.ndarray, labels: np.ndarray, classes, alpha: float = 0.45) -> np.ndarray:
    base = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    out = base.astype(np.float32)
    for index, name in enumerate(classes):
        if name == "background":
            continue
        where = labels == index
        out[where] = (1 - alpha) * out[where] + alpha * np.array(PALETTE[index % len(PALETTE)])
    return out.round().clip(0, 255).astype(np.uint8)


def predict(checkpoint_path, images, out_dir, device="cpu") -> list[Path]:
    """Write ``<name>_labels.png`` (class indices) and ``<name>_overlay.png`` per image."""
    state = checkpoint.load(checkpoint_path)
    model = model_from_checkpoint(state, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in map(Path, images):
        image = read_image(path, state["in_channels"])
        labels = predict_image(model, image, state["normalization"], device)
        Image.fromarray(labels).save(out_dir / f"{path.stem}_labels.png")
        Image.fromarray(overlay(image, labels, state["classes"])).save(out_dir / f"{path.stem}_overlay.png")
        written += [out_dir / f"{path.stem}_labels.png", out_dir / f"{path.stem}_overlay.png"]
    return written
