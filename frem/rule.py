"""The measured rule: which feature map of a survey is the bottleneck, or a refusal saying why.

``choose(survey)`` reads one recorded forward pass (``frem.survey``) and
walks the steps below, one function each; every map it passes over gets a
``note`` saying why (``frem.candidates`` prints them).

The rule rests on the structure of an encoder-decoder, not on channel counts
alone. It was decided from a corpus of networks (``tests/corpus.py``: MONAI,
nnU-Net, smp's architectures over every encoder family, timm ``features_only``
backbones of every family under hand-written decoders, torchvision, and
hand-written networks of the literature: attention gates, sub-pixel and
dense blocks, Swin-UNet's tokens, ResUNet++, CE-Net, SegNet, UNet 3+, UNeXt,
2-D and 3-D), each of which must end right or refuse:

1. *Feature maps* are tensors laid out (N, C, *spatial), (N, *spatial, C) or
   as tokens (N, L, C) on one of the model's grids, after a few prefix tokens
   too (``frem.survey`` reads the layout; FREM acts on the channels wherever
   they are), made from the input, that reach the output without passing a
   *gate* (a map that enters a multiply by broadcasting: squeeze-excitation,
   attention coefficients). Context is not a level of the encoder: maps that
   descend from a global or adaptive pool (SE squeezes, PSP/ASPP context, a
   fixed-kernel pool whose kernel covers its input: Cellpose's style vector),
   and *pyramid* branches, two or more fixed-kernel pools of one map each
   brought straight back up beside it (CE-Net's RMP), where a U-Net's level
   pools a map once and goes on. A map is a gate or context by what made it
   and where it goes, not by its size: a real bottleneck of 1x1 still counts.
2. *The lowest resolution* L among them is where the encoder ends (among the
   maps not made inside a module that upsamples: a decoder may go lower
   still, as DPT's reassembles the ViT's last map at 1/32). If it is the
   input's own resolution the model never downsamples (MONAI HighResNet):
   there is no bottleneck, and frem refuses.
3. Maps at L made by the decoder drop out. Upsampling is one sign: a module
   whose output is finer than its input (FPN laterals, LinkNet projections,
   the widening convolution of a sub-pixel block); a module that takes maps
   at several grids and hands back several, its coarsest among them, is a
   multi-resolution stage (DiNTS's search space, an HRNet stage), not a
   decoder. Merging a skip is the other: a module handed a map at L that
   brings a finer map made before it down to L (ResUNet++'s attention step
   pools the encoder's skip to the bridge's grid) is the decoder's first
   step, though it does not upsample yet; what it and the skip make at L
   is the decoder's. A residual block's strided shortcut is not one (its
   module is handed the finer map), nor an attention matrix that looks like
   a finer map (made inside, from maps at L).
4. *The main path*: of the remaining maps at L, those that every path from
   the input through L to the output passes (dominators of the graph). Side
   branches drop out (the gating convolution of an attention U-Net, a deep
   supervision head); if nothing dominates, the deepest maps are parallel
   (two encoders, UNETR's hidden states, DiNTS's cells, HRNet's streams) and
   frem refuses. A map at L from which the main path reaches other maps at L
   only through finer ones is a detour (spatial-reduction attention's keys,
   the first of two stacked networks).
5. *Block boundaries*: a main-path map made inside a module whose own output
   is a later main-path map is the inside of a block (the widened map of an
   inverted residual, a MedNeXt/ConvNeXt MLP, a dense layer): the block's
   output stands for it. Maps whose channels a pixel shuffle folds into space
   (a flat sub-pixel decoder) are not features either. A map no module hands
   over, made by a fixed-kernel pool from a map that one does and that
   nothing else reads (SegNet's functional pooling), is stood for by that
   map: scaling channels commutes with a max or average pool, its indices
   included.
6. The pick is the *last* remaining map: the end of the encoder's work at L,
   where the decoder takes over. A dense block ending in a concatenation is
   picked whole. Of its sites, a module's output comes first; on a module's
   input, a module through which the map reaches the output (not a gating
   convolution beside the decoder).
7. frem refuses rather than guess when the pick is narrower than an earlier
   remaining map (other than the map that entered L): a narrowing
   projection after the encoder may be the encoder's last layer or the
   decoder's first, unless one module call brought the map to L, narrowed it
   and handed it on without making the output or upsampling (Quicknat's
   dense block and its 1x1: the block's own), or one module call was handed
   the wider map, took it into three or more parallel branches with weights
   and handed back the pick (a context block: PraNet's and HarDNet-MSEG's
   receptive-field blocks, an ASPP without its pool, before a partial
   decoder): then the wider map, where the encoder ended, is the pick; when maps as wide as the pick,
   made from it by layers with weights, feed the decoder on paths of their
   own (a ViT's later hidden states; a plain copy, as SegResNetDS2 hands its
   second decoder, is the pick itself); when no layer with weights works at
   a higher resolution after the pick (a head at L with no decoder: PSPNet,
   DeepLab, FCN, whose encoder end no structure shows); and when the pick is
   handed over by no module and taken in by several (a pre-hook on one would
   leave the others the unscaled map; modules nested in one another are one
   consumer, the outermost: TernausNet's ``center``, ``center.0``, ...).

A refusal is a ``BottleneckNotFound`` naming the candidates; ``frem.candidates``
prints the whole table, and ``layer=`` settles it.
"""

from __future__ import annotations

from frem.survey import FeatureMap, Survey, pooled_from, reach

__all__ = ["BottleneckNotFound", "choose"]


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
    pick = _refuse_if_unsure(pick, boundaries, chain, deep, lowest, found, model_name)  # 7
    pick.note = (f"bottleneck: the last map at the lowest resolution "
                 f"{'x'.join(map(str, pick.grid))} on the main path, where the decoder takes over")
    if pick.resolution > lowest:  # the input of a pool no module hands over (step 5)
        pick.note = ("bottleneck: it stands for the pooled map below it, the last at the lowest resolution "
                     "(scaling channels commutes with the pool)")
    return pick


def _feature_maps(found: Survey, model_name: str) -> list:
    maps = [m for m in found.maps.values() if m.distance is not None]
    for m in maps:
        m.note = ("global context (from a global or adaptive pool)" if m.pooled else
                  "pyramid context (pooled with a fixed kernel beside others, brought back up)" if m.pyramid else
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
    joined = _skips_joined(lowest, found)
    deep = []
    for m in (m for m in features if m.resolution == lowest):
        decoder = next((c for c in decoders if c.made_inside(m.order)), None)
        if decoder is not None:
            m.note = f"decoder (made inside {decoder.name}, which upsamples)"
        elif m.node in joined:
            m.note = f"decoder: {joined[m.node]}"
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


def _skips_joined(lowest: int, found: Survey) -> dict:
    """Maps at the lowest resolution made where a module that was handed a map at that resolution
    brings a finer map down to it (ResUNet++'s attention step pools the encoder's skip to the bridge's
    grid and merges the two): such a module is the decoder's, though it does not upsample yet. The finer
    map must have been made before the module was called (a skip): a residual block's shortcut is not one
    (its module is handed the finer map, not one at the lowest resolution), nor is an attention matrix
    that happens to look like a finer map (made inside, from maps at the lowest resolution)."""
    finer = {m.node for m in found.maps.values() if m.resolution > lowest}
    at_lowest = [m for m in found.maps.values() if m.resolution == lowest]
    lowest_nodes = {m.node for m in at_lowest}
    joined = {}
    for call in found.calls:
        if lowest not in call.input_resolutions or call.multi_resolution:
            continue
        entries = [m for m in at_lowest if call.made_inside(m.order) and _skip_from_before(m, call, finer, found)]
        if not entries:
            continue
        reason = f"{call.name} brings a finer map down to this resolution and merges it with the one it was handed"
        inside = {m.node for m in at_lowest if call.made_inside(m.order)}
        for node in inside | (reach({m.node for m in entries}, found.children) & lowest_nodes):
            joined.setdefault(node, reason)
    return joined


def _skip_from_before(m: FeatureMap, call, finer: set, found: Survey) -> bool:
    """``m`` is made from finer maps only, back to one made before ``call`` started."""
    seen, queue = set(), list(_feeders(m.node, found) & finer)
    while queue:
        node = queue.pop()
        if node in seen:
            continue
        seen.add(node)
        if found.maps[node].order <= call.start:
            return True
        queue.extend(_feeders(node, found) & finer)
    return False


def _feeders(node, found: Survey) -> set:
    """The maps a node is made from directly, looking through ops that make no map (views, reshapes)."""
    maps, seen, queue = set(), {node}, list(found.parents.get(node, ()))
    while queue:
        parent = queue.pop()
        if parent in seen:
            continue
        seen.add(parent)
        if parent in found.maps:
            maps.add(parent)
        else:
            queue.extend(found.parents.get(parent, ()))
    return maps


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
            source = _pooled_from(m, found)
            if source is not None:
                m.note = f"pooled by code no module hands over: FREM acts on {source.site.describe()}, the same"
                boundaries.append(source)
            else:
                m.note = "no module hands it over"
        else:
            boundaries.append(m)
    if not boundaries:
        raise BottleneckNotFound(f"frem found no module boundary on the main path of {model_name} at its lowest "
                                 f"resolution. {_advice()}")
    return boundaries


def _pooled_from(m: FeatureMap, found: Survey) -> FeatureMap | None:
    """The map a fixed-kernel pool made ``m`` from, if a module hands it over and the pool is its only
    reader: a channel scaled there is the channel scaled in ``m`` (a max or average pool works per channel
    and commutes with a positive scale; the indices SegNet keeps for unpooling are the same too)."""
    source = pooled_from(found, m)
    if source is None or source.site is None or found.children.get(source.node, []) != [m.node]:
        return None
    return source


def _refuse_if_unsure(pick, boundaries, chain, deep, lowest: int, found: Survey, model_name: str) -> FeatureMap:
    # Maps as wide as the pick, made from it and feeding the decoder on paths of their own: the
    # encoder may go on past the pick (a transformer's later hidden states, a dilated last stage
    # beside a same-resolution skip). A narrow side head (deep supervision) is no such map.
    # A copy of the pick (a clone, an activation: no weights between) is the pick itself for FREM.
    after = reach({pick.node}, found.children)
    copies = _copies_of(pick, found)
    branches = [m for m in deep if m not in chain and m.node in after and m.node not in copies
                and m.channels >= pick.channels and _decoder_follows(m, lowest, found)]
    if branches:
        for m in branches:
            m.note = "parallel branch after the last main-path map, as wide: feeds the decoder"
        raise BottleneckNotFound(
            f"frem cannot tell which feature map is the bottleneck of {model_name}: after "
            f"{_describe([pick])}, {sum(m.site is not None for m in branches)} more maps at the lowest "
            "resolution, as wide or wider, are made from it and feed the decoder on paths of their own, so "
            f"the encoder may go on past it ({_describe(branches)}). {_advice()}", [pick, *branches])
    _refuse_if_handed_to_several(pick, found, model_name)
    entry = chain[0]
    for m in boundaries[:-1]:
        m.note = "entry into the lowest resolution" if m is entry else "upstream of the pick"
    # A narrowing projection after the encoder: its last layer, or the decoder's first? Unless one
    # module call brought the map to L, widened and narrowed it and handed it on without making the
    # output or upsampling itself: then the narrowing is that block's own (Quicknat's dense block and its
    # 1x1, inside the call that pools, works and unpools).
    wider = [m for m in boundaries[:-1] if m is not entry and m.channels > pick.channels]
    if wider and _one_block(found, [entry, pick, *wider]) is not None:
        wider = []
    context = _context_block(found, pick, wider[-1]) if wider else None
    if context is not None:  # a multi-branch context block narrows the encoder's last map for the decoder
        for m in wider[:-1]:
            m.note = "upstream of the pick"
        pick.note = (f"made by {context.name}, a context block of parallel branches over the encoder's last map, "
                     "narrowed for the decoder")
        wider[-1].note = ""
        pick = wider[-1]
        wider = []
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
        # a side head at L (torchvision's aux classifier on layer3) leaves the backbone's last map off the main
        # path: it is listed too
        beside = [m for m in deep if m not in chain and m.node in after and m.site is not None]
        raise BottleneckNotFound(
            f"frem cannot tell where the encoder of {model_name} ends: after its lowest resolution nothing "
            "with weights works at a higher resolution (a head at the lowest resolution, as in PSPNet, "
            f"DeepLab or FCN), so the encoder's last map and the head's first look alike "
            f"({_describe(boundaries + beside)}). {_advice()}", boundaries + beside)
    return pick


CONTEXT_BRANCHES = 3  # parallel weighted branches over one map that make a context block (RFB, ASPP, Inception)


def _context_block(found: Survey, pick: FeatureMap, wide: FeatureMap):
    """The module call that was handed ``wide`` and hands back the narrower ``pick``, taking ``wide`` into at
    least ``CONTEXT_BRANCHES`` parallel layers with weights inside it (PraNet's and HarDNet-MSEG's receptive-field
    blocks, an ASPP without its pool): context over the encoder's last map, narrowed for a (partial) decoder,
    not the encoder's own last layer. A lone projection, a residual block's two paths, a pyramid of pools
    are not one. None where there is no such call."""
    takers = {s.layer for s in wide.sites if s.at == "input"}
    for call in found.calls:
        if call.name not in takers or pick.node not in call.output_nodes or call.upsamples:
            continue
        branches = [child for child in found.children.get(wide.node, ())
                    if child in found.maps and call.made_inside(found.maps[child].order)
                    and _param_node(child, found.input_nodes)]
        if len(branches) >= CONTEXT_BRANCHES:
            return call
    return None


def _refuse_if_handed_to_several(pick: FeatureMap, found: Survey, model_name: str) -> None:
    """A map no module hands over, only taken in by modules: FREM acts through one module's pre-hook,
    so it must be the only one that carries the map on (a gating convolution beside it does not)."""
    if pick.site is None or pick.site.at != "input":
        return
    takers = sorted({s.layer for s in pick.sites if s.at == "input" and s.layer not in found.dead_ends})
    # A module inside another that takes the map in is covered by a pre-hook on the outer one (TernausNet's
    # center, center.0, center.0.0 are one consumer).
    takers = [t for t in takers if not any(t.startswith(outer + ".") for outer in takers if outer != t)]
    if len(takers) > 1:
        pick.note = "taken in by several modules, handed over by none"
        raise BottleneckNotFound(
            f"frem cannot act on the bottleneck of {model_name} from one place: {_describe([pick])} is made by "
            f"code no module hands over and taken in by {len(takers)} modules ({', '.join(takers)}); FREM on "
            "one module's input would leave the others the map unscaled. Make the map a module's output "
            "(an nn.Identity() the forward passes it through) and pass layer=<that module>, or pass "
            "layer=<one of them> and at='input' if that one alone should see it", [pick])


def _one_block(found: Survey, maps) -> object:
    """A module call that made all ``maps``, not the output, and does not upsample, or None."""
    output_order = max((m.order for m in found.maps.values() if m.node in found.output_nodes), default=None)
    return next((c for c in found.calls if all(c.made_inside(m.order) for m in maps) and not c.upsamples
                 and (output_order is None or not c.made_inside(output_order))), None)


def _copies_of(pick: FeatureMap, found: Survey) -> set:
    """The nodes made from ``pick`` alone by ops without weights (a clone, an activation, a view); not a
    sum with anything else (a residual stream carries the pick on, and adds to it)."""
    seen, queue = set(), [pick.node]
    while queue:
        for child in found.children.get(queue.pop(), ()):
            if (child not in seen and not _param_node(child, found.input_nodes)
                    and len(found.parents.get(child, ())) == 1):
                seen.add(child)
                queue.append(child)
    return seen


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
