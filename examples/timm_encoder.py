"""FREM on a hand-assembled segmenter around a timm ``features_only`` encoder.

The model's ``encoder`` is a timm feature net, so ``layer="bottleneck"`` finds its
deepest feature map by name, without running the model.

    python examples/timm_encoder.py
"""

import timm
import torch
from torch import nn

import frem


class FeaturePyramidSegmenter(nn.Module):
    def __init__(self, encoder_name="resnet18", classes=4):
        super().__init__()
        self.encoder = timm.create_model(encoder_name, features_only=True, pretrained=False, in_chans=1)
        channels = self.encoder.feature_info.channels()
        self.lateral = nn.ModuleList(nn.Conv2d(c, 64, 1) for c in channels)
        self.head = nn.Conv2d(64, classes, 3, padding=1)

    def forward(self, x):
        features = self.encoder(x)
        merged = self.lateral[-1](features[-1])
        for feature, lateral in zip(reversed(features[:-1]), reversed(self.lateral[:-1])):
            merged = nn.functional.interpolate(merged, size=feature.shape[-2:]) + lateral(feature)
        return nn.functional.interpolate(self.head(merged), size=x.shape[-2:], mode="bilinear")


torch.manual_seed(0)
model = FeaturePyramidSegmenter()
handle = frem.attach(model, "bottleneck", B=0.25, X=100)  # a quarter of the 512 channels
print(handle)
model.train()
out = model(torch.randn(2, 1, 96, 96))
out.mean().backward()
print("train output", tuple(out.shape))
