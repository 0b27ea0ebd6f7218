"""Small models shared by the tests."""

import segmentation_models_pytorch as smp
import torch
from torch import nn


def tiny_unet(**kwargs) -> nn.Module:
    """An smp U-Net small enough for CPU tests (resnet18, depth 3: 128 channels)."""
    kwargs = {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": (32, 16, 8),
              "in_channels": 1, "classes": 4, **kwargs}
    return smp.Unet(encoder_weights=None, **kwargs)


class HandUNet(nn.Module):
    """A hand-written two-level U-Net with no smp or timm inside."""

    def __init__(self, width=8):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.middle = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(2 * width, 4 * width, 3, padding=1),
                                    nn.ReLU(), nn.Conv2d(4 * width, 4 * width, 3, padding=1), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = nn.Sequential(nn.Conv2d(4 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.middle(e2)
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        return self.head(self.dec1(torch.cat([self.up1(d2), e1], 1)))
