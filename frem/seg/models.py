"""The paper's comparison: one U-Net (smp, SE encoder) in six named variants.

| variant      | what changes                                                        |
|--------------|---------------------------------------------------------------------|
| baseline     | nothing: U-Net + SE encoder                                         |
| shallow      | without its deepest encoder stage and the matching decoder stage    |
| supervision  | 1x1 conv on the bottleneck -> class logits, upsampled; loss eq. 1   |
| dropout      | channel dropout at the bottleneck with rate B / C                   |
| frem         | FREM at the bottleneck (frem.attach), re-drawn every epoch          |
| frem-fixed   | FREM on channels drawn once (paper Table 3: 10 channels, X=10000)   |
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
from torch import nn
from torch.nn import functional as F

import frem
from frem.seg.variants import DECODER_CHANNELS, DEFAULT_ENCODER, variant_settings


class PaperUnet(smp.Unet):
    """smp.Unet with the comparison's two bottleneck options.

    ``bottleneck_dropout``: Dropout2d on the deepest feature map (whole channels,
    as FREM works on whole channels), set by ``build_model`` once the width is
    known. ``deep_supervision``: an auxiliary head; in training ``forward`` then
    returns ``(logits, aux_logits)``.
    """

    def __init__(self, *, deep_supervision: bool = False, **kwargs):
        super().__init__(**kwargs)
        bottleneck = self.encoder.out_channels[-1]
        self.bottleneck_dropout: nn.Module | None = None
        self.aux_head = nn.Conv2d(bottleneck, kwargs["classes"], 1) if deep_supervision else None

    def forward(self, x):
        features = self.encoder(x)
        if self.bottleneck_dropout is not None:
            features = [*features[:-1], self.bottleneck_dropout(features[-1])]
        logits = self.segmentation_head(self.decoder(features))
        if self.aux_head is not None and self.training:
            aux = F.interpolate(self.aux_head(features[-1]), size=x.shape[-2:], mode="bilinear",
                                align_corners=False)
            return logits, aux
        return logits


def build_model(variant: str, *, encoder: str = DEFAULT_ENCODER, in_channels: int = 1,
                classes: int = 4, B=None, X=None, lambda_=None, seed: int = 0) -> nn.Module:
    """A freshly initialised model for ``variant`` (no pretrained weights)."""
    settings = variant_settings(variant, B, X, lambda_)
    depth = 4 if variant == "shallow" else 5
    kwargs = {"encoder_name": encoder, "encoder_weights": None, "in_channels": in_channels,
              "classes": classes, "encoder_depth": depth, "decoder_channels": DECODER_CHANNELS[:depth]}
    if variant == "dropout":
        model = PaperUnet(**kwargs)
        channels = bottleneck_channels(model)
        B = settings["B"]
        count = B if isinstance(B, int) else round(B * channels)
        if not 1 <= count <= channels:
            raise ValueError(f"B={B} must lie in [1, {channels}] for the dropout variant "
                             f"({channels} bottleneck channels)")
        model.bottleneck_dropout = nn.Dropout2d(count / channels)
        return model
    model = PaperUnet(deep_supervision=variant == "supervision", **kwargs)
    if variant in ("frem", "frem-fixed"):
        frem.attach(model, "bottleneck", B=settings["B"], X=settings["X"],
                    mode="fixed" if variant == "frem-fixed" else "random", seed=seed)
    return model


def bottleneck_channels(model: nn.Module) -> int:
    return model.encoder.out_channels[-1]
