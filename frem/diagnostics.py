"""Should FREM help here? The paper's premise (its Fig. 2 and 9), measured on your network.

The premise: the bottleneck's features are smaller than those of the skip
connection that meets them in the decoder, and the deep encoder receives less
gradient than the shallow one. ``Premise`` finds, from one recorded pass on
``example_input`` (the same survey the bottleneck finder reads):

* the bottleneck: where an attached FREM acts, else ``frem.locate_bottleneck``;
* the skip: the other input of the first merge (a concat or an add of two
  feature paths) that the bottleneck's descendants enter, i.e. the encoder
  feature the decoder puts beside the bottleneck;
* the deepest encoder stage (the module that makes the bottleneck) and the
  shallowest (the first module with parameters under the same parent).

While ``recording()``, every forward adds the mean absolute activation of the
bottleneck (split into FREM's enhanced and other channels: the network's own
features, before FREM scales them) and of the skip, and every backward the
mean absolute gradient of each stage's parameters. ``summary()`` gives the
means since the last ``reset()``; ``epoch_end(epoch)`` appends them to
``history`` and resets; ``frem.diagnostics.plot(history, path)`` draws them
over epochs (matplotlib). The hooks cost a reduction per hooked tensor while
recording, nothing otherwise.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from frem.bottleneck import _known_map, locate_bottleneck
from frem.module import FREM
from frem.sites import Site, deepest_entry, get_entry
from frem.survey import reach, survey
from frem.wrappers import unwrap

KEYS = ("bottleneck", "skip", "enhanced", "other", "grad_deep", "grad_shallow")


class PremiseNotFound(ValueError):
    """The network has no merge of the bottleneck's path with another feature path, or no stages to compare."""


def _site_map(found, site: Site):
    fmap = _known_map(found, site)
    if fmap is None:
        raise PremiseNotFound(f"the recorded pass has no feature map at {site.describe()}: pass bottleneck= "
                              "(a layer name) where FREM is attached elsewhere")
    return fmap


def find_skip(found, bottleneck_map):
    """The feature map that meets the bottleneck's path at its first merge, or None."""
    from_input = reach(found.input_nodes, found.children)
    descendants = reach({bottleneck_map.node}, found.children)
    # breadth first from the bottleneck: the nearest node that also takes a feature path of another origin
    frontier, seen = [bottleneck_map.node], {bottleneck_map.node}
    while frontier:
        following = []
        for node in frontier:
            for child in found.children.get(node, ()):
                others = [p for p in found.parents.get(child, ()) if p not in descendants and p in from_input]
                if others:
                    return _nearest_map(found, others[0], descendants)
                if child not in seen:
                    seen.add(child)
                    following.append(child)
        frontier = following
    return None


def _nearest_map(found, node, descendants):
    """The closest ancestor of ``node`` (itself included) that is a feature map a module hands over."""
    frontier, seen = [node], {node}
    while frontier:
        for n in frontier:
            fmap = found.maps.get(n)
            if fmap is not None and fmap.sites:
                return fmap
        following = []
        for n in frontier:
            for parent in found.parents.get(n, ()):
                if parent not in seen and parent not in descendants:
                    seen.add(parent)
                    following.append(parent)
        frontier = following
    return None


def _attached_site(module: FREM) -> Site:
    """Where an attached FREM acts, with the entry its hook took."""
    target = module._target_ref()
    hooks = target._forward_hooks if module._at == "output" else target._forward_pre_hooks
    entry = next((h.entry for h in hooks.values() if getattr(h, "frem", None) is module), None)
    return Site(module.layer, module._at, entry, module.num_channels, module.dim)


def _stage_modules(model: nn.Module, found, bottleneck_map, site: Site):
    """The deepest encoder stage: the outermost module that returns the bottleneck as a plain tensor and has
    parameters. The shallowest: the first module called of the same type that returns a live feature map
    (a stage's twin at the top of the encoder), else the first module with parameters that does."""
    def has_params(name):
        return any(True for _ in model.get_submodule(name).parameters())
    outputs = [s.layer for s in bottleneck_map.sites if s.at == "output" and s.layer and not s.entry]
    outputs = [name for name in outputs if has_params(name)]
    if not outputs:
        raise PremiseNotFound(f"no module with parameters returns the bottleneck at {site.describe()}: "
                              "pass deep= and shallow= (module names)")
    deep = min(outputs, key=lambda name: name.count("."))
    live = {node for node, fmap in found.maps.items() if fmap.live}
    called = [c.name for c in sorted(found.calls, key=lambda c: c.start)
              if c.name != deep and any(n in live for n in c.output_nodes) and has_params(c.name)
              and not isinstance(model.get_submodule(c.name), FREM)]
    twins = [name for name in called if type(model.get_submodule(name)) is type(model.get_submodule(deep))
             and not deep.startswith(name + ".")]
    if not (twins or called):
        raise PremiseNotFound(f"no stage with parameters comes before {deep}: pass shallow= (a module name)")
    return deep, (twins or called)[0]


class Premise:
    """The paper's premise on ``model``: activations of bottleneck and skip, gradients of deep and shallow
    stages. ``bottleneck``, ``skip``, ``deep``, ``shallow`` override what the recorded pass finds (a layer
    name, or a ``frem.Site``)."""

    def __init__(self, model: nn.Module, example_input, *, bottleneck=None, skip=None, deep: str | None = None,
                 shallow: str | None = None):
        self.model = unwrap(model)
        frems = [m for m in self.model.modules() if isinstance(m, FREM) and m.applied_by_hook]
        self.frem = frems[0] if frems else None
        if bottleneck is None:
            bottleneck = (_attached_site(self.frem) if self.frem is not None
                          else locate_bottleneck(self.model, example_input))
        self.bottleneck = bottleneck if isinstance(bottleneck, Site) else Site(bottleneck)
        found = survey(self.model, example_input)
        deep_map = _site_map(found, self.bottleneck)
        if skip is None:
            skip_map = find_skip(found, deep_map)
            if skip_map is None:
                raise PremiseNotFound(
                    f"the bottleneck's path ({self.bottleneck.describe()}) meets no other feature path on its "
                    "way to the output (no skip connection): the premise compares it with the skip it meets, so "
                    "this network has none to compare; pass skip= (a layer name) to compare with another map")
            skip = skip_map.site
        self.skip = skip if isinstance(skip, Site) else Site(skip)
        if deep is None or shallow is None:
            found_deep, found_shallow = _stage_modules(self.model, found, deep_map, self.bottleneck)
            deep, shallow = deep or found_deep, shallow or found_shallow
        self.deep, self.shallow = deep, shallow
        self.history: list[dict] = []
        self._frozen_said: set = set()
        self.reset()

    def __repr__(self) -> str:
        return (f"Premise(bottleneck={self.bottleneck.describe()!r}, skip={self.skip.describe()!r}, "
                f"deep={self.deep!r}, shallow={self.shallow!r})")

    def reset(self) -> None:
        self._sums = {key: 0.0 for key in KEYS}
        self._counts = {key: 0 for key in KEYS}
        self._channel_sum = None
        self._frem_start = self._frem_counts()

    def _frem_counts(self) -> tuple | None:
        """(re-draws, training calls since the last, calls made inside frem.disabled) of the FREM, or None."""
        m = self.frem
        if m is None:
            return None
        return m._redraws, (int(m.calls) if not m.calls.is_meta else 0) + m._counts["transformed"], m._counts["paused"]

    def _frem_state(self) -> str:
        """Whether FREM acted since the last reset: "on", "off" (every training call inside frem.disabled),
        "partly" (some), "idle" (no training call), or "none" (no FREM attached)."""
        now = self._frem_counts()
        if now is None:
            return "none"
        redraws, calls, paused = now
        start = self._frem_start or (redraws, 0, paused)
        enhanced = calls if redraws != start[0] else calls - start[1]
        off = paused - start[2]
        return "partly" if enhanced and off else "on" if enhanced else "off" if off else "idle"

    # ---- recording

    @contextmanager
    def recording(self):
        """Hooks on while inside: forwards add activations, backwards add gradients (train or eval)."""
        handles = [self._hook(self.bottleneck, self._bottleneck), self._hook(self.skip, self._skip)]
        for key, name in (("grad_deep", self.deep), ("grad_shallow", self.shallow)):
            trainable = [p for p in self.model.get_submodule(name).parameters() if p.requires_grad]
            if not trainable and name not in self._frozen_said:
                self._frozen_said.add(name)
                warnings.warn(f"the {key.removeprefix('grad_')} stage {name!r} has no trainable parameters (frozen): "
                              "no gradient reaches it, so the gradient ratio is not measured (NaN). Pass "
                              "deep= and shallow= (module names) of stages that train", RuntimeWarning, stacklevel=3)
            for p in trainable:
                handles.append(p.register_hook(lambda g, key=key: self._add(key, g.detach().abs().sum(), g.numel())))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, site: Site, record):
        module = self.model.get_submodule(site.layer)

        def hook(_module, *values):
            value = values[-1]  # (inputs, output) for a forward hook, (inputs,) for a pre-hook
            entry = site.entry if site.entry is not None else deepest_entry(value, site.dim)
            record(get_entry(value, entry or ()).detach(), site.dim)
        # prepend: the network's own features, before an attached FREM scales them
        if site.at == "output":
            return module.register_forward_hook(hook, prepend=True)
        return module.register_forward_pre_hook(hook, prepend=True)

    def _add(self, key, total, count) -> None:
        self._sums[key] = self._sums[key] + total  # a tensor: no sync until summary()
        self._counts[key] += count

    def _bottleneck(self, x: torch.Tensor, dim: int) -> None:
        dims = [d for d in range(x.dim()) if d != dim % x.dim()]
        per_channel = x.float().abs().sum(dims)
        self._channel_sum = per_channel if self._channel_sum is None else self._channel_sum + per_channel
        self._add("bottleneck", per_channel.sum(), x.numel())

    def _skip(self, x: torch.Tensor, _dim: int) -> None:
        self._add("skip", x.float().abs().sum(), x.numel())

    # ---- results

    def summary(self) -> dict:
        """Means since the last reset: |activation| of bottleneck, skip, FREM's enhanced and other channels;
        |gradient| of the deep and the shallow stage's parameters; and their ratios (NaN: nothing recorded)."""
        stats = {key: float(self._sums[key]) / self._counts[key] if self._counts[key] else math.nan
                 for key in ("bottleneck", "skip", "grad_deep", "grad_shallow")}
        stats["enhanced"] = stats["other"] = math.nan
        if self.frem is not None and self._channel_sum is not None and self.frem.num_channels is not None:
            means = self._channel_sum.cpu() / (self._counts["bottleneck"] / self._channel_sum.numel())
            chosen = torch.zeros(means.numel(), dtype=torch.bool)
            chosen[self.frem.channels.cpu()] = True
            stats["enhanced"] = float(means[chosen].mean())
            stats["other"] = float(means[~chosen].mean()) if (~chosen).any() else math.nan
        stats["activation_ratio"] = _ratio(stats["bottleneck"], stats["skip"])
        stats["gradient_ratio"] = _ratio(stats["grad_deep"], stats["grad_shallow"])
        return stats

    def epoch_end(self, epoch: int) -> dict:
        """Append this epoch's summary (with its epoch, and ``frem``: "on", "off" inside ``frem.disabled``,
        "partly", "idle" or "none") to ``history``, reset, and return it."""
        row = {"epoch": int(epoch), "frem": self._frem_state(), **self.summary()}
        self.history.append(row)
        self.reset()
        return row

    @torch.no_grad()
    def measure(self, batches, *, gradients=None) -> dict:
        """On demand: the summary over ``batches`` (inputs as forward takes them), in the model's current
        mode; ``gradients``, a function of the model's output returning a loss, adds a backward each."""
        from frem.survey import call_arguments
        self.reset()
        with self.recording():
            for batch in batches:
                args, kwargs = call_arguments(batch)
                if gradients is None:
                    self.model(*args, **kwargs)
                else:
                    with torch.enable_grad():
                        gradients(self.model(*args, **kwargs)).backward()
        return self.summary()


class PerEpoch:
    """A ``Premise`` recording from each epoch's start to its end, built at the first start on the network and
    device training uses: what the Lightning, MONAI and nnU-Net glue share."""

    def __init__(self, example_input, network: nn.Module | None = None):
        self.example_input, self.network = example_input, network
        self.premise: Premise | None = None
        self._recording = None

    @property
    def history(self) -> list:
        return self.premise.history if self.premise is not None else []

    def start(self, network: nn.Module, device=None) -> None:
        """Begin recording (``network``: the framework's, unless one was given)."""
        if self.premise is None:
            example = self.example_input
            if device is not None and isinstance(example, torch.Tensor):
                example = example.to(device)
            self.premise = Premise(self.network if self.network is not None else network, example)
        self._recording = self.premise.recording()
        self._recording.__enter__()

    def end(self, epoch: int) -> dict | None:
        """Stop recording; the epoch's row (also appended to ``history``), or None when not recording."""
        if self._recording is None:
            return None
        self._recording.__exit__(None, None, None)
        self._recording = None
        return self.premise.epoch_end(epoch)


def numbers(row: dict) -> dict:
    """A history row as numbers, for a framework's logger: its measurements, and ``frem_off`` (1.0 where FREM
    was off for some of the epoch's training, ``frem.disabled``), without the epoch."""
    numeric = {key: value for key, value in row.items() if key not in ("epoch", "frem")}
    return {**numeric, "frem_off": float(row.get("frem") in ("off", "partly"))}


def _ratio(a: float, b: float) -> float:
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def plot(history: list[dict], path, title: str | None = None):
    """Fig. 2 and Fig. 9 of the paper for your run: activations (bottleneck, skip, enhanced, other) and the
    gradient ratio over epochs, saved to ``path``; epochs with FREM off (``frem.disabled``) shaded. Needs
    matplotlib. Drawn on a figure of its own in matplotlib's default style: the caller's backend, pyplot
    state and rcParams (a notebook's inline figures, seaborn's font scale) stay as they were."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise ModuleNotFoundError("frem.diagnostics.plot needs matplotlib: pip install matplotlib") from None
    if not history:
        raise ValueError("history is empty: call Premise.epoch_end(epoch) once an epoch while recording")
    epochs = [row["epoch"] for row in history]
    with matplotlib.rc_context(matplotlib.rcParamsDefault):
        fig = Figure(figsize=(10, 3.8))  # no pyplot: nothing registered, no backend chosen or changed
        left, right = fig.subplots(1, 2)
        off = [row["epoch"] for row in history if row.get("frem") in ("off", "partly")]
        for axes in (left, right):
            for epoch in off:
                axes.axvspan(epoch - 0.5, epoch + 0.5, color="0.88", lw=0, zorder=0)
        for key, label, style in (("bottleneck", "bottleneck", "-o"), ("skip", "skip it meets", "-s"),
                                  ("enhanced", "bottleneck, FREM's channels", "--^"),
                                  ("other", "bottleneck, other channels", "--v")):
            values = [row[key] for row in history]
            if not all(math.isnan(v) for v in values):
                left.plot(epochs, values, style, label=label, markersize=4)
        if off:
            left.fill_between([], [], color="0.88", label="FREM off (frem.disabled)")
        left.set(xlabel="epoch", ylabel="mean |activation|", title="features (paper Fig. 2, 9)")
        left.legend(fontsize=8)
        ratios = [row["gradient_ratio"] for row in history]
        right.plot(epochs, ratios, "-o", markersize=4, color="tab:red")
        right.axhline(1.0, color="grey", lw=0.8, ls=":")
        if any(r > 0 for r in ratios if not math.isnan(r)):
            right.set_yscale("log")  # the ratio spans orders of magnitude; 1 (dotted) is no imbalance
        right.set(xlabel="epoch", ylabel="deep / shallow", title="mean |gradient| of the stages' weights")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        # whole or not at all: a temporary file beside it, renamed over it (a kill mid-write leaves no half PNG)
        path = Path(path)
        part = path.with_name(f".{path.name}.part")
        try:
            fig.savefig(part, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
    return path
