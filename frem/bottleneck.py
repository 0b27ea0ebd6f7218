"""Finding "the bottleneck": the layer farthest from the loss.

Known architectures resolve by name (smp encoders, timm ``features_only``
nets). Anything else is measured: one forward pass, then a breadth-first walk
of the autograd graph from the model's output gives each block's shortest
distance to it, so skip connections count as the short paths they are.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def deepest_tensor(output) -> torch.Tensor | None:
    """The tensor FREM acts on: the output itself, or the last of a list/tuple/dict."""
    tensors = _tensors(output)
    return tensors[-1] if tensors else None


def _timm_feature_channels(module) -> int | None:
    feature_info = getattr(module, "feature_info", None)
    if isinstance(module, nn.ModuleDict) and hasattr(feature_info, "channels"):
        return int(feature_info.channels()[-1])  # timm features_only nets
    return None


def known_bottleneck(model: nn.Module) -> tuple[str, int] | None:
    """(layer name, channels) for architectures whose bottleneck is known by name."""
    if (channels := _timm_feature_channels(model)) is not None:
        return "", channels
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        return None
    out_channels = getattr(encoder, "out_channels", None)
    if isinstance(out_channels, (list, tuple)) and out_channels:
        return "encoder", int(out_channels[-1])  # every smp SegmentationModel
    if (channels := _timm_feature_channels(encoder)) is not None:
        return "encoder", channels
    return None


def _distances_to_output(outputs: list[torch.Tensor]) -> dict:
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


def find_bottleneck(model: nn.Module, example_input) -> str:
    """Name of the block whose output lies farthest from the model's output.

    See ``locate_bottleneck``, which also returns the block's channel count.
    """
    return locate_bottleneck(model, example_input)[0]


def locate_bottleneck(model: nn.Module, example_input) -> tuple[str, int | None]:
    """(name, channels) of the block whose output lies farthest from the model's output.

    Runs one forward pass in eval mode (no running statistics change) and
    measures shortest-path distances in the autograd graph. Candidates are the
    model's top-level blocks, descending through single-child wrappers: the
    layers inside a block are a chain that ends at the block's output, and the
    block output is where the encoder hands its features to the decoder.
    Blocks called more than once (a shared pooling layer) are no single place
    and are skipped.
    """
    seen: dict[str, list] = {}  # block name -> (grad_fn, channels) of its output, one per call

    def record(name):
        def hook(_module, _inputs, output):
            tensor = deepest_tensor(output)
            if tensor is None:
                seen.setdefault(name, []).append((None, None))
            else:
                channels = tensor.shape[1] if tensor.dim() >= 2 else None
                seen.setdefault(name, []).append((tensor.grad_fn, channels))
        return hook

    handles = [module.register_forward_hook(record(name))
               for name, module in model.named_modules() if name]
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    inputs = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            outputs = _tensors(model(*inputs))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    distance = _distances_to_output(outputs)

    scope, prefix = model, ""
    while True:
        children = [(prefix + name, child) for name, child in scope.named_children()
                    if prefix + name in seen]
        if len(children) != 1:
            break
        (name, scope), prefix = children[0], children[0][0] + "."
    best, best_distance = None, -1
    for name, _ in children:
        calls = seen[name]
        if len(calls) != 1 or calls[0][0] not in distance:
            continue
        if distance[calls[0][0]] > best_distance:
            best, best_distance = (name, calls[0][1]), distance[calls[0][0]]
    if best is None:
        raise ValueError(
            "find_bottleneck found no block whose output reaches the model's output through "
            "autograd; pass layer=<module name> to frem.attach instead")
    return best
