"""Regression targets: the teacher's top-K block outputs, normalised and averaged."""

from typing import List, Optional

import torch
import torch.nn.functional as F


def _norm_over_real_steps(x: torch.Tensor, padding_mask: torch.Tensor, over_batch: bool, eps: float = 1e-5) -> torch.Tensor:
    """Normalise each channel over the non-padded steps of each sample (or of the whole
    batch): (B, T, C) -> (B, T, C), biased variance as ``F.instance_norm``; padded steps become 0."""
    valid = (~padding_mask).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    dims = (0, 1) if over_batch else (1,)
    n = valid.sum(dim=dims, keepdim=True).clamp_min(1)
    mean = (x * valid).sum(dim=dims, keepdim=True) / n
    var = (((x - mean) * valid) ** 2).sum(dim=dims, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps) * valid


def instance_norm_time(x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalise each channel of each sample over time: (B, T, C) -> (B, T, C).

    With ``padding_mask`` (B, T, True = padded) the statistics come from the real steps only.
    """
    x = x.float()
    if padding_mask is not None and padding_mask.any():
        return _norm_over_real_steps(x, padding_mask, over_batch=False)
    return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)


def batch_norm_time(x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalise each channel over batch and time (no running statistics)."""
    x = x.float()
    if padding_mask is not None and padding_mask.any():
        return _norm_over_real_steps(x, padding_mask, over_batch=True)
    return F.batch_norm(x.transpose(1, 2), None, None, training=True).transpose(1, 2)


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
    padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Average the last ``top_k`` of ``layer_outputs`` (each (B, T, C)) into fp32 targets.

    ``top_k`` larger than the number of blocks averages them all (as Meta's code does).
    Each layer is normalised first (batch, then instance, then layer norm, as enabled);
    the average can be normalised again (layer norm, then instance norm). ``padding_mask``
    (B, T): compute the batch / instance statistics over real steps only; None = over every
    step, padded ones included (Meta's).
    """
    if top_k < 1 or not layer_outputs:
        raise ValueError(f"average_top_k_layers={top_k} with {len(layer_outputs)} teacher blocks: nothing to average")
    chosen = layer_outputs[-top_k:]
    y = None
    for layer in chosen:
        layer = layer.float()
        if batch_norm_target_layer:
            layer = batch_norm_time(layer, padding_mask)
        if instance_norm_target_layer:
            layer = instance_norm_time(layer, padding_mask)
        if layer_norm_target_layer:
            layer = layer_norm_channels(layer)
        y = layer.clone() if y is None else y.add_(layer)
    y = y.div_(len(chosen))
    if layer_norm_targets:
        y = layer_norm_channels(y)
    if instance_norm_targets:
        y = instance_norm_time(y, padding_mask)
    return y


def targets_from_config(layer_outputs: List[torch.Tensor], cfg, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`build_targets` with a model config's settings (``average_top_k_layers``, the
    ``*_norm_target*`` flags, ``target_stats_exclude_padding``; the same names in 1.0 and 2.0).
    ``padding_mask`` is only used when ``cfg.target_stats_exclude_padding``."""
    return build_targets(
        layer_outputs,
        cfg.average_top_k_layers,
        instance_norm_target_layer=cfg.instance_norm_target_layer,
        layer_norm_target_layer=cfg.layer_norm_target_layer,
        batch_norm_target_layer=cfg.batch_norm_target_layer,
        instance_norm_targets=cfg.instance_norm_targets,
        layer_norm_targets=cfg.layer_norm_targets,
        padding_mask=padding_mask if cfg.target_stats_exclude_padding else None,
    )
