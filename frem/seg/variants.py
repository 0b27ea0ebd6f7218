"""The paper's six variants by name, and each one's default B / X / lambda.

Facts only (no smp, no torch), so the command line can list the variants and
validate them before anything heavy is imported. ``models.py`` builds them.
"""

from __future__ import annotations

DEFAULT_ENCODER = "tu-seresnet34"  # SE-ResNet: 512 bottleneck channels, like the paper's U-Net
DECODER_CHANNELS = (256, 128, 64, 32, 16)
# Per-variant defaults: the paper's Drosophila FREM setting, Table 3's fixed
# channels, dropout at FREM's share of channels, an even loss mix.
VARIANT_DEFAULTS = {
    "baseline": {},
    "shallow": {},
    "supervision": {"lambda_": 0.5},
    "dropout": {"B": 8},
    "frem": {"B": 8, "X": 250.0},
    "frem-fixed": {"B": 10, "X": 10000.0},
}
VARIANTS = tuple(VARIANT_DEFAULTS)


def variant_settings(variant: str, B=None, X=None, lambda_=None) -> dict:
    """The variant's B / X / lambda: given values win over the variant's defaults."""
    if variant not in VARIANT_DEFAULTS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    settings = dict(VARIANT_DEFAULTS[variant])
    given = {"B": B, "X": X, "lambda_": lambda_}
    settings.update({k: v for k, v in given.items() if v is not None and k in settings})
    if "lambda_" in settings and not 0.0 <= settings["lambda_"] <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {settings['lambda_']}")
    return settings
