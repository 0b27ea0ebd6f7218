"""FREM, the Feature Random Enhancement Module (Ando & Hotta, VISAPP 2021).

In training it multiplies B chosen channels by X; in eval it returns its input
object unchanged. The channels are dim 1 of (N, C, *spatial) maps by default;
``dim=-1`` serves channels-last maps (N, *spatial, C) and a transformer's
tokens (N, L, C). ``mode="random"`` re-draws the channels on every
``resample(epoch)``; ``mode="fixed"`` keeps the epoch-0 draw (paper Table 3).
It holds no parameters and no buffers (its draw and counters are plain tensors
that ``.to()`` moves), so it never changes a model's ``state_dict``, and weight
averaging (EMA, ``AveragedModel``) never averages a draw.

The draw is re-made by ``frem.resample(model, epoch)`` (call it each epoch), or
by FREM itself: ``redraw="train"`` at every ``model.train()``, ``redraw=N``
every N training steps (for loops with no epoch hook of their own).

The channel count is learnt at the first training call, like
``nn.LazyConv2d``: FREM is a lazy module, so ``torch.compile`` binds it
before tracing and even a first call inside ``fullgraph=True`` does not break
the graph. Pass ``num_channels`` to bind at once.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from numbers import Integral, Real

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from frem.kernels.scale_channels import scale_channels
from frem.reach import arm, disarm
from frem.selection import resolve_count, select_channels, validate_count_spec

MODES = ("random", "fixed")
X_MAX = torch.finfo(torch.float32).max  # the scale is held in fp32
FLOAT16_MAX = torch.finfo(torch.float16).max
# A random-mode FREM that enhanced the same channels for this many training steps since its last
# re-draw warns once, unless an earlier draw of it lasted as long (the user's epochs are that long):
# a run that is re-drawn once, or never, is silently the "fixed" variant.
STALE_DRAW_STEPS = 1000
REDRAWS = (None, "train")  # who re-draws: frem.resample (None), every model.train(); or an int: every N steps
# FREM's tensors. Not buffers: weight averaging (AveragedModel(use_buffers=True), timm's ModelEma, Lightning's
# weight averaging) averages every buffer, which would blend two draws into no draw and sum counters; and DDP
# would broadcast rank 0's counters over every rank's own. _apply moves them with the module.
STATE = ("scale", "channels", "calls", "capped", "overflowed")


def in_functorch_transform(x) -> bool:
    """Inside torch.func's grad, vmap, jvp ...: no in-place update of FREM's own tensors is allowed there
    (they are captured, not inputs of the transformed function)."""
    return (torch._C._functorch.peek_interpreter_stack() is not None
            or (isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)))


def _fresh_counters() -> dict:
    # Shared by DataParallel replicas (a shallow copy of __dict__), new in a deep copy (an EMA copy made none
    # of the original's calls): counts of passes the device counters do not hold, and what was said.
    return {"nograd": 0, "transformed": 0, "paused": 0, "nograd_warned": False, "stale_warned": False}


REFS = ("_holder_ref", "_target_ref", "_root_ref")  # weak links into the model (no module cycle)


class FREM(LazyModuleMixin, nn.Module):
    """Multiply B channels (of dim ``dim``) by X while training; identity in eval.

    Args:
        B: channels to enhance, an int count or a float fraction in (0, 1].
        X: the enhancement factor, finite, > 0 and at most float32's maximum.
        mode: ``"random"`` (re-drawn by ``resample(epoch)``) or ``"fixed"``.
        seed: the draw is a pure function of (seed, epoch).
        layer: name of the hooked layer, used in error messages.
        num_channels: the width, if known; otherwise learnt at the first training call.
        dim: where the channels are: 1 for (N, C, *spatial), -1 for (N, *spatial, C) and (N, L, C).
        redraw: None (``frem.resample`` re-draws), ``"train"`` (every ``model.train()``), or N (every N
            training steps): for loops that have no epoch hook to call ``frem.resample`` from.
    """

    def __init__(self, B: int | float, X: float, mode: str = "random", seed: int = 0,
                 layer: str | None = None, num_channels: int | None = None, dim: int = 1, redraw=None):
        super().__init__()
        self._B_spec = validate_count_spec(B)
        if isinstance(dim, bool) or not isinstance(dim, Integral) or dim == 0:
            raise ValueError(f"dim is the channel dim: 1 for (N, C, *spatial), -1 for channels-last maps and "
                             f"(N, L, C) tokens (0 is the batch), got dim={dim!r}")
        self.dim = int(dim)
        if isinstance(X, bool) or not isinstance(X, Real) or not math.isfinite(X) or not 0 < X <= X_MAX:
            raise ValueError(f"X must be a finite number in (0, {X_MAX:.4g}] (the scale is float32), "
                             f"got X={X!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not (redraw in REDRAWS or (isinstance(redraw, Integral) and not isinstance(redraw, bool) and redraw > 0)):
            raise ValueError(f"redraw says who re-draws the channels: None (you call frem.resample(model, epoch) "
                             f"each epoch), 'train' (every model.train()), or N > 0 (every N training steps); "
                             f"got redraw={redraw!r}")
        self.redraw = redraw if redraw in REDRAWS else int(redraw)
        self.X = float(X)
        self.mode = mode
        self.seed = int(seed)
        self.layer = layer
        self.epoch = 0
        self.num_channels: int | None = None
        # Set by frem.attach: the hook applies an attached FREM, so a container
        # that iterates its children and calls it again gets the identity.
        self.applied_by_hook = False
        self._holder_ref = self._target_ref = None  # weak: no module cycle
        self._child_name = self._at = None
        self._resampled = False
        self._redraws = 0      # re-draws made (frem.resample, or redraw=) since it was made
        self._steps_on_draw = 0
        self._longest_draw = 0  # the most training steps an earlier draw lasted: how long the user's epochs are
        self._paused = 0  # frem.disabled(): > 0 while FREM is off in train mode
        self._root_ref = None  # the model frem.attach was given: where its effect must arrive (frem.reach)
        self._idle = {"grads": 0, "paused": False, "warned": False}  # frem.monitor.check_fired's evidence
        self._watch = None  # frem.monitor's gradient hooks on the root's parameters
        self._reach = {"state": None, "detail": ""}  # frem.reach: does the effect reach the model's outputs?
        self._counts = _fresh_counters()
        self.scale = torch.ones(0)
        self.channels = torch.zeros(0, dtype=torch.long)
        # Since the last re-draw, counted on the device (no sync): training calls that enhanced,
        # float16 values capped at its maximum, and float16 steps whose gradient reached FREM as inf/NaN.
        self.calls = torch.zeros((), dtype=torch.long)
        self.capped = torch.zeros((), dtype=torch.long)
        self.overflowed = torch.zeros((), dtype=torch.long)
        self._float16_steps = 0
        if num_channels is not None:
            self.bind(num_channels)

    @property
    def B(self) -> int | float:
        """The channel count once the layer's width is known, else B as given."""
        return self.channels.numel() if self.num_channels is not None else self._B_spec

    def bind(self, num_channels: int, device: torch.device | None = None) -> "FREM":
        """Fix the channel count (checking B against it) and draw the channels."""
        self._count = resolve_count(self._B_spec, num_channels, self.layer)
        self.num_channels = int(num_channels)
        device = self.scale.device if device is None else device
        self.scale = torch.ones(num_channels, device=device)
        self.channels = torch.zeros(self._count, dtype=torch.long, device=device)
        self.calls = torch.zeros((), dtype=torch.long, device=device)
        self.capped = torch.zeros((), dtype=torch.long, device=device)
        self.overflowed = torch.zeros((), dtype=torch.long, device=device)
        self._draw()
        self._finish_lazy_binding()
        return self

    def reset_parameters(self) -> None:
        """Define every piece of state again from the settings: the draw for the current epoch, zero counters.

        FREM has no parameters; frameworks that build on the meta device call this on every
        module after ``to_empty`` (FSDP's default ``param_init_fn``, torchtitan-style inits).
        """
        if self.num_channels is not None:
            self.bind(self.num_channels, device=self.scale.device)

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .half(), to_empty(): the scale and the channels are a function of the
        # settings, so they are drawn again rather than converted (the scale stays float32:
        # .half() would round X), and counters whose memory to_empty() left undefined (a model
        # built on the meta device) are zeroed: garbage there reads as billions of capped values.
        undefined = self.calls.is_meta or getattr(fn, "__qualname__", "").startswith("Module.to_empty")
        super()._apply(fn, recurse)
        for name in STATE:
            self.__dict__[name] = fn(self.__dict__[name])
        if self.scale.dtype != torch.float32:
            self.scale = self.scale.float()
        if self.num_channels is not None and not self.scale.is_meta:
            self._draw()
        if undefined:
            self.calls.zero_()
            self.capped.zero_()
            self.overflowed.zero_()
        return self

    def resample(self, epoch: int) -> "FREM":
        """Draw the channels for ``epoch`` (``mode="fixed"`` keeps its first draw)."""
        if isinstance(epoch, bool) or not isinstance(epoch, Integral) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self._report_float16()
        self.calls.zero_()
        self._counts["transformed"] = 0
        self.epoch = int(epoch)
        if self._resampled:
            self._longest_draw = max(self._longest_draw, self._steps_on_draw)
        self._resampled = True
        self._redraws += 1
        self._steps_on_draw = 0
        return self._draw() if self.num_channels is not None else self

    def _root(self):
        """The model ``frem.attach`` was given, or None (not attached so, or gone: held weakly)."""
        return self._root_ref() if self._root_ref is not None else None

    def train(self, mode: bool = True) -> "FREM":
        # model.train() reaches every submodule: redraw="train" re-draws here, with the next epoch's channels;
        # the reach check's hook on the model is there only while it trains (frem.reach.arm).
        (arm if mode else disarm)(self)
        if mode and self.redraw == "train":
            from frem.monitor import check_fired  # frem.monitor imports this module
            root = self._root()
            check_fired(root if root is not None else self, [self])
            self.resample(self._redraws)
        return super().train(mode)

    @torch.no_grad()
    def _draw(self) -> "FREM":
        epoch = self.epoch if self.mode == "random" else 0
        chosen = select_channels(self.num_channels, self._count, self.seed, epoch)
        # In place, so compiled graphs and DDP buffer views stay valid.
        self.channels.copy_(chosen)
        self.scale.fill_(1.0).index_fill_(0, self.channels, self.X)
        return self

    def forward(self, x: torch.Tensor, *, _hooked: bool = False) -> torch.Tensor:
        # An attached FREM acts through its hook (_hooked=True); a container that
        # iterates its children and calls it again gets the identity.
        if not self.training or (self.applied_by_hook and not _hooked):
            return x
        if self._paused:  # inside frem.disabled(): off in train mode, and not "idle" (the user chose it)
            self._idle["paused"] = True
            if not torch.compiler.is_compiling():
                self._counts["paused"] += 1
            return x
        where = f"layer {self.layer!r}" if self.layer is not None else "FREM's input"
        if not isinstance(x, torch.Tensor) or not self._has_channel_dim(x):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where} has no channel dimension {self.dim} (output {shape}); "
                             "FREM needs (N, C, *spatial) feature maps, or dim=-1 for (N, *spatial, C) and (N, L, C)")
        if x.shape[self.dim] != self.num_channels:  # bound by _infer_parameters before this call
            raise ValueError(f"{where} has {x.shape[self.dim]} channels in dim {self.dim}, but this FREM was "
                             f"bound to {self.num_channels}: the layer's layout changed, or dim= is wrong "
                             "(1: (N, C, *spatial); -1: channels last)")
        if torch.compiler.is_compiling():
            if isinstance(self.redraw, int):
                raise RuntimeError(f"FREM at {where} has redraw={self.redraw} (every {self.redraw} training steps), "
                                   "which counts steps in Python that a compiled graph does not run: use "
                                   "redraw='train' or call frem.resample(model, epoch) each epoch")
            self._count_call()
            return self._enhance(x)
        if in_functorch_transform(x):  # torch.func.grad / vmap / functional_call under them
            self._counts["transformed"] += 1  # a Python count: a captured tensor may not be changed in place
            return scale_channels(x, self.scale, self.dim)
        if self.scale.device != x.device:  # still on the meta device (load_state_dict(assign=True)), or moved
            self.bind(self.num_channels, device=x.device)
        self._check_not_enhanced_twice(x, where)
        if not torch.is_grad_enabled():
            self._count_nograd(where)
        else:
            if isinstance(self.redraw, int) and self._steps_on_draw >= self.redraw:
                self.resample(self.epoch + 1)
            self._count_call()
            self._count_step()
        y = self._enhance(x)
        y._frem_layer = self.layer or "FREM"
        return y

    def _count_nograd(self, where: str) -> None:
        """A pass in train mode with gradients off: nothing learns from it (validation, inference, SWA's
        update_bn). FREM acts, as train mode asks, but counts it apart from training and says so once."""
        self._counts["nograd"] += 1
        if self._counts["nograd_warned"]:
            return
        self._counts["nograd_warned"] = True
        warnings.warn(
            f"FREM at {where} enhanced a forward pass run in train mode with gradients off (torch.no_grad()): "
            "nothing learns from such a pass, so it is likely validation or inference, and FREM changed its "
            "result. Call model.eval() first: FREM is the identity in eval. (torch.optim.swa_utils.update_bn "
            "runs so on purpose: FREM acts there as in the training whose batch-norm statistics it recomputes; "
            "wrap it in frem.disabled(model) to recompute them without FREM.) Said once for this FREM; "
            "frem.status(model) counts such passes apart, as 'nograd'.", RuntimeWarning, stacklevel=5)

    def _count_call(self) -> None:
        # frem.status's count: on the device, in place (no sync), and a compiled graph counts too;
        # benchmarks/test_overhead.py measures what it costs a training step
        self.calls.add_(1)  # add_, not +=: no module attribute is set (torch.export < 2.7 refuses that)

    def _has_channel_dim(self, x: torch.Tensor) -> bool:
        return x.dim() >= 2 and -x.dim() < self.dim < x.dim() and self.dim % x.dim() != 0

    def _enhance(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float16:
            return scale_channels(x, self.scale, self.dim)
        # float16 (the autocast nnU-Net and most GPU scripts train with): the paper's networks'
        # bottleneck features stay within a few units (README, "Mixed precision"), so X=632 fits
        # float16's maximum of 65504 with room; a larger X or feature would round to inf. The
        # float32 product is capped at the maximum instead (a capped value passes no gradient,
        # as for any clamp). What is capped here, and steps whose gradient comes back inf/NaN
        # (an overflow downstream: GradScaler then skips the step), are counted on the device
        # and reported once an epoch by resample().
        y = scale_channels(x.float(), self.scale, self.dim).clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16)
        self.capped.add_((y.abs() == FLOAT16_MAX).sum())
        if y.requires_grad and not torch.compiler.is_compiling():
            self._float16_steps += 1
            y.register_hook(self._count_overflow)
        return y

    def _count_overflow(self, grad: torch.Tensor) -> None:
        self.overflowed.add_((~torch.isfinite(grad).all()).long())

    def _report_float16(self) -> None:
        """Once an epoch (one sync): warn about capped values, and about an epoch in which most
        float16 steps overflowed (a GradScaler run that skips most steps learns nothing)."""
        if not self.capped.numel():
            return
        capped, overflowed, steps = int(self.capped), int(self.overflowed), self._float16_steps
        self.capped.zero_()
        self.overflowed.zero_()
        self._float16_steps = 0
        where = f"FREM at {self.layer or 'its module'}"
        advice = ("train under bfloat16 autocast (torch.autocast(..., dtype=torch.bfloat16); nnU-Net: "
                  "torch.set_autocast_dtype('cuda', torch.bfloat16)) or lower X")
        if capped:
            warnings.warn(
                f"{where} capped {capped} enhanced values at float16's maximum (65504) in epoch {self.epoch}: "
                f"|features| x X={self.X:g} passed float16's range. They are still enhanced, by less than X, "
                f"and get no gradient; if the loss turns inf/NaN downstream, {advice}.", RuntimeWarning, stacklevel=4)
        if steps and 2 * overflowed > steps:
            warnings.warn(
                f"{where}: in {overflowed} of {steps} float16 training steps of epoch {self.epoch} the gradient "
                f"came back inf/NaN: the enhanced features (x X={self.X:g}) overflow float16 downstream, so a "
                f"GradScaler skips those steps and the model stops learning. {advice[0].upper() + advice[1:]}.",
                RuntimeWarning, stacklevel=4)

    def _check_not_enhanced_twice(self, x: torch.Tensor, where: str) -> None:
        first = getattr(x, "_frem_layer", None)
        if first is not None:
            raise RuntimeError(
                f"FREM at {where} got a tensor that the FREM at {first!r} already enhanced: both act on "
                f"the same feature map, so its channels would be scaled by X twice. Keep one of them "
                "(frem.detach(model) removes all).")

    def _count_step(self) -> None:
        self._steps_on_draw += 1
        if (self.mode != "random" or self._steps_on_draw != STALE_DRAW_STEPS or self._counts["stale_warned"]
                or self._longest_draw >= STALE_DRAW_STEPS):
            return
        self._counts["stale_warned"] = True
        since = (f"since its last re-draw (epoch {self.epoch}, {self._redraws} re-draw"
                 f"{'s' if self._redraws != 1 else ''} in all)" if self._resampled else "and was never re-drawn")
        warnings.warn(
            f"FREM at {self.layer or 'its module'} has enhanced the same {self.B} channels for "
            f"{STALE_DRAW_STEPS} training steps {since}: call frem.resample(model, epoch) at the start of every "
            "epoch (the paper re-draws each epoch; frem.integrations has the callbacks for Lightning, MONAI, "
            "nnU-Net and the Hugging Face Trainer), attach with redraw='train' (at every model.train()) or "
            "redraw=N (every N steps) where your loop has no epoch hook, or use mode='fixed' if a fixed draw is "
            "what you want. If one epoch of yours is longer than this, it is expected; said once.", stacklevel=4)

    # ---- lazy binding: torch.compile calls _infer_parameters before tracing

    def _infer_parameters(self, module, args, kwargs=None):
        # The forward pre-hook of a lazy module (and what torch.compile calls before tracing):
        # the first training call with a feature map fixes the width.
        x = args[0]
        if self.num_channels is None and self.training and isinstance(x, torch.Tensor) and self._has_channel_dim(x):
            self.bind(x.shape[self.dim], device=x.device)

    def _finish_lazy_binding(self) -> None:
        if self.num_channels is not None and "_initialize_hook" in self.__dict__:
            self._initialize_hook.remove()
            self._load_hook.remove()
            del self._initialize_hook, self._load_hook

    def _replicate_for_data_parallel(self):
        return nn.Module._replicate_for_data_parallel(self)

    # ---- attachment: frem.attach sets it, remove() undoes it

    def remove(self) -> None:
        """Undo ``frem.attach``: remove the hook and this submodule."""
        target = self._target_ref() if self._target_ref is not None else None
        if target is None:
            raise RuntimeError("this FREM was not attached with frem.attach (or was removed already)")
        # frem.attach registers its hooks without kwargs or always_call, so these dicts are all: the site's,
        # and the reach check's on the model it was given.
        root = self._root()
        for module in (target, root) if root is not None else (target,):
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, hook in hooks.items() if getattr(hook, "frem", None) is self]:
                    del hooks[key]
        if self._watch is not None:
            self._watch.remove()
            self._watch = None
        holder = self._holder_ref()  # an ancestor or a part of the target: alive while it is
        if holder._modules.get(self._child_name) is self:
            del holder._modules[self._child_name]
        self.applied_by_hook = False
        self._holder_ref = self._target_ref = self._root_ref = self._child_name = self._at = None

    def __deepcopy__(self, memo):  # pragma: no mutate block
        # A copied model (EMA, AveragedModel) gets a FREM driven by its own
        # hook and removable from its own modules; a FREM copied alone is detached.
        # The copy made none of the original's calls and watches its own parameters: fresh counters.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = dict(self.__dict__)
        refs = {name: state.pop(name) for name in REFS}
        state["_watch"] = None
        state["_reach"] = {k: v for k, v in state["_reach"].items() if k not in ("probe", "bare", "storage")}
        new.__dict__.update(copy.deepcopy(state, memo))
        originals = {name: ref() if ref is not None else None for name, ref in refs.items()}
        # Part of a copy of its model (one of its modules is being copied): the twins, copied now if this
        # FREM was reached first (through the reach hook on the model, say); copied alone: detached.
        in_copy = any(id(m) in memo for m in originals.values() if m is not None)
        for name, original in originals.items():
            twin = (memo[id(original)] if id(original) in memo else copy.deepcopy(original, memo)
                    ) if original is not None and in_copy else None
            new.__dict__[name] = weakref.ref(twin) if twin is not None else None
        for name in ("calls", "capped", "overflowed"):
            new.__dict__[name] = torch.zeros_like(new.__dict__[name])
        new._counts, new._float16_steps = _fresh_counters(), 0
        new._idle = {"grads": 0, "paused": False, "warned": False}
        if new._holder_ref is None or new._target_ref is None:
            new.applied_by_hook, new._holder_ref, new._target_ref, new._child_name, new._at = (
                False, None, None, None, None)
        return new

    def __getstate__(self):  # pragma: no mutate block
        # Pickling (torch.save of a whole model) keeps the links as plain references.
        state = dict(self.__dict__)
        for name in REFS:
            state[name] = state[name]() if state[name] is not None else None
        state["_watch"] = None  # gradient hooks belong to this process's parameters
        state["_reach"] = {k: v for k, v in state["_reach"].items() if k not in ("probe", "bare", "storage")}  # a weak reference
        return state

    def __setstate__(self, state):  # pragma: no mutate block
        for name in REFS:
            state[name] = weakref.ref(state[name]) if state.get(name) is not None else None
        state.setdefault("_float16_steps", 0)  # a FREM pickled before the float16 counters
        state.setdefault("dim", 1)  # ... or before channel dims other than 1
        state.setdefault("_paused", 0)  # ... or before frem.disabled and frem.status
        state["_idle"] = {"grads": 0, "paused": False, "warned": False}  # ... or before the gradient watch
        for name, default in (("redraw", None), ("_redraws", int(state.get("_resampled", False))),
                              ("_longest_draw", 0), ("_steps_on_draw", 0), ("_watch", None),
                              ("_reach", {"state": None, "detail": ""}), ("_counts", _fresh_counters())):
            state.setdefault(name, default)
        buffers = state.get("_buffers", {})
        for name in STATE:  # a FREM pickled when its tensors were buffers
            if name in buffers:
                state[name] = buffers.pop(name)
            elif name not in state:
                state[name] = torch.zeros((), dtype=torch.long)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        parts = [f"B={self.B}", f"X={self.X:g}", f"mode={self.mode!r}", f"seed={self.seed}"]
        if self.layer is not None:
            parts.append(f"layer={self.layer!r}")
        parts.append(f"channels={self.num_channels if self.num_channels is not None else '?'}")
        if self.dim != 1:
            parts.append(f"dim={self.dim}")
        if self.redraw is not None:
            parts.append(f"redraw={self.redraw!r}")
        parts.append(f"epoch={self.epoch}")
        return ", ".join(parts)
