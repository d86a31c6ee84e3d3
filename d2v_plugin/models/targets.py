"""Regression targets: the teacher's top-K block outputs, normalised and averaged."""

from typing import List

import torch
import torch.nn.functional as F


def instance_norm_time(x: torch.Tensor) -> torch.Tensor:
    """Normalise each channel of each sample over time: (B, T, C) -> (B, T, C)."""
    return F.instance_norm(x.float().transpose(1, 2)).transpose(1, 2)


def batch_norm_time(x: torch.Tensor) -> torch.Tensor:
    """Normalise each channel over batch and time (no running statistics)."""
    return F.batch_norm(x.float().transpose(1, 2), None, None, training=True).transpose(1, 2)


def layer_norm_channels(x: torch.Tensor) -> torch.Tensor:
    """Normalise each time step over its channels, without affine parameters."""
    return F.layer_norm(x.float(), x.shape[-1:])


@torch.no_grad()
def build_targets(
    layer_outputs: List[torch.Tensor],
    top_k: int,
    instance_norm_target_layer: bool = False,
    layer_norm_target_layer: bool = False,
    batch_norm_target_layer: bool = False,
    instance_norm_targets: bool = False,
    layer_norm_targets: bool = False,
) -> torch.Tensor:
    """Average the last ``top_k`` of ``layer_outputs`` (each (B, T, C)) into fp32 targets.

    Each layer is normalised first (batch, then instance, then layer norm, as enabled);
    the average can be normalised again (layer norm, then instance norm).
    """
    if not 1 <= top_k <= len(layer_outputs):
        raise ValueError(f"average_top_k_layers={top_k} but the teacher has {len(layer_outputs)} blocks")
    y = None
    for layer in layer_outputs[-top_k:]:
        layer = layer.float()
        if batch_norm_target_layer:
            layer = batch_norm_time(layer)
        if instance_norm_target_layer:
            layer = instance_norm_time(layer)
        if layer_norm_target_layer:
            layer = layer_norm_channels(layer)
        y = layer.clone() if y is None else y.add_(layer)
    y = y.div_(top_k)
    if layer_norm_targets:
        y = layer_norm_channels(y)
    if instance_norm_targets:
        y = instance_norm_time(y)
    return y
