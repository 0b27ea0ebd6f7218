"""Injecting FREM into a model: attach, resample, detach.

``attach`` adds the FREM as a submodule of the model itself, so
``model.train()``, ``.eval()`` and ``.to()`` reach it (inside an smp encoder,
``freeze_encoder()`` would stop ``train()`` from getting there), and applies it
with a forward hook on the target layer. Its buffers are non-persistent: the
state_dict keys never change. ``detach`` leaves the model as it was.
"""

from __future__ import annotations

import difflib
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from frem.bottleneck import known_bottleneck, locate_bottleneck
from frem.module import FREM

BOTTLENECK = "bottleneck"


@dataclass(eq=False)
class _Attachment:
    owner: weakref.ref  # weak: a strong reference would make a module cycle
    child_name: str
    handle: RemovableHandle

    def undo(self, module: FREM) -> None:
        self.handle.remove()
        owner = self.owner()
        if owner is not None and getattr(owner, self.child_name, None) is module:
            delattr(owner, self.child_name)
        module.applied_by_hook = False
        module._attachment = None


def _layer_name(model: nn.Module, layer, example_input) -> tuple[str, int | None]:
    """Resolve ``layer`` to (dotted name, channel count if known)."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, _known_channels(module)
        raise ValueError(f"the module {type(layer).__name__} passed as layer is not part of the model")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name, a module or {BOTTLENECK!r}, got {layer!r}")
    if layer == BOTTLENECK:
        known = known_bottleneck(model)
        if known is not None:
            return known
        if example_input is None:
            raise ValueError(
                f"cannot tell where the bottleneck of {type(model).__name__} is without running it: "
                "pass example_input=<a batch> so frem.find_bottleneck can measure it, "
                "or name the layer (layer='encoder.layer4')")
        return locate_bottleneck(model, example_input)
    names = [name for name, _ in model.named_modules() if name]
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else f"; top-level layers: {', '.join(n for n, _ in model.named_children())}"
        raise ValueError(f"{type(model).__name__} has no layer {layer!r}{hint}")
    return layer, _known_channels(model.get_submodule(layer))


def _known_channels(module: nn.Module) -> int | None:
    out = getattr(module, "out_channels", None)
    if isinstance(out, (list, tuple)) and out and isinstance(out[-1], int):
        return out[-1]
    return out if isinstance(out, int) and not isinstance(out, bool) else None


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def attached(model: nn.Module) -> list[FREM]:
    """The FREMs attached to ``model`` by ``frem.attach``."""
    return [m for m in model.children() if isinstance(m, FREM) and m.applied_by_hook]


def attach(model: nn.Module, layer="bottleneck", B: int | float = 162, X: float = 632, *,
           mode: str = "random", seed: int = 0, example_input=None) -> FREM:
    """Apply FREM to ``layer``'s output while training; return the FREM.

    ``layer`` is a dotted module name, a module of ``model``, or
    ``"bottleneck"`` (smp models and timm ``features_only`` nets by name, any
    other model through ``find_bottleneck(model, example_input)``). When the
    layer returns a list/tuple/dict of feature maps, FREM acts on the last.
    """
    name, num_channels = _layer_name(model, layer, example_input)
    for existing in attached(model):
        if existing.layer == name:
            raise ValueError(f"a FREM is already attached to layer {name!r}; "
                             "call .remove() on it or frem.detach(model) first")
    module = FREM(B, X, mode=mode, seed=seed, layer=name)
    if num_channels is not None:
        module.bind(num_channels, device=_model_device(model))
    child_name = "frem_" + (name.replace(".", "_") or "output")
    if hasattr(model, child_name):
        raise ValueError(f"{type(model).__name__} already has an attribute {child_name!r}")
    target = model.get_submodule(name)
    handle = target.register_forward_hook(_make_hook(module))
    model.add_module(child_name, module)
    module.applied_by_hook = True
    module._attachment = _Attachment(weakref.ref(model), child_name, handle)
    return module


def _make_hook(module: FREM):
    def hook(_layer, _inputs, output):
        if not module.training:
            return None  # eval: the model runs exactly as if nothing were attached
        if isinstance(output, torch.Tensor):
            return module.enhance(output)
        if isinstance(output, (list, tuple)) and output:
            return type(output)([*output[:-1], module.enhance(output[-1])])
        if isinstance(output, dict) and output:
            last = next(reversed(output))
            return type(output)({**output, last: module.enhance(output[last])})
        raise ValueError(f"layer {module.layer!r} returned {type(output).__name__}, which has no "
                         "channel dimension; FREM needs a tensor or a list/tuple/dict of tensors")
    return hook


def detach(model: nn.Module) -> int:
    """Remove every FREM attached to ``model``; return how many there were."""
    modules = attached(model)
    for module in modules:
        module.remove()
    return len(modules)


def resample(model: nn.Module, epoch: int) -> list[FREM]:
    """Re-draw the channels of every FREM in ``model`` for ``epoch``."""
    modules = [m for m in model.modules() if isinstance(m, FREM)]
    for module in modules:
        module.resample(epoch)
    return modules
