"""Is FREM acting? What each FREM of a model did since its last re-draw, and a warning when it did nothing.

``frem.status(model)`` reads every FREM's counters (kept on the device, so
reading them is the only sync): where it sits (its path in ``model``, so a
model and its EMA copy read apart), B, X, channels, training calls,
train-mode passes without gradients, float16-capped values since the last
``resample``, and whether its effect was seen to reach the model's outputs
(``frem.reach``). ``print`` it for a table.

At each re-draw, a FREM that was not called once while its network trained
since the previous re-draw warns, once, naming its path. "Its network
trained" is read from gradients: a hook on the first and the last trainable
parameter of the model FREM was attached to counts the backward passes that
reach them, however the update is then made (``optimizer.step()``,
``p.data.add_()``). So a wrapper or a forward that goes around the hooked
layer is caught even when no FREM code ran at all, and a copy that is only
averaged (EMA, ``AveragedModel``), evaluated or loaded never warns. An
epoch spent inside ``frem.disabled`` is the user's choice and does not warn.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from frem.module import FREM
from frem.wrappers import unwrap


@dataclass(frozen=True)
class FREMStatus:
    """One FREM: where it is, its setting, and what it did since its last re-draw."""
    layer: str          # the hooked layer's path in the model status was given (a FREM module's own path)
    at: str             # "output" or "input" of the layer ("module": a FREM called by the model's forward)
    B: int | float      # channels enhanced (B as given until the width is known)
    X: float
    channels: int | None  # the layer's width; None until the first training call
    dim: int
    mode: str
    seed: int
    epoch: int          # the epoch of the current draw
    calls: int          # training calls that enhanced, since the last re-draw (torch.func transforms included)
    capped: int         # float16 values capped at its maximum, since the last re-draw
    nograd: int = 0     # passes in train mode with gradients off (validation without eval(), update_bn), in all
    reaches: str = "?"  # "yes": seen reaching the model's outputs; "output": it is the model's own output; "?"


class StatusTable(list):
    """A list of ``FREMStatus``; ``str()`` is a table."""

    COLUMNS = ("layer", "at", "B", "X", "channels", "dim", "mode", "seed", "epoch", "calls", "nograd", "capped",
               "reaches")

    def __str__(self) -> str:
        if not self:
            return "no FREM in this model (frem.attach(model, ...) adds one)"
        rows = [self.COLUMNS] + [tuple("?" if getattr(s, c) is None else f"{getattr(s, c):g}" if c == "X"
                                       else str(getattr(s, c)) for c in self.COLUMNS) for s in self]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.COLUMNS))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def every_frem(model: nn.Module) -> list[FREM]:
    """Every FREM acting in ``model`` (wrappers seen through): the FREM modules inside it, and the FREMs
    attached to layers inside it wherever they are held (``frem.attach`` puts a FREM on the outermost
    module on the way to its layer, so a submodule holds the hook but not the FREM)."""
    model = unwrap(model)
    found = {id(m): m for m in model.modules() if isinstance(m, FREM)}
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hook in hooks.values():
                held = getattr(hook, "frem", None)
                if isinstance(held, FREM) and held._target_ref is not None and held._target_ref() is module:
                    found.setdefault(id(held), held)
    return list(found.values())


def path_of(model: nn.Module, frem: FREM, names: dict | None = None) -> str:
    """Where ``frem`` acts, as a path in ``model``: its layer's path (an attached FREM), else its own."""
    names = names if names is not None else {id(m): name for name, m in unwrap(model).named_modules()}
    target = frem._target_ref() if frem._target_ref is not None else None
    if frem.applied_by_hook and target is not None and id(target) in names:
        return names[id(target)]
    if id(frem) in names:
        return names[id(frem)]
    return frem.layer or type(frem).__name__


def status(model: nn.Module) -> StatusTable:
    """Every FREM of ``model`` (wrappers seen through): its site, setting and counters."""
    table = StatusTable()
    names = {id(m): name for name, m in unwrap(model).named_modules()}
    for m in every_frem(model):
        attached = m.applied_by_hook
        table.append(FREMStatus(
            layer=path_of(model, m, names), at=m._at if attached else "module", B=m.B, X=m.X,
            channels=m.num_channels, dim=m.dim, mode=m.mode, seed=m.seed, epoch=m.epoch,
            calls=int(m.calls) + m._counts["transformed"], capped=int(m.capped) if m.capped.numel() else 0,
            nograd=m._counts["nograd"], reaches=m._reach["state"] or "?"))
    return table


class _Trained:
    """A post-accumulate-grad hook: counts the backward passes that reached a parameter of FREM's network."""

    def __init__(self, idle: dict):
        self.idle = idle

    def __call__(self, _param) -> None:
        self.idle["grads"] += 1


class _Watch:
    """The gradient hooks of one FREM: on the first and the last trainable parameter of its network (a
    training step's gradient reaches the head, and the stem unless it is frozen); two Python calls a step."""

    def __init__(self, frem: FREM, network: nn.Module):
        trainable = [p for p in network.parameters() if p.requires_grad]
        self.params = [weakref.ref(p) for p in dict.fromkeys((trainable[0], trainable[-1]))] if trainable else []
        self.handles = [p().register_post_accumulate_grad_hook(_Trained(frem._idle)) for p in self.params]

    def watches(self, network: nn.Module) -> bool:
        trainable = [p for p in network.parameters() if p.requires_grad]
        wanted = dict.fromkeys((id(trainable[0]), id(trainable[-1]))) if trainable else {}
        return [id(ref()) for ref in self.params] == list(wanted)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def network_of(frem: FREM, fallback: nn.Module) -> nn.Module:
    """The network a FREM belongs to: the model ``frem.attach`` was given, else ``fallback``."""
    root = frem._root()
    return root if root is not None else fallback


def watch(frem: FREM, network: nn.Module) -> None:
    """Count the backward passes through ``network``'s parameters for ``frem`` (again if they changed: a
    deep copy of the model has parameters of its own; requires_grad changed)."""
    if frem._watch is not None and frem._watch.watches(network):
        return
    if frem._watch is not None:
        frem._watch.remove()
    frem._watch = _Watch(frem, network)


def check_fired(model: nn.Module, modules: list[FREM]) -> None:
    """Before a re-draw: warn (once a FREM) when its network trained since the last re-draw and it never ran."""
    model = unwrap(model)
    names = None
    for m in modules:
        idle = m._idle
        ran = (int(m.calls) if not m.calls.is_meta else 1) + m._counts["transformed"]
        if idle["grads"] and not idle["paused"] and not idle["warned"] and not ran:
            idle["warned"] = True
            names = names if names is not None else {id(x): name for name, x in model.named_modules()}
            path = path_of(model, m, names)
            warnings.warn(
                f"FREM at {path or '<model>'!r} never ran since its last re-draw, while its network trained "
                f"({idle['grads']} gradients reached its parameters): FREM did nothing this epoch. Likely causes: "
                "the model's forward does not call that layer (or calls its .forward() directly, which skips "
                "hooks); a wrapper runs another copy of the model; the model trained in eval mode (FREM acts "
                "only in train()). frem.status(model) shows every FREM's calls; frem.candidates(model, "
                "example_input) shows the layers the forward runs.", RuntimeWarning, stacklevel=3)
        idle["grads"], idle["paused"] = 0, False
        watch(m, network_of(m, model))


__all__ = ["FREMStatus", "StatusTable", "check_fired", "every_frem", "path_of", "status", "watch"]
