"""Finding "the bottleneck": the encoder's deepest output, where the decoder takes over.

Libraries that name their bottleneck resolve by name (``frem.known``): smp
models, timm ``features_only`` nets, MONAI ``UNet``, ``AttentionUnet``,
``DynUNet`` and ``UNETR``, nnU-Net's U-Nets and torchvision's segmentation
models, also inside another module. Any other model is measured: one forward
pass in eval mode (``frem.survey``) records every feature map, the module
calls around it and the autograd graph, and the rule below picks one map or
refuses, saying why and listing what it saw.

The rule rests on the structure of an encoder-decoder, not on channel counts
alone. It was decided from a corpus of networks (``tests/corpus.py``: MONAI,
nnU-Net, smp's architectures, timm ``features_only`` backbones of every
family under hand-written decoders, torchvision, and hand-written U-Nets with
inverted-residual and ConvNeXt/MedNeXt blocks, attention gates, sub-pixel
decoders, dense blocks, 2-D and 3-D), each of which must end right or refuse:

1. *Feature maps* are tensors laid out (N, C, *spatial), (N, *spatial, C) or
   as tokens (N, L, C) on one of the model's grids (``frem.survey`` reads
   the layout; FREM acts on the channels wherever they are), made
   from the input, that reach the output without passing a *gate* (a map
   that enters a multiply by broadcasting: squeeze-excitation, attention
   coefficients). Maps that descend from a global or adaptive pool (SE
   squeezes, PSP/ASPP context) are context, not a level of the encoder: a map
   is a gate or context by what made it and where it goes, not by its size,
   so a real bottleneck of 1x1 (a small input) still counts.
2. *The lowest resolution* L among them is where the encoder ends (among the
   maps not made inside a module that upsamples: a decoder may go lower
   still, as DPT's reassembles the ViT's last map at 1/32). If it is the
   input's own resolution the model never downsamples (MONAI HighResNet):
   there is no bottleneck, and frem refuses.
3. Maps at L made inside a module that upsamples (a decoder block: its
   output is finer than its input) belong to the decoder: FPN laterals,
   LinkNet projections, the widening convolution of a sub-pixel block.
4. *The main path*: of the remaining maps at L, those that every path from
   the input through L to the output passes (dominators of the graph). Side
   branches drop out (the gating convolution of an attention U-Net, a deep
   supervision head); if nothing dominates, the deepest maps are parallel
   (two encoders, UNETR's hidden states) and frem refuses.
5. *Block boundaries*: a main-path map made inside a module whose own output
   is a later main-path map is the inside of a block (the widened map of an
   inverted residual, a MedNeXt/ConvNeXt MLP, a dense layer): the block's
   output stands for it. Maps whose channels a pixel shuffle folds into space
   (a flat sub-pixel decoder) are not features either.
6. The pick is the *last* remaining map: the end of the encoder's work at L,
   where the decoder takes over. A dense block ending in a concatenation is
   picked whole.
7. frem refuses rather than guess when the pick is narrower than an earlier
   remaining map (other than the map that entered L): a narrowing
   projection after the encoder may be the encoder's last layer or the
   decoder's first; and when no layer with weights works at a higher
   resolution after the pick: a head at L with no decoder (PSPNet, DeepLab,
   FCN), whose encoder end no structure shows.

A refusal is a ``BottleneckNotFound`` naming the candidates; ``frem.candidates``
prints the whole table, and ``layer=`` settles it.
"""

from __future__ import annotations

from torch import nn

from frem.known import known_bottleneck
from frem.sites import Site, deepest_entry, format_entry, get_entry, replace_entry, tensor_entries
from frem.survey import FeatureMap, Survey, reach, survey
from frem.wrappers import unwrap

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

__all__ = ["BottleneckNotFound", "CONTAINERS", "CandidateTable", "FeatureMap", "Site", "Survey", "candidates",
           "choose", "deepest_entry", "find_bottleneck", "format_entry", "get_entry", "known_bottleneck",
           "locate_bottleneck", "replace_entry", "survey", "tensor_entries", "unwrap"]


class BottleneckNotFound(ValueError):
    """The survey found no clear bottleneck; the message names the candidates, ``.candidates`` holds them."""

    def __init__(self, message: str, candidates=()):
        super().__init__(message)
        self.candidates = [m for m in candidates if m.site is not None]


def _describe(maps, limit: int = 6) -> str:
    """The first few maps by their outermost site (a module's whole output first)."""
    maps = sorted((m for m in maps if m.site is not None), key=lambda m: (m.site.layer.count("."), -m.order))
    rows = [f"{m.site.describe()} {m.shape}" for m in maps[:limit]]
    return "; ".join(rows) + (f"; and {len(maps) - limit} more" if len(maps) > limit else "")


def _advice() -> str:
    return ("Pass layer=<module name> (and at='input' for a module's input) to frem.attach; "
            "frem.candidates(model, example_input) prints the table")


def _param_node(node, inputs) -> bool:
    """A node with weights: one of its parents accumulates into a leaf that is not the input."""
    return any(type(p).__name__ == "AccumulateGrad" and p not in inputs for p, _ in node.next_functions
               if p is not None)


def choose(found: Survey, model_name: str = "the model") -> FeatureMap:
    """The bottleneck by the module docstring's rule, or ``BottleneckNotFound``.

    Every map of the survey gets a ``note`` saying what the rule made of it.
    """
    features = _feature_maps(found, model_name)                       # 1
    lowest = _lowest_resolution(features, found, model_name)          # 2
    deep = _deep_maps(features, lowest, found, model_name)            # 3
    chain = _main_path(deep, found, model_name)                       # 4
    boundaries = _block_boundaries(chain, found, model_name)          # 5
    pick = boundaries[-1]                                             # 6
    _refuse_if_unsure(pick, boundaries, chain, deep, lowest, found, model_name)  # 7
    pick.note = (f"bottleneck: the last map at the lowest resolution "
                 f"{'x'.join(map(str, pick.grid))} on the main path, where the decoder takes over")
    return pick


def _feature_maps(found: Survey, model_name: str) -> list:
    maps = [m for m in found.maps.values() if m.distance is not None]
    for m in maps:
        m.note = ("global context (from a global or adaptive pool)" if m.pooled else
                  "reaches the output only through a gate" if not m.live else "")
    features = [m for m in maps if not m.note]
    if not features:
        raise BottleneckNotFound(
            f"frem found no feature map (N, C, *spatial) in {model_name} that reaches its output; "
            "pass layer=<module name> to frem.attach (frem.candidates lists what it saw)")
    return features


def _lowest_resolution(features, found: Survey, model_name: str) -> int:
    # The encoder's lowest: a decoder may go lower still (DPT reassembles the ViT's last map at 1/32 with a
    # strided conv inside its decoder), and those maps are the decoder's, not a deeper encoder level.
    decoders = [c for c in found.calls if c.upsamples]
    encoder = [m for m in features if not any(c.made_inside(m.order) for c in decoders)]
    lowest = min(m.resolution for m in (encoder or features))
    for m in features:
        if m.resolution > lowest:
            m.note = "higher resolution"
        elif m.resolution < lowest:
            decoder = next(c for c in decoders if c.made_inside(m.order))
            m.note = f"decoder (made inside {decoder.name}, which upsamples), below the encoder's lowest"
    if lowest >= found.input_resolution:
        raise BottleneckNotFound(
            f"{model_name} never lowers the resolution of its input (every feature map is "
            f"{'x'.join(map(str, features[0].grid))} or finer), so it has no bottleneck for FREM "
            f"to act on. {_advice()}")
    return lowest


def _deep_maps(features, lowest: int, found: Survey, model_name: str) -> list:
    """The maps at the lowest resolution that belong to the encoder: not made inside a module that
    upsamples, not on a detour."""
    decoders = [c for c in found.calls if c.upsamples]
    deep = []
    for m in (m for m in features if m.resolution == lowest):
        decoder = next((c for c in decoders if c.made_inside(m.order)), None)
        if decoder is not None:
            m.note = f"decoder (made inside {decoder.name}, which upsamples)"
        else:
            deep.append(m)
    deep = _without_detours(deep, features, lowest, found)
    if not deep:
        raise BottleneckNotFound(f"frem found the lowest resolution of {model_name} only inside modules that "
                                 f"upsample or on detours. {_advice()}")
    return deep


def _main_path(deep, found: Survey, model_name: str) -> list:
    """The deep maps on every path through the lowest resolution, in execution order."""
    chain = [m for m in deep if _on_every_deep_path(m, deep, found)]
    for m in deep:
        if m not in chain:
            m.note = "side branch: not on every path through the lowest resolution"
    if not chain:
        parallel = sorted(deep, key=lambda m: (-m.channels, -m.order))
        raise BottleneckNotFound(
            f"frem cannot tell which feature map is the bottleneck of {model_name}: the "
            f"{sum(m.site is not None for m in deep)} maps at the lowest resolution lie on parallel paths and "
            f"none is on all of them ({_describe(parallel)}). {_advice()}", parallel)
    return sorted(chain, key=lambda m: m.order)


def _block_boundaries(chain, found: Survey, model_name: str) -> list:
    """The main-path maps a module hands over, not made inside a block whose output is a later one."""
    nodes = {m.node for m in chain}
    boundaries = []
    for m in chain:
        block = next((c for c in found.calls if c.made_inside(m.order) and m.node not in c.output_nodes
                      and any(n in nodes for n in c.output_nodes)), None)
        if block is not None:
            m.note = f"inside {block.name}, whose output is on the main path"
        elif m.sub_pixel:
            m.note = "sub-pixel channels: a pixel shuffle folds them into space"
        elif m.site is None:
            m.note = "no module hands it over"
        else:
            boundaries.append(m)
    if not boundaries:
        raise BottleneckNotFound(f"frem found no module boundary on the main path of {model_name} at its lowest "
                                 f"resolution. {_advice()}")
    return boundaries


def _refuse_if_unsure(pick, boundaries, chain, deep, lowest: int, found: Survey, model_name: str) -> None:
    # Maps as wide as the pick, made from it and feeding the decoder on paths of their own: the
    # encoder may go on past the pick (a transformer's later hidden states, a dilated last stage
    # beside a same-resolution skip). A narrow side head (deep supervision) is no such map.
    after = reach({pick.node}, found.children)
    branches = [m for m in deep if m not in chain and m.node in after and m.channels >= pick.channels
                and _decoder_follows(m, lowest, found)]
    if branches:
        for m in branches:
            m.note = "parallel branch after the last main-path map, as wide: feeds the decoder"
        raise BottleneckNotFound(
            f"frem cannot tell which feature map is the bottleneck of {model_name}: after "
            f"{_describe([pick])}, {sum(m.site is not None for m in branches)} more maps at the lowest "
            "resolution, as wide or wider, are made from it and feed the decoder on paths of their own, so "
            f"the encoder may go on past it ({_describe(branches)}). {_advice()}", [pick, *branches])
    entry = chain[0]
    for m in boundaries[:-1]:
        m.note = "entry into the lowest resolution" if m is entry else "upstream of the pick"
    # A narrowing projection after the encoder: its last layer, or the decoder's first?
    wider = [m for m in boundaries[:-1] if m is not entry and m.channels > pick.channels]
    if wider:
        for m in wider:
            m.note = "wider than the last map: encoder or decoder?"
        pick.note = "narrower than an earlier map on the main path"
        raise BottleneckNotFound(
            f"frem cannot tell where the encoder of {model_name} ends: the last map at the lowest resolution "
            f"({_describe([pick])}) is narrower than an earlier one ({_describe(wider)}), so it may be the "
            f"decoder's first projection. {_advice()}", [pick, *wider])
    if not _decoder_follows(pick, lowest, found):
        pick.note = "last map at the lowest resolution, but no decoder follows"
        raise BottleneckNotFound(
            f"frem cannot tell where the encoder of {model_name} ends: after its lowest resolution nothing "
            "with weights works at a higher resolution (a head at the lowest resolution, as in PSPNet, "
            f"DeepLab or FCN), so the encoder's last map and the head's first look alike "
            f"({_describe(boundaries)}). {_advice()}", boundaries)


def _without_detours(deep, features, lowest: int, found: Survey) -> list:
    """``deep`` without the maps from which the main path reaches other maps at the lowest resolution
    only through finer ones: a detour through the lowest resolution (the keys and values of
    spatial-reduction attention, the first of two stacked hourglasses), not the encoder's last level."""
    finer = {m.node for m in features if m.resolution > lowest}
    nodes = {m.node for m in deep}
    kept = []
    for m in deep:
        anyway = reach({m.node}, found.children) & nodes
        direct = reach({m.node}, found.children, blocked=finer) & nodes
        if anyway - direct:
            m.note = "detour: the encoder goes back to a finer resolution after it"
        else:
            kept.append(m)
    return kept


def _on_every_deep_path(m: FeatureMap, deep, found: Survey) -> bool:
    """No other deep map is both made from the input and reaching the output without passing ``m``."""
    made = reach(found.input_nodes, found.children, blocked=m.node)
    if not any(d.node in made for d in deep if d is not m):
        return True
    reaching = reach(found.output_nodes, found.parents, blocked=m.node)
    return not any(d.node in made and d.node in reaching for d in deep if d is not m)


def _decoder_follows(pick: FeatureMap, lowest: int, found: Survey) -> bool:
    """Some layer with weights works at a finer resolution on the way from ``pick`` to the output."""
    after = reach({pick.node}, found.children)
    return any(m.node in after and m.resolution > lowest and m.live and _param_node(m.node, found.input_nodes)
               for m in found.maps.values())


def locate_bottleneck(model: nn.Module, example_input=None) -> Site:
    """The bottleneck's site (layer, output or input, entry, channels): by name where a
    library names it, else measured on ``example_input``."""
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
    """Name of the module at the bottleneck. Where that module returns a list or dict, or FREM
    acts on its input, ``locate_bottleneck`` gives the whole site (which entry, output or input)."""
    return locate_bottleneck(model, example_input).layer


class CandidateTable(list):
    """``frem.candidates``: the feature maps of a model, the lowest resolution first, printable."""

    def __init__(self, rows, chosen: FeatureMap | None, known: Site | None, error: str | None, hidden: int):
        super().__init__(rows)
        self.chosen, self.known, self.error, self.hidden = chosen, known, error, hidden

    def __str__(self) -> str:
        head = ("layer", "at", "shape", "layout", "channels", "distance to output", "")
        rows = []
        for m in self:
            site = self.known if m is self.chosen and self.known is not None else m.site
            rows.append((site.layer or "<model>", site.at + format_entry(site.entry), "x".join(map(str, m.shape)),
                         m.layout, str(m.channels), str(m.distance), ("<- " if m is self.chosen else "") + m.note))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        if self.hidden:
            lines.append(f"... {self.hidden} more (finer maps, gates, global context): "
                         "frem.candidates(..., limit=None) shows them")
        if self.known is not None:
            lines.append(f"attach picks {self.known.describe()}: known by name for this architecture")
        elif self.error:
            lines.append(f"attach picks nothing: {self.error}")
        elif self.chosen is not None:
            lines.append(f"attach picks {self.chosen.site.describe()}")
        return "\n".join(lines)


def candidates(model: nn.Module, example_input, limit: int | None = 12) -> CandidateTable:
    """The feature maps ``attach(model, "bottleneck")`` chooses from, which one it picks, and why.

    ``print(frem.candidates(model, x))`` shows every feature map a module
    hands over: layer, where (output/input and entry), shape, layout (``NCHW``,
    ``NHWC``, ``NLC`` tokens ...), channels,
    shortest autograd distance to the output, and what the rule made of it.
    First, in execution order, every map at the lowest resolution and the
    pick (always shown), then finer maps, then gates and global context, up
    to ``limit`` rows in all. A wrong guess becomes ``attach(..., layer=...)``.
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
        chosen = _known_map(found, known)
        if chosen is not None:
            chosen.note = "bottleneck (known by name)"
    rows = [m for m in found.maps.values() if m.distance is not None and (m.site or m is chosen)]
    features = [m for m in rows if m.live and not m.pooled]
    lowest = min((m.resolution for m in features), default=0)
    keep = [m for m in rows if (m in features and m.resolution == lowest) or m is chosen]
    # Then finer maps by resolution, and last the gates and global context, which are never picked.
    rest = sorted((m for m in rows if m not in keep), key=lambda m: (m not in features, m.resolution, m.order))
    shown = rest if limit is None else rest[:max(limit - len(keep), 0)]
    table = sorted(keep, key=lambda m: m.order) + shown
    return CandidateTable(table, chosen, known, error, hidden=len(rest) - len(shown))


def _known_map(found: Survey, known: Site) -> FeatureMap | None:
    """The surveyed map a name rule points at (negative entries counted from the end)."""
    if known.at == "output" and known.layer in found.module_outputs:
        value = found.module_outputs[known.layer]
        entry = known.entry if known.entry is not None else deepest_entry(value)
        try:
            tensor = get_entry(value, entry or ())
        except (KeyError, IndexError, TypeError):
            return None
        return found.maps.get(tensor.grad_fn)
    key = (known.layer, known.at, known.entry)
    return next((m for m in found.maps.values() for s in m.sites if (s.layer, s.at, s.entry) == key), None)
