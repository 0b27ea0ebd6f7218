"""Finding "the bottleneck": the encoder's deepest feature map, farthest from the loss.

Libraries that name their bottleneck resolve by name (``known_bottleneck``):
smp models, timm ``features_only`` nets, MONAI ``DynUNet`` and ``UNETR``,
nnU-Net's ``dynamic_network_architectures`` U-Nets and torchvision's
segmentation models, also when wrapped in another module. Any other model is
measured (``survey``): one forward pass in eval mode records every module's
input and output feature maps, and the rule below picks one or says it cannot.

The rule, decided from the networks people train (MONAI, nnU-Net,
torchvision, smp, hand-written U-Nets; see ``tests/test_networks.py``):

1. Feature maps only: tensors of the input's rank, (N, C, *spatial), that
   reach the output through autograd. Token sequences (N, L, D) of a
   transformer, squeeze-excitation gates (all spatial sizes 1) and
   concatenations (a skip connection merged with a decoder feature) are not
   features an encoder block computes.
2. The lowest resolution: an encoder downsamples, the decoder upsamples, so
   the bottleneck lives at the smallest spatial size.
3. The most channels there: the bottleneck block widens; projections, heads
   and attention maps at the same size are narrower.
4. The last such map in execution order (the end of the bottleneck block,
   where the decoder takes over); of the modules that produce that very
   tensor, the outermost one (where the encoder hands it on).
5. It must be downstream of every other candidate of steps 2-3. Parallel
   branches (two encoders, UNETR's hidden states of several depths) make the
   choice ambiguous, and ``choose`` raises an error listing them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class Site:
    """Where FREM acts: a module's output (or input), and which entry of it.

    ``entry`` is the path into a list/tuple/dict output, ``()`` for a tensor,
    ``None`` to pick the deepest feature map at the first training call.
    """
    layer: str
    at: str = "output"
    entry: tuple | None = ()
    channels: int | None = None

    def describe(self) -> str:
        return f"{self.layer or '<model>'} {self.at}{format_entry(self.entry)}"


def format_entry(entry) -> str:
    if not entry:
        return ""
    return "".join(f"[{key!r}]" for key in entry)


def tensor_entries(value, path=()):
    """(path, tensor) for a tensor or every tensor inside nested lists/tuples/dicts."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensor_entries(item, path + (key,))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from tensor_entries(item, path + (index,))


def get_entry(value, entry):
    for key in entry:
        value = value[key]
    return value


def replace_entry(value, entry, new):
    """``value`` with the tensor at ``entry`` replaced, containers rebuilt as their own type."""
    if not entry:
        return new
    key, rest = entry[0], entry[1:]
    if isinstance(value, dict):
        return type(value)({**value, key: replace_entry(value[key], rest, new)})
    items = list(value)
    items[key] = replace_entry(items[key], rest, new)
    if hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*items)
    return type(value)(items)


def deepest_entry(value) -> tuple | None:
    """The entry holding the deepest feature map: lowest resolution, most channels, last."""
    maps = [(path, t) for path, t in tensor_entries(value) if t.dim() >= 3]
    if not maps:
        entries = list(tensor_entries(value))
        return entries[-1][0] if entries else None
    order = {path: i for i, (path, _) in enumerate(maps)}
    return min(maps, key=lambda pt: (pt[1].shape[2:].numel(), -pt[1].shape[1], -order[pt[0]]))[0]


# ---------------------------------------------------------------- known by name

def _smp(model):
    out = getattr(getattr(model, "encoder", None), "out_channels", None)
    if isinstance(out, (list, tuple)) and out and isinstance(out[-1], int):
        return Site("encoder", entry=(-1,), channels=int(out[-1]))
    return None


def _timm_features(model):
    info = getattr(model, "feature_info", None)
    if isinstance(model, nn.ModuleDict) and hasattr(info, "channels"):
        channels = info.channels()
        # FeatureListNet returns a list; FeatureDictNet a dict, whose deepest
        # entry is picked at the first training call.
        entry = None if type(model).__name__ == "FeatureDictNet" else (-1,)
        return Site("", entry=entry, channels=int(channels[-1]))
    return None


def _monai_dynunet(model):
    if type(model).__name__ == "DynUNet" and isinstance(getattr(model, "bottleneck", None), nn.Module):
        return Site("bottleneck", channels=int(model.filters[-1]))
    return None


def _monai_unetr(model):
    # The ViT's last hidden state becomes a feature map only inside proj_feat,
    # which no module outputs: decoder5's first input is that map.
    if type(model).__name__ == "UNETR" and hasattr(model, "proj_feat") and hasattr(model, "decoder5"):
        return Site("decoder5", at="input", entry=(0,), channels=int(model.hidden_size))
    return None


def _nnunet(model):
    encoder = getattr(model, "encoder", None)
    stages = getattr(encoder, "stages", None)
    channels = getattr(encoder, "output_channels", None)
    if isinstance(stages, nn.Sequential) and isinstance(channels, (list, tuple)) and hasattr(model, "decoder"):
        return Site(f"encoder.stages.{len(stages) - 1}", channels=int(channels[-1]))
    return None


def _torchvision_segmentation(model):
    backbone = getattr(model, "backbone", None)
    names = getattr(backbone, "return_layers", None)
    if type(backbone).__name__ == "IntermediateLayerGetter" and isinstance(names, dict):
        key = "high" if "high" in names.values() else "out"  # lraspp names its deepest map "high"
        if key in names.values():
            return Site("backbone", entry=(key,))
    return None


KNOWN = (_smp, _timm_features, _monai_dynunet, _monai_unetr, _nnunet,
         _torchvision_segmentation)


def known_bottleneck(model: nn.Module) -> Site | None:
    """The bottleneck of a library that names it, at the model or in the outermost module that is one."""
    for prefix, module in model.named_modules():
        for rule in KNOWN:
            site = rule(module)
            if site is not None:
                layer = ".".join(p for p in (prefix, site.layer) if p)
                return Site(layer, site.at, site.entry, site.channels)
    return None


# ---------------------------------------------------------------- measured

@dataclass
class Candidate:
    """One feature map seen in the survey, under the modules that produce or take it."""
    site: Site
    shape: tuple
    distance: int          # shortest autograd path to the model's output
    order: int             # execution order of its last appearance
    tensor: torch.Tensor = field(repr=False)
    also: list = field(default_factory=list)  # other sites of the same tensor
    note: str = ""

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def resolution(self) -> int:
        return math.prod(self.shape[2:])


class BottleneckNotFound(ValueError):
    """The survey found no clear bottleneck; the message lists the best candidates."""


def _distances(outputs: list[torch.Tensor]) -> dict:
    distance, queue = {}, deque()
    for t in outputs:
        if t.grad_fn is not None and t.grad_fn not in distance:
            distance[t.grad_fn] = 0
            queue.append(t.grad_fn)
    while queue:
        node = queue.popleft()
        for parent, _ in node.next_functions:
            if parent is not None and parent not in distance:
                distance[parent] = distance[node] + 1
                queue.append(parent)
    return distance


def _ancestors(node) -> set:
    seen, queue = {node}, deque([node])
    while queue:
        for parent, _ in queue.popleft().next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return seen


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def survey(model: nn.Module, example_input) -> list[Candidate]:
    """Every feature map of one forward pass, one ``Candidate`` per tensor.

    Runs in eval mode (no running statistics change) and leaves every
    submodule's own train/eval flag as it found it.
    """
    model = unwrap(model)
    events = []  # (module name, "output"|"input", entry, tensor), in execution order
    calls: dict[str, int] = {}

    def after(name):
        def hook(_module, _inputs, output):
            calls[name] = calls.get(name, 0) + 1
            events.extend((name, "output", path, t) for path, t in tensor_entries(output))
        return hook

    def before(name):
        def hook(_module, inputs):
            events.extend((name, "input", path, t) for path, t in tensor_entries(inputs))
        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_hook(after(name)),
                        module.register_forward_pre_hook(before(name))]
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    inputs = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.enable_grad():
            outputs = [t for _, t in tensor_entries(model(*inputs))]
    finally:
        for module, flag in flags.items():
            module.training = flag
        for handle in handles:
            handle.remove()
    rank = next((t.dim() for t in inputs if isinstance(t, torch.Tensor)), 4)
    distance = _distances(outputs)

    by_tensor: dict[int, Candidate] = {}
    for order, (name, at, path, t) in enumerate(events):
        if (t.dim() != rank or rank < 3 or t.grad_fn not in distance or calls.get(name, 1) != 1):
            continue
        site = Site(name, at, path, int(t.shape[1]))
        found = by_tensor.get(id(t))
        if found is None:
            by_tensor[id(t)] = Candidate(site, tuple(t.shape), distance[t.grad_fn], order, t)
        else:
            found.also.append(site)
            found.order = order
    for candidate in by_tensor.values():
        sites = [candidate.site, *candidate.also]
        candidate.site = min(sites, key=_preference)
        candidate.also = [s for s in sites if s != candidate.site]
    return sorted(by_tensor.values(), key=lambda c: (c.resolution, -c.channels, -c.order))


def _preference(site: Site):
    """Of the sites of one tensor: an output over an input, then the outermost
    module (where the encoder hands the map on), then whole over an entry."""
    return (site.at != "output", site.layer.count("."), bool(site.entry), site.layer)


def choose(candidates: list[Candidate], model_name: str = "the model") -> Candidate:
    """The bottleneck by the module docstring's rule, or ``BottleneckNotFound``."""
    for c in candidates:
        c.note = ("a gate (every spatial size 1)" if all(s == 1 for s in c.shape[2:]) else
                  "a concatenation (skip merged with decoder)" if c.tensor.grad_fn.name() == "CatBackward0"
                  else "")
    maps = [c for c in candidates if not c.note]
    if not maps:
        raise BottleneckNotFound(
            f"frem found no feature map (N, C, *spatial) in {model_name} that reaches its output; "
            "pass layer=<module name> to frem.attach (frem.candidates lists what it saw)")
    lowest = min(c.resolution for c in maps)
    widest = max(c.channels for c in maps if c.resolution == lowest)
    tied = [c for c in maps if c.resolution == lowest and c.channels == widest]
    chosen = max(tied, key=lambda c: c.order)
    upstream = _ancestors(chosen.tensor.grad_fn)
    parallel = [c for c in tied if c is not chosen and c.tensor.grad_fn not in upstream]
    for c in maps:
        c.note = ("parallel branch: ambiguous" if c in parallel else
                  "upstream of the pick" if c in tied else
                  "fewer channels at that resolution" if c.resolution == lowest else "higher resolution")
    if parallel:
        rows = "; ".join(f"{c.site.describe()} {tuple(c.shape)}" for c in [chosen, *parallel])
        raise BottleneckNotFound(
            f"frem cannot tell which feature map is the bottleneck of {model_name}: {len(parallel) + 1} "
            f"parallel maps share the lowest resolution and the most channels ({rows}). "
            "Pass layer=<module name> (and at='input' for a module's input) to frem.attach; "
            "frem.candidates(model, example_input) prints the table")
    chosen.note = (f"bottleneck: lowest resolution {'x'.join(map(str, chosen.shape[2:]))}, "
                   f"most channels there ({widest}), last before the decoder")
    return chosen


def locate_bottleneck(model: nn.Module, example_input=None) -> Site:
    """The bottleneck's site: by name where a library names it, else measured."""
    model = unwrap(model)
    site = known_bottleneck(model)
    if site is not None:
        return site
    if example_input is None:
        example = _example_name(model)
        raise ValueError(
            f"cannot tell where the bottleneck of {type(model).__name__} is without running it: "
            "pass example_input=<a batch> so frem can measure it, or name the layer"
            + (f" (for example layer={example!r})" if example else ""))
    return choose(survey(model, example_input), type(model).__name__).site


def _example_name(model: nn.Module) -> str | None:
    """A layer the model really has (not a container), to show in an error message."""
    names = [name for name, module in model.named_modules() if name and not isinstance(module, CONTAINERS)]
    return names[len(names) // 2] if names else None


def find_bottleneck(model: nn.Module, example_input=None) -> str:
    """Name of the module at the bottleneck (see ``locate_bottleneck`` for the full site)."""
    return locate_bottleneck(model, example_input).layer


class CandidateTable(list):
    """``frem.candidates``: the feature maps of a model, lowest resolution first, printable."""

    def __init__(self, rows, chosen: Candidate | None, known: Site | None, error: str | None):
        super().__init__(rows)
        self.chosen, self.known, self.error = chosen, known, error

    def __str__(self) -> str:
        head = ("layer", "at", "shape", "channels", "distance to output", "")
        rows = [(c.site.layer, c.site.at + format_entry(c.site.entry),
                 "x".join(map(str, c.shape)), str(c.channels), str(c.distance),
                 ("<- " if c is self.chosen else "") + c.note) for c in self]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        if self.known is not None:
            lines.append(f"attach picks {self.known.describe()}: known by name for this architecture")
        elif self.error:
            lines.append(f"attach picks nothing: {self.error}")
        elif self.chosen is not None:
            lines.append(f"attach picks {self.chosen.site.describe()}")
        return "\n".join(lines)


def candidates(model: nn.Module, example_input, limit: int = 12) -> CandidateTable:
    """The feature maps ``attach(model, "bottleneck")`` chooses from, and which one it picks, and why.

    ``print(frem.candidates(model, x))`` shows layer, where (output/input and
    entry), shape, channels and shortest autograd distance to the output,
    lowest resolution first. A wrong guess becomes ``attach(..., layer=...)``.
    """
    model = unwrap(model)
    found = survey(model, example_input)
    chosen, error = None, None
    try:
        chosen = choose(found, type(model).__name__)
    except BottleneckNotFound as problem:
        error = str(problem).split(":")[0]
    known = known_bottleneck(model)
    if known is not None:
        key = (known.layer, known.at, known.entry)
        chosen = next((c for c in found for s in (c.site, *c.also) if (s.layer, s.at, s.entry) == key), None)
        if chosen is not None:
            chosen.note = "bottleneck (known by name)"
    return CandidateTable(found[:limit], chosen, known, error)
