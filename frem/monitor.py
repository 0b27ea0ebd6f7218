"""Is FREM acting? What each FREM of a model did since its last re-draw, and a warning when it did nothing.

``frem.status(model)`` reads every FREM's counters (kept on the device, so
reading them is the only sync): site, B, X, channels, training calls and
float16-capped values since the last ``resample``. ``print`` it for a table.

At each ``frem.resample(model, epoch)``, a FREM that was not called once
while the model trained since the previous re-draw warns, once, naming its
layer. "The model trained" is read from its parameters' version counters,
which every in-place update advances (``optimizer.step()``, also a
``load_state_dict``), so a wrapper or a forward that goes around the hooked
layer is caught even when no FREM code ran at all; an epoch spent inside
``frem.disabled`` is the user's choice and does not warn.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from frem.module import FREM
from frem.wrappers import unwrap


@dataclass(frozen=True)
class FREMStatus:
    """One FREM: where it is, its setting, and what it did since its last re-draw."""
    layer: str          # the hooked layer (or the FREM's own name in the model, when used as a module)
    at: str             # "output" or "input" of the layer ("module": a FREM called by the model's forward)
    B: int | float      # channels enhanced (B as given until the width is known)
    X: float
    channels: int | None  # the layer's width; None until the first training call
    dim: int
    mode: str
    seed: int
    epoch: int          # the epoch of the current draw
    calls: int          # training calls that enhanced, since the last re-draw
    capped: int         # float16 values capped at its maximum, since the last re-draw


class StatusTable(list):
    """A list of ``FREMStatus``; ``str()`` is a table."""

    COLUMNS = ("layer", "at", "B", "X", "channels", "dim", "mode", "seed", "epoch", "calls", "capped")

    def __str__(self) -> str:
        if not self:
            return "no FREM in this model (frem.attach(model, ...) adds one)"
        rows = [self.COLUMNS] + [tuple("?" if getattr(s, c) is None else f"{getattr(s, c):g}" if c == "X"
                                       else str(getattr(s, c)) for c in self.COLUMNS) for s in self]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.COLUMNS))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def _frems(model: nn.Module) -> list[tuple[str, FREM]]:
    return [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, FREM)]


def status(model: nn.Module) -> StatusTable:
    """Every FREM of ``model`` (wrappers seen through): its site, setting and counters."""
    table = StatusTable()
    for name, m in _frems(model):
        attached = m.applied_by_hook
        table.append(FREMStatus(
            layer=m.layer if attached else name, at=m._at if attached else "module", B=m.B, X=m.X,
            channels=m.num_channels, dim=m.dim, mode=m.mode, seed=m.seed, epoch=m.epoch,
            calls=int(m.calls), capped=int(m.capped) if m.capped.numel() else 0))
    return table


def parameter_updates(model: nn.Module) -> int:
    """How many in-place updates the trainable parameters have had (the sum of their version counters):
    a Python read of each tensor's counter, no device work."""
    return sum(p._version for p in unwrap(model).parameters() if p.requires_grad)


def check_fired(model: nn.Module, modules: list[FREM]) -> None:
    """Before a re-draw: warn (once a FREM) when the model trained since the last re-draw and a FREM never ran."""
    updates = parameter_updates(model)
    for m in modules:
        seen, idle = m._idle["versions"], m._idle
        if (seen is not None and updates > seen and not idle["paused"] and not idle["warned"] and not m.calls.is_meta
                and not int(m.calls)):
            idle["warned"] = True
            where = f"layer {m.layer!r}" if m.layer is not None else "its module"
            warnings.warn(
                f"FREM at {where} never ran since its last re-draw, while the model's parameters were updated "
                f"{updates - seen} times (their version counters moved, as optimizer.step() moves them): FREM did "
                "nothing this epoch. Likely causes: the model's forward does not call that layer (or calls its "
                ".forward() directly, which skips hooks); a wrapper runs another copy of the model; the model "
                "trained in eval mode (FREM acts only in train()). frem.status(model) shows every FREM's calls; "
                "frem.candidates(model, example_input) shows the layers the forward runs.",
                RuntimeWarning, stacklevel=3)
        idle["versions"], idle["paused"] = updates, False


__all__ = ["FREMStatus", "StatusTable", "check_fired", "parameter_updates", "status"]
