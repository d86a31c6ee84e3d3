"""ALiBi attention biases (Press et al., "Train Short, Test Long", arXiv 2108.12409).

Each head ``h`` adds ``-slope_h * distance(i, j)`` to the attention logit of query ``i``
and key ``j``. data2vec 2.0 uses the symmetric (non-causal) 1-D form for speech and text and a 2-D form
over the patch grid for images, scaled by
a scale that may be learned per layer and/or per head (see :func:`make_alibi_scale`).
"""

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ALIBI_DISTANCES = ("manhattan", "euclidean")


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The paper's head slopes: a geometric sequence starting at ``2^(-8/n)``.

    For a head count that is not a power of two, the slopes of the nearest smaller power
    of two are followed by every other slope of the next larger one (the paper's recipe).
    """
    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got {num_heads}")

    def power_of_two(n: int):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        lower = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: num_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias_1d(num_heads: int, length: int) -> torch.Tensor:
    """(H, T, T) symmetric bias ``-slope_h * |i - j|`` (0 on the diagonal)."""
    pos = torch.arange(length, dtype=torch.float32)
    distance = (pos[None, :] - pos[:, None]).abs()
    return -alibi_slopes(num_heads)[:, None, None] * distance[None]


def alibi_bias_2d(num_heads: int, grid_h: int, grid_w: int, distance: str = "manhattan") -> torch.Tensor:
    """(H, T, T) bias over a row-major patch grid: minus each head's slope times the patch distance."""
    if distance not in ALIBI_DISTANCES:
        raise ValueError(f"alibi_distance must be one of {ALIBI_DISTANCES}, got {distance!r}")
    idx = torch.arange(grid_h * grid_w)
    r, c = (idx // grid_w).float(), (idx % grid_w).float()
    dr, dc = (r[:, None] - r[None, :]).abs(), (c[:, None] - c[None, :]).abs()
    dist = dr + dc if distance == "manhattan" else (dr**2 + dc**2).sqrt()
    return -alibi_slopes(num_heads)[:, None, None] * dist


def square_grid(time_steps: int) -> Tuple[int, int]:
    side = math.isqrt(time_steps)
    if side * side != time_steps:
        raise ValueError(f"2-D ALiBi needs a square grid of patches, got {time_steps} steps")
    return side, side


class AlibiCache:
    """The one cache of fixed ALiBi biases, 1-D (speech, text) and 2-D (image patch grids).

    1-D biases are kept at the largest length built so far per (heads, dtype, device) and
    cropped; 2-D ones per grid. :meth:`get` returns a (B, H, T, T) view (expanded over the
    batch, no copy). Not a module and not part of any state dict: the values are a pure
    function of the shape. Biases are float32 (attention adds them to fp32 logits).
    """

    def __init__(self):
        self._cache: Dict[tuple, torch.Tensor] = {}

    def get(self, batch_size: int, time_steps: int, heads: int, device, dims: int = 1, distance: str = "manhattan") -> torch.Tensor:
        if dims == 1:
            key = (1, heads, str(device))
            bias = self._cache.get(key)
            if bias is None or bias.size(-1) < time_steps:
                size = max(time_steps, bias.size(-1) if bias is not None else 0)
                bias = self._cache[key] = alibi_bias_1d(heads, size).to(device=device)
            bias = bias[:, :time_steps, :time_steps]
        elif dims == 2:
            key = (2, heads, distance, time_steps, str(device))
            bias = self._cache.get(key)
            if bias is None:
                bias = self._cache[key] = alibi_bias_2d(heads, *square_grid(time_steps), distance).to(device=device)
        else:
            raise ValueError(f"ALiBi is 1-D or 2-D, got alibi_dims={dims}")
        return bias[None].expand(batch_size, -1, -1, -1)

    def clear(self) -> None:
        self._cache.clear()

    def __deepcopy__(self, memo):
        # a deep-copied model (the EMA teacher) starts with an empty cache of its own
        return AlibiCache()


def initial_alibi_bias(heads: int, max_pos: int, dims: int = 1, distance: str = "manhattan") -> torch.Tensor:
    """(1, H, P, P) starting values of a learned ALiBi bias (``learned_alibi``)."""
    if dims == 1:
        return alibi_bias_1d(heads, max_pos)[None]
    return alibi_bias_2d(heads, *square_grid(max_pos), distance)[None]


def make_alibi_scale(
    num_layers: int,
    num_heads: int,
    init: float = 1.0,
    learned: bool = False,
    per_layer: bool = False,
    per_head: bool = False,
) -> nn.Parameter:
    """The (L or 1, 1, H or 1, 1, 1) scale of the ALiBi bias (Meta's ``alibi_scale`` layout).

    ``num_layers`` counts every block that receives the bias (prenet + shared blocks).
    A scale that is not learned is still a (frozen) parameter, as in Meta's checkpoints.
    """
    shape = (num_layers if per_layer else 1, 1, num_heads if per_head else 1, 1, 1)
    return nn.Parameter(torch.full(shape, float(init)), requires_grad=learned)


def apply_alibi_scale(bias: torch.Tensor, scale: Optional[torch.Tensor]):
    """Clamp the scale at 0; a single (not per-layer) scale is folded into the bias.

    Returns ``(bias, per_layer_scale_or_None)``: blocks multiply by ``scale[layer]``
    themselves when a per-layer scale remains.
    """
    if scale is None:
        return bias, None
    scale = scale.clamp_min(0)
    if scale.size(0) == 1:
        return bias * scale.squeeze(0).type_as(bias), None
    return bias, scale


def extend_learned_bias(bias: torch.Tensor, batch_size: int, time_steps: int) -> torch.Tensor:
    """A learned (1, H, P, P) bias for T steps: cropped, or edge-padded when T > P."""
    if bias.size(-1) < time_steps:
        pad = math.ceil((time_steps - bias.size(-1)) / 2)
        bias = F.pad(bias, (pad, pad, pad, pad), mode="replicate")
    return bias[..., :time_steps, :time_steps].expand(batch_size, -1, -1, -1)
