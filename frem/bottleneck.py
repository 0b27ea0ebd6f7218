"""Finding "the bottleneck": the encoder's deepest output, where the decoder takes over.

Libraries that name their bottleneck resolve by name (``frem.known``): smp
models, timm ``features_only`` nets, MONAI ``UNet``, ``AttentionUnet``,
``DynUNet`` and ``UNETR``, nnU-Net's U-Nets and torchvision's segmentation
models, also inside another module. Any other model is measured: one forward
pass in eval mode (``frem.survey``) records every feature map, the module
calls around it and the autograd graph, and a rule (``frem.rule``) picks one map or
refuses, saying why and listing what it saw.

``frem.rule``'s docstring gives each step of the rule and why.
"""

from __future__ import annotations

from torch import nn

from frem.known import known_bottleneck, known_refusal
from frem.rule import BottleneckNotFound, _copies_of, choose
from frem.sites import Site, deepest_entry, format_entry, get_entry, replace_entry, tensor_entries
from frem.survey import FeatureMap, Survey, reach, survey
from frem.wrappers import unwrap

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

__all__ = ["BottleneckNotFound", "CONTAINERS", "CandidateTable", "FeatureMap", "Site", "Survey", "candidates",
           "choose", "deepest_entry", "find_bottleneck", "format_entry", "get_entry", "known_bottleneck",
           "locate_bottleneck", "replace_entry", "survey", "tensor_entries", "unwrap"]


def locate_bottleneck(model: nn.Module, example_input=None, *, with_survey: bool = False):
    """The bottleneck's site (layer, output or input, entry, channels): by name where a
    library names it, else measured on ``example_input``. ``with_survey``: (site, the survey or None)."""
    model = unwrap(model)
    reason = known_refusal(model)
    if reason is not None:
        raise BottleneckNotFound(f"{type(model).__name__} has no bottleneck for FREM: {reason}. To put FREM on a "
                                 "layer of it anyway, pass layer=<module name>")
    known = known_bottleneck(model, inner_encoder=True)
    if known is not None:
        site, inner = known
        if inner and example_input is not None:  # a library encoder inside: is it the whole encoder?
            found = survey(model, example_input)
            onward = _encoder_goes_on(found, site, type(model).__name__)
            if onward is not None:
                return (onward.site, found) if with_survey else onward.site
            return (site, found) if with_survey else site
        return (site, None) if with_survey else site
    if example_input is None:
        example = _example_name(model)
        raise ValueError(
            f"cannot tell where the bottleneck of {type(model).__name__} is without running it: "
            "pass example_input=<a batch> so frem can measure it, or name the layer"
            + (f" (for example layer={example!r})" if example else ""))
    found = survey(model, example_input)
    site = choose(found, type(model).__name__).site
    return (site, found) if with_survey else site


def _encoder_goes_on(found: Survey, site: Site, model_name: str) -> FeatureMap | None:
    """The measured bottleneck where the network's encoder goes on past a library encoder inside it (a
    TransUNet: a timm CNN's last feature, then a ViT at that resolution, folded back for the decoder): a map the
    measured rule picks, at that resolution or lower, made from the library encoder's last map by layers with
    weights outside it. None where the library encoder's last map is the encoder's end."""
    known = _known_map(found, site)
    try:
        measured = choose(found, model_name)
    except BottleneckNotFound:
        return None
    if known is None or measured is known or measured.site is None or measured.resolution > known.resolution:
        return None
    inside = site.layer + "."
    outside = not (measured.site.layer == site.layer or measured.site.layer.startswith(inside))
    made_from = measured.node in reach({known.node}, found.children)
    if outside and made_from and measured.node not in _copies_of(known, found):
        measured.note = (f"bottleneck: the encoder goes on past {site.describe()} (the library encoder's last "
                         "feature), through layers with weights at its resolution")
        return measured
    return None


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
    known = known_bottleneck(model, inner_encoder=True)
    onward = _encoder_goes_on(found, known[0], type(model).__name__) if known is not None and known[1] else None
    known = known[0] if known is not None else None
    if onward is not None:  # a library encoder inside, and the network's encoder goes on past it
        chosen, known, error = onward, None, None
    elif known is not None:
        chosen = _known_map(found, known)
        if chosen is not None:
            chosen.note = "bottleneck (known by name)"
    rows = [m for m in found.maps.values() if m.distance is not None and (m.site or m is chosen)]
    features = [m for m in rows if m.live and not m.pooled and not m.pyramid]
    lowest = min((m.resolution for m in features), default=0)
    keep = [m for m in rows if (m in features and m.resolution == lowest) or m is chosen]
    # Then finer maps by resolution, and last the gates and context, which are never picked.
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
