"""Should FREM help here? The paper's premise measured over a plain training loop, as a figure.

``frem.diagnostics.Premise`` finds the bottleneck, the skip feature it meets
in the decoder and the deepest and shallowest encoder stages from one
recorded pass, then records, over each epoch's training steps, their mean
absolute activations (FREM's enhanced and other channels apart) and the
mean absolute gradient of the two stages' weights. The paper's premise: the
bottleneck is smaller than the skip, and the deep stage gets less gradient.

Here: an smp U-Net (resnet18 encoder) with FREM (B=8, X=250, the paper's
Drosophila setting) on Drosophila ssTEM tiles: the data set where
``FREM_DATA`` points, else the excerpt in tests/data (with --data, any
folder of the same layout).

    python examples/premise_plain_loop.py --epochs 15 --out premise.png
"""

import argparse
import json
import os
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

import frem
from frem.diagnostics import Premise, plot
from frem.seg.data import load_dataset
from frem.seg.data.images import normalize

EXCERPT = Path(__file__).resolve().parents[1] / "tests" / "data" / "drosophila-excerpt"
EXCERPT_SECTIONS = {"train": (0, 1, 2, 12, 13), "val": (16,), "test": (15,)}  # the sections the excerpt holds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("FREM_DATA") or str(EXCERPT))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--tiles-per-section", type=int, default=8)
    parser.add_argument("--out", default="premise.png")
    args = parser.parse_args()

    torch.manual_seed(0)
    sections = EXCERPT_SECTIONS if Path(args.data).resolve() == EXCERPT else None  # None: the paper's split
    data = load_dataset("drosophila", args.data, crop=args.crop, tiles_per_section=args.tiles_per_section,
                        sections=sections)
    images = normalize(data.train.images, {"mode": "image"}, data.train.stats)
    masks = data.train.masks.long()
    model = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=len(data.classes))
    print(frem.attach(model, "bottleneck", B=8, X=250.0))
    premise = Premise(model, images[:1])
    print(premise)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        frem.resample(model, epoch)
        model.train()
        order = torch.randperm(len(images))
        with premise.recording():  # on for the epoch's training steps
            for start in range(0, len(order), 8):
                batch = order[start:start + 8]
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(images[batch]), masks[batch])
                loss.backward()
                optimizer.step()
        row = premise.epoch_end(epoch)
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}))
    print(frem.status(model))
    plot(premise.history, args.out, title=f"smp U-Net (resnet18) + FREM (B=8, X=250), {data.source.split(' ')[0]}")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
