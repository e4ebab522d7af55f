"""Copying checkpoint tensors into a model plugin's parameters, slices of fused parameters included.

Model plugins fuse weights at load time (q/k/v into one matrix, gate/up into one), so one
checkpoint tensor may fill one part of a parameter. A model says where each checkpoint name goes
(`locate`) and how its fused parameters split (`parts`); this module does the copying, the shape
checks and the count of what was filled, the same way for every family.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from fastgen.errors import ModelLoadError

# (our parameter's name, the parameter, which part of a fused parameter: index into its sizes)
Target = tuple[str, nn.Parameter, int | None]
Locate = Callable[[str], Target | None]


def layer_target(name: str, pattern: re.Pattern, layers: nn.ModuleList,
                 table: Mapping[str, tuple[str, int | None]]) -> Target | None:
    """Where a per-layer checkpoint tensor goes. `pattern` matches the checkpoint name with
    groups (layer index, name within the layer); `table` maps the name within the layer to
    (our layer attribute, part). None for a name that is not a layer weight we keep."""
    match = pattern.fullmatch(name)
    if match is None or match.group(2) not in table:
        return None   # rotary inv_freq and other buffers some checkpoints carry
    index = int(match.group(1))
    if index >= len(layers):
        raise ModelLoadError(f"Checkpoint weight {name} is for layer {index}, and config.json's "
                             f"num_hidden_layers is {len(layers)}; check that the config matches "
                             f"the weights.")
    attr, part = table[match.group(2)]
    return attr_target(name, layers[index], attr, part, f"layers.{index}.")


def attr_target(name: str, owner: nn.Module, attr: str, part: int | None = None,
                prefix: str = "") -> Target:
    """Checkpoint tensor `name` goes to `owner.attr` (our name: prefix + attr)."""
    param = getattr(owner, attr)
    if param is None:
        # A bias or norm weight the config says the model does not have: serving without it
        # would silently change every output.
        raise ModelLoadError(f"Checkpoint weight {name} has no place in a model built from this "
                             f"config.json; check that the config matches the weights.")
    return prefix + attr, param, part


def load_weights(weights: Iterator[tuple[str, torch.Tensor]], locate: Locate,
                 parts: Mapping[str, list[int]]) -> set[str]:
    """Copy every tensor `locate` places; return our parameter names that were filled whole.

    `parts` maps a fused attribute name (the last component of our parameter's name, `qkv`) to
    the sizes of its parts along dim 0, in part order; a fused parameter counts as filled once
    each of its parts has been copied, or the whole of it at once (a checkpoint that stores it fused).
    """
    filled: dict[str, int] = {}
    for name, tensor in weights:
        target = locate(name)
        if target is None:
            continue
        param_name, param, part = target
        sizes = parts.get(_attr(param_name), [None])
        with torch.no_grad():
            if part is None:   # the whole parameter: a fused one counts each of its parts filled
                dest, count = param, len(sizes)
            else:
                dest, count = param.narrow(0, sum(sizes[:part]), sizes[part]), 1
            if dest.shape != tensor.shape:
                raise ModelLoadError(f"Weight {name} has shape {tuple(tensor.shape)}, "
                                     f"the config expects {tuple(dest.shape)}.")
            dest.copy_(tensor)
        filled[param_name] = filled.get(param_name, 0) + count
    return {n for n, count in filled.items() if count >= len(parts.get(_attr(n), [None]))}


def _attr(param_name: str) -> str:
    return param_name.rsplit(".", 1)[-1]
