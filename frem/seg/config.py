"""A training run's settings: the default protocol and the ``--quick`` one.

The default is the paper's protocol for the Drosophila data (2000 epochs,
softmax cross entropy, the best validation mIoU checkpoint evaluated on the
test split) with what the paper leaves unstated taken from the Hotta lab's
public code for this data set: 12/3/5 sections (192/48/80 tiles of 256),
batch 16, Adam at 1e-4.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from frem.seg.data import SegmentationData, detect_dataset, load_dataset
from frem.seg.data.drosophila import SPLIT
from frem.seg.data.images import NORMALIZATIONS
from frem.seg.variants import DEFAULT_ENCODER, VARIANT_DEFAULTS, variant_settings

# --quick: a whole run in about a minute on a 2-core CPU, on the Drosophila data or a folder of one's own.
# A subset of the real split (by section; by image for a folder: its first 3 training images, 1 validation,
# 1 test), small crops spread over each section or image, resnet18.
QUICK = {
    "encoder": "resnet18",
    "crop": 64,
    "tiles_per_section": 32,
    "sections": {"train": SPLIT["train"][:3], "val": SPLIT["val"][:1], "test": SPLIT["test"][:1]},
    "images": {"train": 3, "val": 1, "test": 1},
    "epochs": 8,
    "batch_size": 8,
    "lr": 1e-3,
}
# Settings that may change when a run is resumed; the rest must match. The data
# folder may move (its checksum, kept in the checkpoint, must not change).
RESUMABLE = ("epochs", "val_every", "device", "resume", "out", "progress", "data", "keep")
KEEP = ("all", "best")


@dataclass
class TrainConfig:
    variant: str = "frem"
    dataset: str = "drosophila"
    data: str | None = None
    out: str = "runs/frem"
    encoder: str = DEFAULT_ENCODER
    B: int | float | None = None
    X: float | None = None
    lambda_: float | None = None
    epochs: int = 2000
    batch_size: int = 16
    lr: float = 1e-4
    seed: int = 0
    crop: int | None = 256
    tiles_per_section: int | None = None
    sections: dict | None = None
    images: dict | None = None  # a folder data set: at most this many images (pages) of each split
    val_every: int = 1
    val_fraction: float | None = None  # a folder without val/: the share of training images held out
    split_seed: int = 0
    normalize: str = "image"
    keep: str = "all"
    device: str = "auto"
    resume: bool = False
    quick: bool = False
    progress: bool = True

    @classmethod
    def build(cls, quick: bool = False, **given) -> "TrainConfig":
        """Defaults, then the quick protocol if asked, then what was given explicitly."""
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        settings = {**(QUICK if quick else {}), **{k: v for k, v in given.items() if v is not None}}
        if "dataset" not in settings:  # --data at a folder of one's own needs no --dataset folder
            settings["dataset"] = detect_dataset(settings.get("data"))
        config = cls(quick=quick, **settings)
        config._resolve_variant()
        config.validate()
        return config

    def for_variant(self, variant: str, **changes) -> "TrainConfig":
        """The same protocol for another variant, with that variant's own B/X/lambda."""
        config = replace(self, variant=variant, B=None, X=None, lambda_=None, **changes)
        config._resolve_variant()
        return config

    def _resolve_variant(self) -> None:
        # The variant's defaults become explicit, so checkpoints say what ran.
        settings = variant_settings(self.variant, self.B, self.X, self.lambda_)
        for name, value in settings.items():
            setattr(self, name, value)
        # A value the variant has no use for would be recorded as if it had acted: refuse it.
        ignored = [name for name in ("B", "X", "lambda_") if name not in settings and getattr(self, name) is not None]
        if ignored:
            options = ", ".join("--" + name.rstrip("_") for name in ignored)
            uses = ", ".join(f"{variant} ({', '.join(n.rstrip('_') for n in taken)})"
                             for variant, taken in VARIANT_DEFAULTS.items() if taken)
            raise ValueError(f"{options} has no effect on --variant {self.variant}; only these variants take "
                             f"B, X or lambda: {uses}")

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.crop is not None and (self.crop < 32 or self.crop % 32):
            raise ValueError(f"--crop must be a multiple of 32 (the U-Net downsamples 5 times), got {self.crop}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.keep not in KEEP:
            raise ValueError(f"--keep must be one of {', '.join(KEEP)}, got {self.keep!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def differences(self, other: "TrainConfig") -> list[str]:
        """Settings (other than the resumable ones) in which two runs differ."""
        return [f"{f.name}={getattr(other, f.name)!r} (this run: {getattr(self, f.name)!r})"
                for f in fields(self) if f.name not in RESUMABLE
                and _normal(getattr(self, f.name)) != _normal(getattr(other, f.name))]

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    def load_data(self, root=None) -> SegmentationData:
        """The data this run trains on: its data set, tiled and split as the run says (``root``
        in place of ``data`` where the folder moved)."""
        return load_dataset(self.dataset, root or self.data, crop=self.crop,
                            tiles_per_section=self.tiles_per_section, sections=self.sections, images=self.images,
                            val_fraction=self.val_fraction, split_seed=self.split_seed)


def _normal(value):
    if isinstance(value, dict):
        return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in value.items()}
    return value
