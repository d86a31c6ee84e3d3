"""Block masks over a sequence of frames (speech) or a grid of patches (images), data2vec 2.0.

Semantics of Meta's ``compute_block_mask_1d`` / ``compute_block_mask_2d`` (fairseq
``data_utils``), in their default mode (overlapping blocks, no neighbour expansion):

1. With ``inverse_mask`` the blocks mark what stays *visible*: the block probability
   becomes ``1 - mask_prob``.
2. ``int(L * (p + mask_prob_adjust) / mask_length**dims * (1 + mask_dropout))`` block
   centres are drawn uniformly (with replacement) from the ``L`` steps; each grows into a
   ``mask_length`` span (1-D) or square (2-D), offset ``mask_length // 2``, cut at the border.
3. ``require_same_masks``: every row is brought to exactly ``int(L * p)`` marked steps by
   unmarking random marked ones or marking random unmarked ones.
4. With ``inverse_mask`` the result is flipped, so 1 = hidden from the student.

This implementation is vectorised over the batch (a max-pool grows the centres into
blocks; a random top-k equalises the counts) and runs on any device with an optional
``torch.Generator`` (see :func:`d2v_plugin.models.masking.mask_generator`).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def block_mask(
    batch_size: int,
    grid: Tuple[int, ...],
    mask_prob: float,
    mask_length: int,
    mask_prob_adjust: float = 0.0,
    inverse_mask: bool = False,
    require_same_masks: bool = True,
    mask_dropout: float = 0.0,
    device=None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A (B, prod(grid)) uint8 mask, 1 = masked; ``grid`` is ``(T,)`` or ``(H, W)`` (row-major)."""
    dims = len(grid)
    if dims not in (1, 2):
        raise ValueError(f"block masks are 1-D or 2-D, got a grid of {grid}")
    if mask_length < 2:
        raise ValueError(f"block masks need mask_length >= 2 (got {mask_length}); use a token mask for 1")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in [0, 1], got {mask_prob}")
    B = batch_size
    L = 1
    for g in grid:
        L *= g
    p = 1 - mask_prob if inverse_mask else mask_prob

    num_centres = int(L * ((p + mask_prob_adjust) / mask_length**dims) * (1 + mask_dropout))
    centres = torch.zeros(B, L, device=device)
    if num_centres > 0:
        idx = torch.randint(0, L, (B, num_centres), device=device, generator=generator)
        centres.scatter_(1, idx, 1.0)

    # grow each centre c into [c - off, c - off + k - 1] per axis: a max over the window
    # [r + off - k + 1, r + off] around every output cell r
    k, off = mask_length, mask_length // 2
    pad = (k - 1 - off, off) * dims
    if dims == 1:
        mask = F.max_pool1d(F.pad(centres.view(B, 1, L), pad), kernel_size=k, stride=1)
    else:
        mask = F.max_pool2d(F.pad(centres.view(B, 1, *grid), pad), kernel_size=k, stride=1)
    mask = mask.reshape(B, L)

    if require_same_masks:
        target = int(L * p)
        # marked steps rank above unmarked ones, random order within each group: the top
        # `target` keep a random subset of the marked ones or add random unmarked ones
        noise = torch.rand(B, L, device=device, generator=generator)
        keep = (mask + noise).topk(target, dim=1).indices
        mask = torch.zeros_like(mask).scatter_(1, keep, 1.0)

    if inverse_mask:
        mask = 1 - mask
    return mask.to(torch.uint8)


def block_mask_2d(batch_size: int, grid_h: int, grid_w: int, mask_prob: float, mask_length: int, mask_prob_adjust: float = 0.0,
                  inverse_mask: bool = False, require_same_masks: bool = True, mask_dropout: float = 0.0, device=None,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """:func:`block_mask` over a ``grid_h x grid_w`` patch grid (patch index ``r * grid_w + c``)."""
    return block_mask(batch_size, (grid_h, grid_w), mask_prob, mask_length, mask_prob_adjust, inverse_mask,
                      require_same_masks, mask_dropout, device, generator)


def num_masked_patches(num_patches: int, mask_prob: float, inverse_mask: bool) -> int:
    """How many steps :func:`block_mask` hides per row with ``require_same_masks``."""
    if inverse_mask:
        return num_patches - int(num_patches * (1 - mask_prob))
    return int(num_patches * mask_prob)
