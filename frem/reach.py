"""Does FREM's effect reach the loss? Verified, not inferred from a hook having run.

A FREM can run, count its calls and change nothing the loss sees: a model
may return a tensor as an output entry while its own head reads the same
tensor elsewhere (``SegformerForSemanticSegmentation`` hands its decode head
``hidden_states``, and FREM on ``last_hidden_state`` changes only the
returned entry). So frem checks that the enhanced tensor reaches the outputs
of the model ``frem.attach`` was given, other than that tensor returned as
itself:

* at attach, given ``example_input``: one pass in eval mode with the site's
  tensor multiplied by a probe (a scalar 1 that requires grad), then a walk
  of the autograd graph from the outputs to the probe; where no graph joins
  them (a ``.detach()``, integer code), a forward difference decides (the
  site's tensor doubled: do the outputs change?);
* without it, at the first training call: the probe rides on FREM's own
  output for that one call and a hook on the model walks the graph once its
  forward returns, then removes itself (compiled graphs and torch.func
  transforms are not probed: there it stays unverified, ``reaches="?"``).

Where the effect does not reach, frem refuses, naming the site and why. A
site that is the model's own output reaches whatever the caller computes from
it (``reaches="output"``). ``frem.status`` shows the verdict per FREM.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from frem.sites import Site, get_entry, replace_entry, tensor_entries

REACHES, OWN_OUTPUT = "yes", "output"
# Training calls probed before frem gives up (a model whose own forward is never called whole: its parts are
# called one by one, and nothing sees its outputs): it then stays unverified, and no call carries a probe.
PROBE_TRIES = 3


class EffectDoesNotReach(ValueError):
    """FREM at this site would run and change nothing the model's outputs are computed from."""


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr() if t.numel() else None
    except (RuntimeError, NotImplementedError):  # tensors without storage (functorch wrappers, meta)
        return None


def reached_outputs(output, probe, storage: int | None, bare=None) -> tuple[bool, bool, bool]:
    """Of the model's ``output``: whether a tensor other than the probed one itself (or a view of it: the
    same ``storage``) is computed from it through the autograd graph (``probe``: the node that made it);
    whether the probed tensor itself is returned; and whether another is computed from ``bare`` (the node
    that made the same tensor before FREM) on a path around it."""
    entries = [t for _, t in tensor_entries(output)]
    others = [t for t in entries if storage is None or _storage(t) != storage]
    itself = len(others) < len(entries)
    starts = [t.grad_fn for t in others if t.grad_fn is not None]
    reached = _reaches(starts, probe)
    around = not reached and bare is not None and _reaches(starts, bare)
    return reached, itself, around


def _reaches(starts, target) -> bool:
    """Whether the autograd graph leads from any of ``starts`` to the node ``target``."""
    seen, queue = set(), deque(starts)
    while queue:
        node = queue.popleft()
        if node is target:
            return True
        if node in seen:
            continue
        seen.add(node)
        queue.extend(parent for parent, _ in node.next_functions if parent is not None and parent not in seen)
    return False


def verdict(reached: bool, itself: bool, around: bool, site: Site, model: nn.Module) -> str:
    """``REACHES``; ``OWN_OUTPUT`` where the tensor is returned as it is and nothing else the model returns
    reads its unscaled copy (the caller's code takes it: an encoder's features); else a refusal's message."""
    if reached:
        return REACHES
    if itself and not around:
        return OWN_OUTPUT
    return describe_miss(site, itself, model)


def describe_miss(site: Site, itself: bool, model: nn.Module) -> str:
    where = site.describe()
    why = (f"{type(model).__name__} returns that tensor as an output entry, but computes its other outputs "
           "from the unscaled tensor (a tuple or dict of hidden states its head reads, holding the same "
           "tensor), so only the returned entry changes" if itself else
           "nothing the model returns is computed from it (a side branch, a module whose output the forward "
           "drops, or a tensor the forward reads elsewhere)")
    return (f"FREM at {where} would run in training and change nothing the loss sees: {why}. Attach where the "
            f"model's head reads the features (frem.candidates(model, example_input) lists them), or pass "
            f"layer= and entry= for the tensor the head takes")


def probe_site(model: nn.Module, site: Site, args: tuple, kwargs: dict, entry_of) -> tuple[object, str]:
    """One pass of ``model`` in eval mode (gradients on, every train/eval flag restored) with the site's
    tensor times a probe. Returns (the site's tensor as seen, the verdict: ``REACHES``, ``OWN_OUTPUT``, or a
    refusal's message). ``entry_of(value)`` picks the entry of the site's value (list/dict outputs)."""
    target = model.get_submodule(site.layer)
    seen = []

    def hook(_module, *values):
        value = values[-1]  # a forward hook gets (inputs, output), a pre-hook (inputs,)
        entry = entry_of(value)
        try:
            x = get_entry(value, entry or ())
        except (KeyError, IndexError, TypeError):
            seen.append((entry, value))
            return None
        seen.append((entry, x))
        if seen[1:] or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None  # a layer called twice: the first call is the site (the survey sees one)
        probed = x * torch.ones((), dtype=x.dtype, device=x.device, requires_grad=True)
        seen.append(("probed", probed))
        seen.append(("bare", x.grad_fn))
        return replace_entry(value, entry or (), probed)

    output, flags = None, {module: module.training for module in model.modules()}
    handle = (target.register_forward_hook if site.at == "output" else target.register_forward_pre_hook)(
        hook, prepend=True)  # where FREM's own hook goes: first
    try:
        model.eval()
        with torch.enable_grad():
            output = model(*args, **kwargs)
    finally:
        handle.remove()
        for module, flag in flags.items():
            module.training = flag
    if not seen:
        return None, "never ran"
    tagged = dict(seen[1:])
    probed = tagged.get("probed")
    if probed is None:
        return seen[0], REACHES  # not a float tensor: the caller's layout check refuses it
    reached, itself, around = reached_outputs(output, probed.grad_fn, _storage(probed), tagged["bare"])
    if not reached and _changes_outputs(model, target, site, args, kwargs, entry_of, output, probed):
        reached = True  # it reaches the values, not through the graph (detached, integer code)
    return seen[0], verdict(reached, itself, around, site, model)


@torch.no_grad()
def _changes_outputs(model, target, site: Site, args, kwargs, entry_of, first, probed) -> bool:
    """A forward difference: the site's tensor doubled, do the outputs (other than that tensor) change?"""
    def hook(_module, *values):
        value = values[-1]
        entry = entry_of(value) or ()
        return replace_entry(value, entry, get_entry(value, entry) * 2)

    flags = {module: module.training for module in model.modules()}
    handle = (target.register_forward_hook if site.at == "output" else target.register_forward_pre_hook)(
        hook, prepend=True)  # where FREM's own hook goes: first
    try:
        model.eval()
        second = model(*args, **kwargs)
    finally:
        handle.remove()
        for module, flag in flags.items():
            module.training = flag
    before, after, storage = list(tensor_entries(first)), dict(tensor_entries(second)), _storage(probed)
    return any(path not in after or after[path].shape != t.shape or not torch.equal(t.detach(), after[path])
               for path, t in before if storage is None or _storage(t) != storage)


class FirstTrainingCall:
    """A forward hook on the model ``frem.attach`` was given: after the first training forward in which its
    FREM ran with gradients on, walk the graph from the outputs to the probe FREM's hook put on its output;
    verdict into ``frem._reach``; refuse (raise) where the effect does not reach; then remove itself."""

    def __init__(self, frem):
        self.frem = frem  # frem.attach's FREM; FREM.remove() finds this hook by it

    def __call__(self, model, _args, output):
        if not model.training or torch.compiler.is_compiling():
            return None
        reach = self.frem._reach
        probe, bare, storage = (reach.pop(key, None) for key in ("probe", "bare", "storage"))
        if probe is None or reach["state"] is not None:
            return None
        site = Site(self.frem.layer or "", self.frem._at or "output", reach.get("entry"), dim=self.frem.dim)
        found = verdict(*reached_outputs(output, probe, storage, bare), site, model)
        reach["state"], reach["detail"] = (found, "") if found in (REACHES, OWN_OUTPUT) else ("no", found)
        disarm(self.frem)
        if reach["state"] == "no":
            raise EffectDoesNotReach(reach["detail"] + "; frem.detach(model) removes it")
        return None


def arm(frem) -> None:
    """Put ``FirstTrainingCall`` on the model ``frem.attach`` was given while its verdict is open. Only while
    that model trains (``FREM.train`` arms and disarms): torch 2.6 exports an eval model with a hook on it
    (smp's U-Net, say) as two graphs and fails, so an attached model in eval carries none."""
    root = frem._root()
    if root is None or frem._reach["state"] is not None or any(
            isinstance(hook, FirstTrainingCall) and hook.frem is frem for hook in root._forward_hooks.values()):
        return
    root.register_forward_hook(FirstTrainingCall(frem))


def disarm(frem) -> None:
    root = frem._root()
    if root is not None:
        for key in [k for k, hook in root._forward_hooks.items()
                    if isinstance(hook, FirstTrainingCall) and hook.frem is frem]:
            del root._forward_hooks[key]


def probe_first_call(frem, x: torch.Tensor, y: torch.Tensor, entry) -> torch.Tensor:
    """At a FREM's training calls with gradients on (eager, no transform) until it is verified: its output
    times a probe, which ``FirstTrainingCall`` looks for once the model's forward returns. Each call's probe
    replaces the last (a model whose own forward is never called whole keeps just one step's nodes; autograd
    nodes take no weak reference). ``y`` unchanged once verified."""
    reach = frem._reach
    if (reach["state"] is not None or frem._root_ref is None or not torch.is_grad_enabled()
            or reach.get("tries", 0) >= PROBE_TRIES):
        return y
    reach["tries"] = reach.get("tries", 0) + 1
    arm(frem)  # a model put in training by hand (model.training = True), not by train(): checked from its next call
    probed = y * torch.ones((), dtype=y.dtype, device=y.device, requires_grad=True)
    probed._frem_layer = getattr(y, "_frem_layer", None)
    reach.update(probe=probed.grad_fn, bare=x.grad_fn, storage=_storage(probed), entry=entry)
    return probed
