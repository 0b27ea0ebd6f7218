"""Injecting FREM into a model: attach, resample, detach.

``attach`` adds the FREM as a submodule (of the model itself, or of the
nearest module on the way to the layer that is not an ``nn.Sequential`` /
``ModuleList`` / ``ModuleDict``, whose length and iteration must not change),
so ``model.train()``, ``.eval()`` and ``.to()`` reach it, and applies it with a
forward hook (or pre-hook, ``at="input"``) on the layer. Its buffers are
non-persistent: the state_dict keys never change. ``detach`` leaves the model
exactly as it was. Hooks are picklable objects, so ``copy.deepcopy``
(EMA, ``AveragedModel``) and ``torch.save(model)`` work with FREM attached.
"""

from __future__ import annotations

import contextlib
import difflib
import weakref

import torch
from torch import nn

from frem.bottleneck import CONTAINERS, BottleneckNotFound, _known_map, locate_bottleneck
from frem.compile_guard import ensure_hook_guards
from frem.module import FREM, in_functorch_transform
from frem.monitor import check_fired, every_frem, watch
from frem.reach import OWN_OUTPUT, REACHES, EffectDoesNotReach, arm, probe_first_call, probe_site
from frem.sites import Site, deepest_entry, format_entry, get_entry, replace_entry
from frem.survey import call_arguments, calling, survey
from frem.wrappers import unwrap

BOTTLENECK = "bottleneck"
PLACES = ("output", "input")


class _Enhance:
    """The hook: FREM on one entry of a layer's output (or input) while training."""

    def __init__(self, frem: FREM, entry):
        self.frem, self.entry = frem, entry

    def __call__(self, layer, *args):
        value = args[-1]  # a forward hook gets (inputs, output), a pre-hook (inputs,)
        if not self.frem.training:
            return None  # eval: the model runs exactly as if nothing were attached
        if self.entry is None:
            self.entry = deepest_entry(value, self.frem.dim)  # decided once, at the first training call
            if self.entry is None:
                raise ValueError(f"layer {self.frem.layer!r} {self.frem._at} holds no tensor "
                                 f"(got {type(value).__name__}); FREM needs (N, C, *spatial) maps")
        try:
            x = get_entry(value, self.entry)
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"layer {self.frem.layer!r} {self.frem._at} has no entry {list(self.entry)} "
                             f"(got {type(value).__name__})") from None
        y = self.frem(x, _hooked=True)
        if y is not x and not torch.compiler.is_compiling() and not in_functorch_transform(y):
            y = probe_first_call(self.frem, x, y, self.entry)  # frem.reach: verified at this call's end
        return replace_entry(value, self.entry, y)


def site_width(model: nn.Module, layer="bottleneck", example_input=None, *, at: str = "output", entry=None,
               dim: int | None = None, needed: bool = True) -> tuple[Site, int | None]:
    """Where ``attach`` would put FREM for these arguments, and that tensor's channel count (what B is
    out of): read from one pass on ``example_input`` (which also checks the site: its layout, and that its
    effect reaches the outputs), else as the layer declares it; ``needed=False``: None when neither says."""
    site, width, _ = resolve_site(model, layer, example_input, at=at, entry=entry, dim=dim)
    if needed and width is None:
        raise ValueError(f"layer {site.layer!r} does not declare its width: pass example_input (one batch, as "
                         "forward takes it) so that one pass reads it")
    return site, width


def resolve_site(model: nn.Module, layer, example_input, *, at: str, entry, dim) -> tuple[Site, int | None, str]:
    """The site for ``attach``'s arguments, its width (None where nothing says), and whether FREM's effect
    there reaches the model's outputs (``frem.reach``: "yes", "output", or None: not yet known)."""
    if dim is not None:
        FREM(1, 1.0, dim=dim)  # the same message as FREM's for a dim that is no channel dim
    site, found = _located(model, layer, at, entry, example_input)
    if example_input is None:
        return (site if dim is None else Site(site.layer, site.at, site.entry, site.channels, dim)), site.channels, None
    site = _measured_layout(site, dim, found if found is not None else survey(model, example_input),
                            isinstance(layer, str) and layer == BOTTLENECK)
    width, verdict = _check_on_example(model, site, example_input)
    return site, width, verdict


def _measured_layout(site: Site, dim, found, found_by_frem: bool) -> Site:
    """The site with the layout the survey measured for its tensor, used where no dim was given (a site
    frem found keeps its own: a library's declared layout, or the same measurement); a given dim that
    contradicts the measurement is refused (a channels-last map scaled along dim 1 scales rows)."""
    fmap = _known_map(found, site)
    measured = fmap.dim if fmap is not None and not fmap.ambiguous else None
    if dim is not None and measured is not None and dim % fmap.tensor.dim() != measured % fmap.tensor.dim():
        raise ValueError(
            f"dim={dim} for {site.describe()}, but its tensor {tuple(fmap.tensor.shape)} measured on example_input "
            f"is {fmap.layout} (channels in dim {measured}): FREM would scale {_axis(fmap, dim)} instead of its "
            f"{fmap.channels} channels. Pass dim={measured}, or leave dim out to use what was measured. {_NAME_IT}")
    chosen = dim if dim is not None else site.dim if found_by_frem or measured is None else measured
    return Site(site.layer, site.at, site.entry, site.channels, chosen)


def _axis(fmap, dim: int) -> str:
    index = dim % fmap.tensor.dim()
    return f"dim {dim} ({fmap.tensor.shape[index]} {'rows, columns or tokens' if index else 'samples'})"


def _check_on_example(model: nn.Module, site: Site, example_input) -> tuple[int, str]:
    """Refuse at attach, not at the first training step, a site whose tensor FREM cannot act on, or whose
    effect would not reach the outputs: run the model once on ``example_input`` (eval, every train/eval flag
    restored) with the site's tensor probed (``frem.reach``). Returns its channel count and the verdict."""
    args, kwargs = call_arguments(example_input)

    def entry_of(value):
        return site.entry if site.entry is not None else deepest_entry(value, site.dim)
    with calling(example_input):
        seen, verdict = probe_site(model, site, args, kwargs, entry_of)
    if seen is None:
        raise ValueError(f"layer {site.layer!r} never ran on example_input: FREM there would never act. "
                         f"{_NAME_IT}")
    entry, x = seen
    where = f"layer {site.layer or '<model>'!r} {site.at}{format_entry(entry)}"
    if not isinstance(x, torch.Tensor) or not (x.dim() >= 2 and -x.dim() < site.dim < x.dim() and site.dim % x.dim()):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where} is {shape}, which has no channel dim {site.dim} for FREM to act on: pass "
                         f"entry= (which tensor of a list/dict) or dim= (where its channels are). {_NAME_IT}")
    if site.channels is not None and x.shape[site.dim] != site.channels:
        raise ValueError(f"{where} is {tuple(x.shape)}: dim {site.dim} has {x.shape[site.dim]} entries, but the layer "
                         f"declares {site.channels} channels, so its channels are elsewhere: pass dim= (1 for "
                         f"(N, C, *spatial), -1 for channels last and (N, L, C) tokens). {_NAME_IT}")
    if verdict not in (REACHES, OWN_OUTPUT):
        raise EffectDoesNotReach(verdict)
    return x.shape[site.dim], verdict


_NAME_IT = "frem.candidates(model, example_input) shows every map with its layout"


def _located(model: nn.Module, layer, at: str, entry, example_input):
    """The site ``layer`` names, and the survey if finding it took one."""
    if at not in PLACES:
        raise ValueError(f"at must be one of {PLACES}, got {at!r}")
    entry = (entry,) if isinstance(entry, (int, str)) else (tuple(entry) if entry is not None else None)
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return Site(name, at, entry, _known_channels(module) if at == "output" else None), None
        raise ValueError(f"the module {type(layer).__name__} passed as layer is not part of the model")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name, a module or {BOTTLENECK!r}, got {layer!r}")
    if layer == BOTTLENECK:
        return _the_bottleneck(model, example_input)
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]  # "": the model itself
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
        hint = (f"closest: {', '.join(close)}" if close else
                f"its top-level layers: {', '.join(n for n, _ in model.named_children()) or 'none'}")
        raise ValueError(f"{type(model).__name__} has no layer {layer!r}; {hint}")
    return Site(layer, at, entry, _known_channels(model.get_submodule(layer)) if at == "output" else None), None


def _the_bottleneck(model: nn.Module, example_input):
    """``layer="bottleneck"`` asks frem to find it. A model may also have a module of that very name (MONAI's
    HoVerNet): where the finder does not pick that module's output, frem refuses rather than guess which was
    meant, and says how to name the module."""
    named = dict(model.named_children()).get(BOTTLENECK)
    try:
        site, found = locate_bottleneck(model, example_input, with_survey=True)
    except ValueError as error:
        if named is None:
            raise
        message = (f"{error}. ({type(model).__name__} also has a module named 'bottleneck': layer='bottleneck' "
                   "asks frem to find the bottleneck; to attach to that module, pass layer=model.bottleneck, the "
                   "module itself.)")
        if isinstance(error, BottleneckNotFound):
            raise BottleneckNotFound(message, error.candidates) from None
        raise ValueError(message) from None
    if named is not None and (site.layer, site.at) != (BOTTLENECK, "output"):
        raise ValueError(
            f"{type(model).__name__} has a module named 'bottleneck', and frem finds the bottleneck elsewhere "
            f"({site.describe()}): layer='bottleneck' asks frem to find it, so which is meant is unclear. Pass "
            "layer=model.bottleneck (the module itself) for the module of that name, or layer="
            f"{site.layer!r}{', at=' + repr(site.at) if site.at != 'output' else ''} for what frem finds")
    return site, found


def _known_channels(module: nn.Module) -> int | None:
    out = getattr(module, "out_channels", None)
    if isinstance(out, (list, tuple)) and out and isinstance(out[-1], int):
        return out[-1]
    return out if isinstance(out, int) and not isinstance(out, bool) else None


def _holder(model: nn.Module, layer: str) -> nn.Module:
    """The outermost module on the way to ``layer`` whose children nobody iterates."""
    path = [model] + [model.get_submodule(".".join(layer.split(".")[:i + 1]))
                      for i in range(len(layer.split("."))) if layer]
    for module in path + list(path[-1].modules()):
        if not isinstance(module, CONTAINERS):
            return module
    raise ValueError(f"layer {layer!r} holds no module that is not a container; "
                     "FREM needs one to live in (name a layer inside it)")


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def attached(model: nn.Module) -> list[FREM]:
    """The FREMs ``frem.attach`` put on ``model``."""
    return [m for m in unwrap(model).modules() if isinstance(m, FREM) and m.applied_by_hook]


def attach(model: nn.Module, layer="bottleneck", B: int | float = 162, X: float = 632, *,
           mode: str = "random", seed: int = 0, example_input=None, at: str = "output",
           entry=None, dim: int | None = None, redraw=None) -> FREM:
    """Apply FREM to ``layer``'s output (``at="input"``: its first input) while training.

    ``layer`` is a dotted module name, a module of ``model``, or
    ``"bottleneck"``: by name for the libraries that name it, otherwise
    measured on ``example_input`` (see ``frem.candidates``). When the layer
    returns a list/tuple/dict, ``entry`` (an index, a key or a path) says which
    tensor; by default the deepest feature map in it (lowest resolution, most
    channels, last). ``dim`` says where the channels are (1: (N, C, *spatial);
    -1: channels-last maps and (N, L, C) tokens); by default what the library
    declares (timm's ``output_fmt``) or what ``example_input`` measured, else 1.
    ``redraw``: who re-draws the channels, None (you call ``frem.resample``
    each epoch), ``"train"`` (every ``model.train()``) or N (every N steps).

    With ``example_input``, attach runs the model once and refuses a site whose
    tensor has no such channel dim, is narrower than B, or whose effect does
    not reach the model's outputs (``frem.reach``); without it, that last check
    runs at the first training call. Wrappers (DataParallel, DDP,
    ``torch.compile``) are seen through. Returns the FREM: ``.remove()`` undoes
    the attachment.
    """
    model = unwrap(model)
    FREM(B, X, mode=mode, seed=seed, redraw=redraw)  # settings refused before any pass of the model
    site, width, verdict = resolve_site(model, layer, example_input, at=at, entry=entry, dim=dim)
    ensure_hook_guards()  # a compiled model must notice the hook (frem.compile_guard)
    target = model.get_submodule(site.layer)
    for existing in attached(model):
        if existing._target_ref() is target and existing._at == site.at:
            raise ValueError(f"a FREM is already attached to the {site.at} of layer {site.layer!r}"
                             + (f" (as {existing.layer!r})" if existing.layer != site.layer else "")
                             + "; call .remove() on it or frem.detach(model) first")
    module = FREM(B, X, mode=mode, seed=seed, layer=site.layer, dim=site.dim, redraw=redraw)
    if width is not None:
        module.bind(width, device=_model_device(model))  # B is checked against the width here, before any hook
    holder = _holder(model, site.layer)
    base = "frem_" + ((site.layer.replace(".", "_") or "model") + ("_input" if site.at == "input" else ""))
    child_name, n = base, 1
    while child_name in holder._modules or hasattr(holder, child_name):
        n += 1
        child_name = f"{base}_{n}"
    hook = _Enhance(module, site.entry)
    # First among the layer's hooks: FREM acts as part of the layer, so what other hooks take from it (the
    # hidden states transformers' output recorders collect, a user's feature hook) is the enhanced tensor.
    if site.at == "output":
        target.register_forward_hook(hook, prepend=True)
    else:
        target.register_forward_pre_hook(hook, prepend=True)
    holder.add_module(child_name, module)
    module.applied_by_hook = True
    module._holder_ref, module._target_ref = weakref.ref(holder), weakref.ref(target)
    module._root_ref = weakref.ref(model)
    module._child_name, module._at = child_name, site.at
    module._reach["state"] = verdict
    if verdict is None and model.training:
        arm(module)  # verified at the first training call; model.train() arms it where the model is in eval now
    watch(module, model)  # "did the network train?" for the never-ran warning (frem.monitor)
    return module


def detach(model: nn.Module) -> int:
    """Remove every FREM attached to ``model``; return how many there were."""
    modules = attached(model)
    for module in modules:
        module.remove()
    return len(modules)


def _every_frem(model: nn.Module, doing: str) -> list[FREM]:
    """Every FREM acting in ``model`` (a submodule too: the FREMs attached inside it), attached or inline; an
    error naming ``doing`` where there is none."""
    modules = every_frem(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no FREM to {doing}, and none is attached to a layer inside "
                         "it: frem.attach(model, ...) first")
    return modules


def resample(model: nn.Module, epoch: int) -> list[FREM]:
    """Re-draw the channels of every FREM in ``model`` for ``epoch`` (call it once an epoch)."""
    modules = _every_frem(model, "re-draw")
    check_fired(model, modules)  # warns where the model trained and a FREM never ran (frem.status)
    for module in modules:
        module.resample(epoch)
    return modules


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block every FREM of ``model`` is the identity, in train mode too (a warm-up, a
    stretch of fine-tuning, a comparison step); on leaving, each acts again with the same draw.
    Nests; compiled models recompile once for each state (Dynamo guards the flag)."""
    modules = _every_frem(model, "disable")
    for module in modules:
        module._paused += 1
        module._idle["paused"] = True  # an epoch that had FREM off by choice is not an idle FREM
    try:
        yield modules
    finally:
        for module in modules:
            module._paused -= 1
