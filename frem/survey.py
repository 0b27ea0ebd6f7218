"""One recorded forward pass: every feature map, where a module hands it over, and the graph.

``survey(model, example_input)`` runs the model once in eval mode and records

* every tensor a torch function makes (a ``TorchFunctionMode``), with the
  autograd node that made it, its shape and when (one clock for ops and
  module calls): so maps made by functional code (``torch.cat``,
  ``F.interpolate``, a pixel shuffle) are seen too, not only module outputs;
* every module call: when it started and ended, the maps it took and gave,
  so "made inside this module" and "this module upsamples" can be asked;
* where each map keeps its channels (``_Layouts``): (N, C, *spatial) on a
  grid that spatial ops made; channels-last (N, *spatial, C) and tokens
  (N, L, C, L the size of a grid) on a grid that is the input's reduced by
  a power of two on every axis (Swin's patch merging makes its grids with
  slices, not with a spatial op), with the input's batch; tokens may follow
  a few prefix tokens (N, k + L, C): a class token, registers;
* the autograd graph from the input to the output, with *gate edges* cut:
  a map that enters a multiply by broadcasting (a squeeze-excitation or an
  attention coefficient) modulates the other operand, it does not carry
  features to the output.

Maps are also marked *pooled* when they descend from a global or adaptive
pool (SE squeezes, PSP and ASPP context branches, a fixed-kernel pool whose
kernel covers its whole input: Cellpose's style vector): context, not a level of
the encoder's resolution hierarchy; *pyramid* when they lie on one of two or
more branches that pool the same map with fixed kernels and bring it straight
back up to that map's grid (CE-Net's residual multi-kernel pooling): context
too, beside the map, where a U-Net's level pools a map once and goes on; and
*sub-pixel* when their channels are about to be folded into space by a pixel
shuffle (a sub-pixel decoder).

Nothing here decides anything; ``frem.rule`` reads the survey.
"""

from __future__ import annotations

import math
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from frem.sites import Site, tensor_entries

ADAPTIVE_POOLS = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
                  "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool1d_with_indices",
                  "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
                  "_adaptive_max_pool1d", "_adaptive_max_pool2d", "_adaptive_max_pool3d"}
REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm", "nanmean",
              "nansum", "std_mean", "var_mean", "aminmax"}
GATE_OPS = {"mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__",
            "true_divide", "addcmul", "addcmul_"}
SHUFFLE_OPS = {"pixel_shuffle"}
MAX_PREFIX_TOKENS = 8  # a class token, a distillation token, registers: tokens before a grid's own
# Pools with a fixed kernel (not adaptive): where a pyramid-pooling branch starts (CE-Net's RMP pools one
# map with kernels 2, 3, 5, 6 and brings each back up to it).
FIXED_POOLS = {"max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
               "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "lp_pool1d", "lp_pool2d",
               "lp_pool3d"}
# Ops whose outputs are laid out (N, C, *spatial) for sure: the spatial shapes they make are the
# model's resolutions. A tensor of the input's rank with other trailing dims is not a feature map
# but a transformer's tokens, a channels-last view or an attention matrix.
SPATIAL_OPS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
               "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
               "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "interpolate", "upsample",
               "upsample_nearest", "upsample_bilinear", "pixel_shuffle", "pixel_unshuffle", "lp_pool1d",
               "lp_pool2d", "lp_pool3d", "fractional_max_pool2d", "fractional_max_pool3d"} | ADAPTIVE_POOLS
RESHAPE_OPS = {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "contiguous", "movedim",
               "moveaxis", "swapaxes", "swapdims", "unsqueeze", "squeeze", "view_as", "reshape_as"}
# Same-shape ops between a pre-shuffle convolution and the shuffle (its output is sub-pixel too).
ELEMENTWISE_OPS = {"relu", "relu_", "relu6", "gelu", "silu", "silu_", "leaky_relu", "leaky_relu_", "elu", "elu_",
                   "selu", "celu", "mish", "hardswish", "hardtanh", "hardtanh_", "sigmoid", "tanh", "prelu",
                   "batch_norm", "instance_norm", "group_norm", "layer_norm", "dropout", "dropout1d",
                   "dropout2d", "dropout3d", "clone", "contiguous", "__add__", "add", "add_"}


@dataclass
class FeatureMap:
    """A feature map made during the survey: (N, C, *spatial), or with its channels last."""
    node: object                 # the autograd node that made it (its grad_fn at that moment)
    tensor: torch.Tensor = field(repr=False)
    order: int                   # when it was made, on the survey's clock
    op: str = ""                 # the torch function that made it ("" if only seen at a module boundary)
    sites: list = field(default_factory=list)
    pooled: bool = False         # from a global/adaptive pool: context, not a resolution level
    sub_pixel: bool = False      # its channels become space in a pixel shuffle
    pyramid: bool = False        # on a pyramid-pooling branch: pooled from a map and brought back up beside it
    distance: int | None = None  # shortest autograd path to the output; None: it does not reach it
    live: bool = False           # reaches the output without passing a gate, and comes from the input
    note: str = ""               # what the bottleneck rule made of it (frem.candidates shows it)
    dim: int = 1                 # where its channels are: 1, or -1 (channels last, tokens)
    grid: tuple = ()             # its spatial shape (a token sequence's grid)
    ambiguous: bool = False      # its shape reads as channels first and as channels last alike

    @property
    def site(self) -> Site | None:
        """Where attach would hook it: an output over an input, the outermost module first."""
        return self.sites[0] if self.sites else None

    @property
    def also(self) -> list:
        return self.sites[1:]

    @property
    def shape(self) -> tuple:
        return tuple(self.tensor.shape)

    @property
    def channels(self) -> int:
        return self.tensor.shape[self.dim]

    @property
    def resolution(self) -> int:
        return math.prod(self.grid)

    @property
    def layout(self) -> str:
        """``NCHW``, ``NHWC``, ``NLC`` and the like (``D`` for a third spatial axis)."""
        axes = "DHW"[3 - len(self.grid):] if len(self.grid) <= 3 else "S" * len(self.grid)
        if self.tensor.dim() == len(self.grid) + 1:
            return "NLC" if self.dim == -1 else "NCL"
        return f"NC{axes}" if self.dim == 1 else f"N{axes}C"


@dataclass
class ModuleCall:
    name: str
    start: int
    end: int = -1
    input_resolutions: tuple = ()         # the resolutions of its input maps
    output_nodes: list = field(default_factory=list)
    output_resolutions: tuple = ()        # the resolutions of its output maps
    inputs: list = field(default_factory=list, repr=False)   # its tensors, read once the layouts are known
    outputs: list = field(default_factory=list, repr=False)

    @property
    def multi_resolution(self) -> bool:
        """It takes several grids and hands back several, its coarsest among them: a stage that works at
        every resolution at once (DiNTS's search space, an HRNet stage), not a decoder leaving the bottom."""
        ins, outs = set(self.input_resolutions), set(self.output_resolutions)
        return len(ins) > 1 and len(outs) > 1 and min(outs) == min(ins)

    @property
    def upsamples(self) -> bool:
        """Its output is finer than its input: a decoder block (one taking a skip too, finer than its
        main input, hands back the skip's grid). A multi-resolution stage upsamples only if its finest
        output is finer than its finest input."""
        ins, outs = set(self.input_resolutions), set(self.output_resolutions)
        if not ins or not outs:
            return False
        return max(outs) > (max(ins) if self.multi_resolution else min(ins))

    def made_inside(self, order: int) -> bool:
        return self.start < order <= self.end


class Survey(list):
    """The feature maps FREM could act on (those with a site), plus what the rule needs to read."""

    def __init__(self):
        super().__init__()
        self.maps: dict = {}          # node -> FeatureMap, every map of the input's rank
        self.calls: list[ModuleCall] = []
        self.parents: dict = {}       # node -> parent nodes, gate edges cut
        self.children: dict = {}
        self.input_nodes: set = set()
        self.output_nodes: set = set()
        self.rank = 0
        self.input_resolution = 0
        self.module_outputs: dict = {}  # module name -> its output, as returned
        self.made_by: dict = {}       # node -> (the torch function's name, [(input node, input shape)])
        self.dead_ends: set = set()   # modules whose outputs all stop at a gate: nothing they make is live
        self.aliased: set = set()     # (layer, at, entry) of a tensor that one call also holds at another entry
        self.input_tensors: list = []


def _spatial(t: torch.Tensor) -> int:
    return math.prod(t.shape[2:])


class _Layouts:
    """Where a tensor keeps its channels and on which grid it lies, or None: not a feature map.

    (N, C, *spatial) needs a grid that a spatial op made (or the input's): a tensor of the input's rank
    with other trailing dims is a transformer's tokens, a channels-last view or an attention matrix.
    Channels last (N, *spatial, C) and tokens (N, L, C) need the input's batch and a grid that is the
    input's divided by one power of two on every axis (or one a spatial op made): patch embeddings and
    patch merging make such grids (the latter with slices, which no spatial op sees); an attention
    matrix or a window partition (its batch multiplied by the windows) does not.
    """

    def __init__(self, rank: int, batch: int | None, grids: set, input_grid: tuple):
        self.rank, self.batch, self.grids, self.input_grid = rank, batch, grids, input_grid
        self.reduced = []  # the input's grid halved k times, exactly, on every axis
        for k in range(1, 16):
            g = tuple(i // 2 ** k for i in input_grid)
            # not 1x1: (N, 1, C) is a class token and (N, 1, 1, C) a global pool, not a level of the encoder
            if input_grid and all(x >= 1 and x * 2 ** k == i for x, i in zip(g, input_grid)) and math.prod(g) > 1:
                self.reduced.append(g)

    def _known(self, g: tuple) -> bool:
        return g in self.grids or g in self.reduced

    def of(self, t: torch.Tensor):
        if not t.is_floating_point():
            return None
        if t.dim() == self.rank:
            # (N, C, *spatial) with the input's batch: an attention tensor of folded patches or windows ((N * P,
            # heads, L, L): MobileViT, Swin) may end in a grid's sides, but its batch is not the input's
            if tuple(t.shape[2:]) in self.grids and (self.batch is None or t.shape[0] == self.batch):
                return 1, tuple(t.shape[2:])
            if t.dim() >= 3 and t.shape[0] == self.batch and self._known(tuple(t.shape[1:-1])):
                return -1, tuple(t.shape[1:-1])
        elif t.dim() == self.rank - 1 >= 3 and t.shape[0] == self.batch:
            # (N, L, C) tokens or a flattened (N, C, L) map: the reading whose L is a grid a spatial op
            # made wins over one that is only a reduced input grid; equally good readings (an attention
            # matrix (N, L, L), say) are neither.
            readings = [(rank, dim, g) for dim, length in ((-1, t.shape[1]), (1, t.shape[2]))
                        for rank, g in self._grids_of(length)]
            if not any(dim == -1 for _, dim, _ in readings):
                # (N, k + L, C): tokens on a grid after a few prefix tokens (a class token, registers), where
                # no other reading fits or the other is the coincidence of the same grid: a ViT stage's MLP
                # (N, 65, 64) on 8x8 is 64 tokens and a class token, not 65 channels on 8x8. A few: k <= L/4,
                # or a channel-attention matrix (N, 8, 8) would be 4 prefix tokens on 2x2 (Restormer).
                prefixed = [(rank, -1, g) for k in range(1, MAX_PREFIX_TOKENS + 1) if 4 * k <= t.shape[1] - k
                            for rank, g in self._grids_of(t.shape[1] - k)]
                if prefixed and all(g == prefixed[0][2] for _, _, g in readings):
                    readings = prefixed[:1]
            if readings:
                best = min(r[0] for r in readings)
                chosen = {(dim, g) for rank, dim, g in readings if rank == best}
                if len(chosen) == 1:
                    return chosen.pop()
        return None

    def grid_of(self, t: torch.Tensor):
        """The grid ``t`` lies on where its readings disagree only on where its channels are ((N, 16, 16) on a
        4x4 grid: tokens or a flattened map, either way 4x4): enough for a module's resolutions, not for FREM."""
        layout = self.of(t)
        if layout is not None:
            return layout[1]
        if t.is_floating_point() and t.dim() == self.rank - 1 >= 3 and t.shape[0] == self.batch:
            grids = {g for length in (t.shape[1], t.shape[2]) for _, g in self._grids_of(length)}
            if len(grids) == 1 and t.shape[1] == t.shape[2]:
                return grids.pop()
        return None

    def ambiguous(self, t: torch.Tensor) -> bool:
        """Both (N, C, *spatial) and (N, *spatial, C) read ``t`` as a map on a known grid (its channels and
        its grid's sides are alike: (2, 8, 8, 8)): its shape cannot tell where its channels are."""
        return (t.dim() == self.rank >= 3 and tuple(t.shape[2:]) in self.grids and t.shape[0] == self.batch
                and self._known(tuple(t.shape[1:-1])))

    def _grids_of(self, length: int):
        """(0, grid) for a grid of that size a spatial op made, (1, grid) for a reduced input grid."""
        for rank, grids in ((0, sorted(self.grids)), (1, self.reduced)):
            for g in grids:
                if len(g) == self.rank - 2 and math.prod(g) == length:
                    yield rank, g
                    break


class _Recorder(TorchFunctionMode):
    def __init__(self, survey: Survey, clock: list):
        super().__init__()
        self.survey, self.clock = survey, clock
        self.pooled: dict = {}     # node -> pooled, for tensors of any rank
        self.origin: dict = {}     # node -> the map a chain of reshapes started from
        self.made_by: dict = {}    # node -> (op name, [(input node, shape)])
        self.spatial_shapes: set = set()  # trailing dims that spatial ops made: the model's resolutions
        self.gate_edges: set = set()
        self.shuffled: set = set()  # nodes of maps a pixel shuffle consumed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":
            return func(*args, **kwargs)
        inputs = [(t, t.grad_fn) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outputs:
            self._record(name, inputs, outputs, args, kwargs)
        return out

    def _record(self, name, inputs, outputs, args, kwargs):
        self.clock[0] += 1
        rank = self.survey.rank
        lineage = [(t, node) for t, node in inputs
                   if node is not None or any(t is i for i in self.survey.input_tensors)]
        for t in outputs:
            if name in SPATIAL_OPS and t.dim() == rank:
                self.spatial_shapes.add(tuple(t.shape[2:]))
            node = t.grad_fn
            if node is None:
                continue
            pooled = self._pooled(name, lineage, args, kwargs) or _global_pool(name, lineage, t, rank, args, kwargs)
            self.pooled[node] = pooled
            self.made_by[node] = (name, [(n, tuple(i.shape)) for i, n in lineage])
            if t.dim() in (rank, rank - 1) and t.is_floating_point():  # maps, and maybe tokens: decided at the end
                fmap = self.survey.maps.get(node)
                if fmap is None:
                    self.survey.maps[node] = FeatureMap(node, t, self.clock[0], name, pooled=pooled)
            if name in GATE_OPS:
                for i, inode in lineage:
                    if inode is not None and _broadcast_into(i, t):
                        self.gate_edges.add((node, inode))
            self._shuffle(name, lineage, t, node)

    def _pooled(self, name, lineage, args, kwargs) -> bool:
        rank = self.survey.rank
        maps = [t for t, _ in lineage if t.dim() == rank]
        if name in ADAPTIVE_POOLS and any(_spatial(t) > 1 for t in maps):
            return True
        if name in REDUCTIONS and maps and _reduces_space(maps[0], args, kwargs):
            return True
        tokens = [t for t, _ in lineage if t.dim() == rank - 1 >= 3]
        if name in REDUCTIONS and tokens and _reduces_dims(tokens[0], args, kwargs, {1}):
            return True  # a transformer's global average over its tokens
        flags = [self.pooled.get(node, False) for _, node in lineage if node is not None]
        spread = [t for t, node in lineage if t.dim() == rank and _spatial(t) > 1
                  and not self.pooled.get(node, False)]
        return any(flags) and not spread

    def _shuffle(self, name, lineage, out, node):
        rank = self.survey.rank
        if name in RESHAPE_OPS and lineage:
            source, snode = lineage[0]
            self.origin[node] = self.origin.get(snode, snode if source.dim() == rank else None)
            start = self.origin[node]
        elif name in SHUFFLE_OPS and lineage:
            start = lineage[0][1]
        else:
            return
        fmap = self.survey.maps.get(start)
        if fmap is not None and out.dim() == rank == fmap.tensor.dim() and _is_shuffle(fmap.tensor, out):
            self.shuffled.add(start)


def _global_pool(name: str, lineage, out: torch.Tensor, rank: int, args, kwargs) -> bool:
    """A fixed-kernel pool whose kernel is its whole input (``F.avg_pool2d(x, x.shape[2:])``, as Cellpose's
    CPnet makes its style vector): global context, as an adaptive pool's, not a level of the encoder. Not a
    U-Net's 2x2 pool of a 2x2 map (a small example input's last level): the input must be wider than 2."""
    maps = [t for t, _ in lineage if t.dim() == rank]
    if name not in FIXED_POOLS or out.dim() != rank or math.prod(out.shape[2:]) != 1 or not maps:
        return False
    grid = tuple(maps[0].shape[2:])
    kernel = kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
    kernel = tuple(kernel) if isinstance(kernel, (tuple, list, torch.Size)) else (kernel,) * len(grid)
    return kernel == grid and max(grid) > 2


def _broadcast_into(operand: torch.Tensor, result: torch.Tensor) -> bool:
    """Whether ``operand`` is spread over ``result`` (fewer elements, or an expanded view)."""
    if operand.dim() == 0:
        return False
    expanded = any(stride == 0 and size > 1 for stride, size in zip(operand.stride(), operand.shape))
    return operand.numel() < result.numel() or expanded


def _reduces_space(t: torch.Tensor, args, kwargs) -> bool:
    """A reduction over every spatial dim of an (N, C, *spatial) map (or over everything)."""
    return _reduces_dims(t, args, kwargs, set(range(2, t.dim()))) and _spatial(t) > 1


def _reduces_dims(t: torch.Tensor, args, kwargs, wanted: set) -> bool:
    """A reduction (``dim=`` or the second argument) over at least ``wanted`` (or over everything)."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
    if dim is None:
        return True
    dims = {d % t.dim() for d in (dim if isinstance(dim, (list, tuple)) else (dim,)) if isinstance(d, int)}
    return wanted <= dims


def _is_shuffle(source: torch.Tensor, out: torch.Tensor) -> bool:
    """``out`` folds channels of ``source`` into space: every spatial dim grows by one factor r > 1."""
    if out.shape[0] != source.shape[0] or out.shape[1] >= source.shape[1]:
        return False
    factors = {o / s for o, s in zip(out.shape[2:], source.shape[2:])}
    if len(factors) != 1:
        return False
    r = factors.pop()
    return r > 1 and r == int(r) and out.shape[1] * int(r) ** (out.dim() - 2) == source.shape[1]


def call_arguments(example_input) -> tuple[tuple, dict]:
    """``example_input`` as the model is called with it: a dict is keyword arguments, a tuple or list
    positional ones, anything else the one argument. It must hold a tensor somewhere."""
    if not any(isinstance(leaf, torch.Tensor) for leaf in tree_flatten(example_input)[0]):
        kind = type(example_input).__name__
        hint = " (torch.from_numpy(array) makes it one)" if kind == "ndarray" else ""
        raise TypeError(f"example_input must be one batch as the model's forward takes it: a tensor{hint}, or a "
                        f"tuple (positional arguments) or dict (keyword arguments) holding tensors; got {kind}")
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    return (example_input,), {}


ARGUMENT_ERRORS = ("unexpected keyword argument", "required positional argument", "positional arguments but")


@contextmanager
def calling(example_input):
    """Around a call of the model on ``example_input``: a dict given to a forward that takes one dict
    positionally fails with the model's own "unexpected keyword argument"; say how to pass it."""
    try:
        yield
    except TypeError as error:
        if isinstance(example_input, dict) and any(text in str(error) for text in ARGUMENT_ERRORS):
            raise TypeError(f"{error}: example_input is a dict, which frem passes as keyword arguments "
                            "(forward(**example_input)); if forward takes the dict itself as its one argument, "
                            "pass example_input=(batch,): a tuple holds positional arguments") from None
        raise


def survey(model: nn.Module, example_input) -> Survey:
    """Every feature map of one forward pass in eval mode (see the module docstring).

    Leaves every submodule's train/eval flag as it found it and changes no
    running statistics.
    """
    from frem.wrappers import unwrap
    model = unwrap(model)
    result = Survey()
    clock = [0]
    args, kwargs = call_arguments(example_input)
    args, kwargs = tree_map(lambda t: t.detach().requires_grad_(t.is_floating_point())
                            if isinstance(t, torch.Tensor) else t, (args, kwargs))
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    result.rank = next((t.dim() for t in tensors), 4)
    images = [t for t in tensors if t.dim() == result.rank]
    result.input_resolution = max((_spatial(t) for t in images), default=0)
    result.input_tensors = tensors
    recorder = _Recorder(result, clock)
    events = []  # (name, at, path, tensor, node)
    calls_by_name: dict[str, int] = {}
    open_calls: dict[int, list[ModuleCall]] = {}

    def before(name):
        def hook(module, args, kwargs):
            # keyword arguments too (transformers calls most modules so): what the module takes, for its
            # resolutions; its sites stay positional (FREM's pre-hook replaces a positional argument)
            clock[0] += 1
            call = ModuleCall(name, clock[0], inputs=[t for _, t in tensor_entries((args, kwargs))])
            open_calls.setdefault(id(module), []).append(call)
            events.extend((name, "input", path, t, t.grad_fn) for path, t in tensor_entries(args))
        return hook

    def after(name):
        def hook(module, _args, output):
            clock[0] += 1
            calls_by_name[name] = calls_by_name.get(name, 0) + 1
            call = open_calls[id(module)].pop()
            call.end = clock[0]
            entries = list(tensor_entries(output))
            call.output_nodes = [t.grad_fn for _, t in entries if t.grad_fn is not None]
            call.outputs = [t for _, t in entries]
            result.calls.append(call)
            result.module_outputs[name] = tree_map(lambda v: v, output)  # its containers as they were: a
            # model may reorder or empty a returned list afterwards (SegResNetDS pops its encoder's list)
            events.extend((name, "output", path, t, t.grad_fn) for path, t in entries)
        return hook

    handles = []
    for name, module in model.named_modules():
        if name:
            handles += [module.register_forward_pre_hook(before(name), with_kwargs=True),
                        module.register_forward_hook(after(name))]
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.enable_grad(), recorder, calling(example_input):
            value = model(*args, **kwargs)
        result.module_outputs[""] = value
        outputs = [t for _, t in tensor_entries(value)]
    finally:
        for module, flag in flags.items():
            module.training = flag
        for handle in handles:
            handle.remove()

    grids = recorder.spatial_shapes | {tuple(t.shape[2:]) for t in images}
    layouts = _Layouts(result.rank, images[0].shape[0] if images else None, grids,
                       tuple(images[0].shape[2:]) if images else ())
    for node, fmap in sorted(result.maps.items(), key=lambda item: item[1].order):
        layout = _token_wise(fmap, recorder.made_by, result.maps) or layouts.of(fmap.tensor)
        if layout is None:
            del result.maps[node]  # attention matrices, window partitions, vectors: not feature maps
        else:
            fmap.dim, fmap.grid = layout
            fmap.ambiguous = layouts.ambiguous(fmap.tensor)
    def layout_of(t):  # a map's resolved layout (a token-wise op's output inherits its input's), else read
        fmap = result.maps.get(t.grad_fn) if t.grad_fn is not None else None
        return (fmap.dim, fmap.grid) if fmap is not None and fmap.tensor is t else layouts.of(t)

    def grid_of(t):
        layout = layout_of(t)
        return layout[1] if layout is not None else layouts.grid_of(t)

    for call in result.calls:
        ins = [math.prod(grid) for grid in map(grid_of, call.inputs) if grid is not None]
        outs = [math.prod(grid) for grid in map(grid_of, call.outputs) if grid is not None]
        call.input_resolutions, call.output_resolutions = tuple(ins), tuple(outs)
        call.inputs = call.outputs = ()  # read: let the tensors go with the survey's other references
    for node in recorder.shuffled:
        _mark_sub_pixel(result, recorder, node)
    _add_sites(result, events, calls_by_name, layouts, layout_of)
    _build_graph(result, outputs, tensors, recorder.gate_edges)
    _prefer_live_consumers(result)
    result.made_by = recorder.made_by
    _mark_pyramids(result)
    result.extend(sorted((m for m in result.maps.values() if m.sites and m.distance is not None),
                         key=lambda m: m.order))
    return result


# Act on the last dim alone, or on every element: the output keeps the token axis of its input tokens.
TOKEN_WISE = {"linear", "gelu", "relu", "silu", "mish", "sigmoid", "tanh", "dropout", "layer_norm", "hardswish",
              "__add__", "add", "__mul__", "mul", "clone", "contiguous"}


def _token_wise(fmap: FeatureMap, made_by: dict, maps: dict):
    """The layout a linear layer's output inherits from its input tokens (its positions are theirs): a ViT's MLP
    widens (N, 1 + L, C) to (N, 1 + L, 4C), which read alone could pass for 1 + L channels on a grid of 4C
    positions, finer than the tokens' (and then, wrongly, for a skip brought down to their resolution)."""
    name, inputs = made_by.get(fmap.node, ("", []))
    if name not in TOKEN_WISE:
        return None
    for node, shape in inputs:
        source = maps.get(node)
        if (source is not None and source.dim == -1 and source.grid and len(shape) == fmap.tensor.dim()
                and tuple(shape[:-1]) == tuple(fmap.tensor.shape[:-1])):
            return -1, source.grid
    return None


def _mark_pyramids(result: Survey) -> None:
    """Mark the maps of pyramid-pooling branches: two or more branches from one map, each a fixed-kernel
    pool, ops on the pooled grid only, and a step straight back onto the map's own grid."""
    branches: dict = {}
    for fmap in result.maps.values():
        source = pooled_from(result, fmap)
        if source is not None and fmap.resolution < source.resolution:
            branch = _branch_back_up(result, fmap, source.grid)
            if branch:
                branches.setdefault(source.node, []).append(branch)
    for found in branches.values():
        if len(found) >= 2:
            for branch in found:
                for node in branch:
                    result.maps[node].pyramid = True


def _branch_back_up(result: Survey, pooled: FeatureMap, grid: tuple) -> set:
    """The maps from ``pooled`` on, on its own grid, if every path from it steps straight back to ``grid``
    (the return itself included), else an empty set."""
    seen, queue = {pooled.node}, deque([pooled.node])
    while queue:
        node = queue.popleft()
        if node in result.output_nodes:
            return set()
        for child in result.children.get(node, ()):
            fmap = result.maps.get(child)
            if fmap is None or fmap.grid not in (grid, pooled.grid):
                return set()
            if fmap.grid == grid:
                seen.add(child)
            elif child not in seen:
                seen.add(child)
                queue.append(child)
    return seen


def pooled_from(result: Survey, fmap: FeatureMap) -> FeatureMap | None:
    """The map a fixed-kernel pool made ``fmap`` from, or None."""
    name, inputs = result.made_by.get(fmap.node, ("", []))
    return result.maps.get(inputs[0][0]) if name in FIXED_POOLS and inputs else None


def _mark_sub_pixel(result: Survey, recorder: _Recorder, node) -> None:
    """The shuffled map and the same-shape maps before it, back to the op that made its width."""
    while node is not None:
        fmap = result.maps.get(node)
        if fmap is None:
            return
        fmap.sub_pixel = True
        name, inputs = recorder.made_by[node]  # recorded with the map itself
        same = [n for n, shape in inputs if shape == fmap.shape]
        node = same[0] if name in ELEMENTWISE_OPS and same else None


def _add_sites(result: Survey, events, calls_by_name, layouts: _Layouts, layout_of) -> None:
    # A tensor at two entries of one module's output (or input) is an alias: FREM on one entry leaves the
    # other unscaled, and a model may read the other (SegFormer returns its last hidden state as
    # 'last_hidden_state' and inside 'hidden_states', which its decode head reads). Such sites go last.
    entries: dict = {}
    for name, at, path, t, node in events:
        entries.setdefault((name, at, id(t)), set()).add(path)
    result.aliased = {(name, at, path) for (name, at, _), paths in entries.items() if len(paths) > 1
                      for path in paths}
    for name, at, path, t, node in events:
        # A module called more than once has no single place for a hook.
        layout = layout_of(t) if node is not None and calls_by_name.get(name, 1) == 1 else None
        if layout is None:
            continue
        fmap = result.maps.get(node)
        if fmap is None:  # made by code the recorder does not see (a custom autograd function)
            fmap = result.maps[node] = FeatureMap(node, t, min((c.end for c in result.calls
                                                                if c.name == name), default=0),
                                                  dim=layout[0], grid=layout[1], ambiguous=layouts.ambiguous(t))
        site = Site(name, at, path, int(t.shape[layout[0]]), layout[0])
        if site not in fmap.sites:
            fmap.sites.append(site)
    for fmap in result.maps.values():
        fmap.sites.sort(key=lambda site: ((site.layer, site.at, site.entry) in result.aliased, _preference(site)))


def _prefer_live_consumers(result: Survey) -> None:
    """Of a map's input sites, a module through which it reaches the output first: a pre-hook changes
    what that one module takes, so FREM on the input of a gating convolution would miss the decoder."""
    result.dead_ends = {c.name for c in result.calls if c.output_nodes
                        and all(n in result.maps and not result.maps[n].live for n in c.output_nodes)}
    for fmap in result.maps.values():
        fmap.sites.sort(key=lambda site: ((site.layer, site.at, site.entry) in result.aliased, site.at != "output",
                                          site.layer in result.dead_ends))


def _preference(site: Site):
    """Of the sites of one tensor: an output over an input, then the outermost module
    (where the encoder hands the map on), then whole over an entry."""
    return (site.at != "output", site.layer.count("."), bool(site.entry), site.layer)


def _build_graph(result: Survey, outputs, inputs, gate_edges) -> None:
    """Parents/children of the autograd graph (gate edges cut), distances to the output,
    and which maps are live: made from the input and reaching the output."""
    full_distance, queue = {}, deque()
    for t in outputs:
        if t.grad_fn is not None and t.grad_fn not in full_distance:
            full_distance[t.grad_fn] = 0
            queue.append(t.grad_fn)
            result.output_nodes.add(t.grad_fn)
    while queue:
        node = queue.popleft()
        parents = [p for p, _ in node.next_functions if p is not None]
        result.parents[node] = [p for p in parents if (node, p) not in gate_edges]
        for parent in result.parents[node]:
            result.children.setdefault(parent, []).append(node)
        for parent in parents:
            if parent not in full_distance:
                full_distance[parent] = full_distance[node] + 1
                queue.append(parent)
    for node in full_distance:
        if type(node).__name__ == "AccumulateGrad" and any(node.variable is t for t in inputs):
            result.input_nodes.add(node)
    reaching = reach(result.output_nodes, result.parents)
    made_from_input = reach(result.input_nodes, result.children)
    for node, fmap in result.maps.items():
        fmap.distance = full_distance.get(node)
        fmap.live = node in reaching and node in made_from_input


def reach(start, edges, blocked=None) -> set:
    """Nodes reachable from ``start`` along ``edges`` without passing ``blocked`` (a node or a set)."""
    blocked = blocked if isinstance(blocked, (set, frozenset)) else {blocked}
    seen = {n for n in start if n not in blocked}
    queue = deque(seen)
    while queue:
        for nxt in edges.get(queue.popleft(), ()):
            if nxt not in blocked and nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen
