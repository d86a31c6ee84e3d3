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


def beit_block_mask(
    batch_size: int,
    grid_h: int,
    grid_w: int,
    num_mask_patches: int,
    min_patches_per_block: int = 16,
    max_patches_per_block: Optional[int] = None,
    min_aspect: float = 0.3,
    max_aspect: Optional[float] = None,
    device=None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """BEiT's block masking (data2vec 1.0 vision): a (B, grid_h * grid_w) bool mask, True = masked.

    Per image, rectangles are added until ``num_mask_patches`` patches are masked or no
    rectangle fits. Each rectangle: an area drawn uniformly from ``[min_patches_per_block,
    m]`` with ``m = min(patches still to mask, max_patches_per_block)``, a log-uniform
    aspect ratio in ``[min_aspect, max_aspect]`` (default ``1 / min_aspect``), rounded to
    ``h x w`` with ``h < grid_h`` and ``w < grid_w``, at a uniform position; it is taken
    when it adds between 1 and ``m`` new patches (so an image never exceeds
    ``num_mask_patches``). Up to 10 tries per rectangle; an image whose 10 tries all fail
    stops there, so counts may differ between images and fall short of the target.

    These are the semantics of BEiT's ``MaskingGenerator`` and of Meta's
    ``Data2VecVisionModel.make_mask``, which draw from Python's unseeded ``random``; here
    every number comes from ``generator`` (one ``torch.rand`` call per batch), so a mask is
    reproducible (:func:`d2v_plugin.models.masking.mask_generator`).
    """
    import math

    if max_patches_per_block is None:
        max_patches_per_block = num_mask_patches
    if max_aspect is None:
        max_aspect = 1 / min_aspect
    if not 0 < min_aspect <= max_aspect:
        raise ValueError(f"aspect ratios need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
    if num_mask_patches < 0 or num_mask_patches > grid_h * grid_w:
        raise ValueError(f"num_mask_patches={num_mask_patches} must lie in [0, {grid_h * grid_w}] (the patch grid)")
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    tries = 10
    # each rectangle adds >= 1 patch, so an image needs at most num_mask_patches rectangles
    draws = max(num_mask_patches, 1) * tries
    masks = torch.zeros(batch_size, grid_h, grid_w, dtype=torch.bool)
    # every random number of the batch in one call (one device sync), consumed in order
    uniforms = torch.rand(batch_size, draws, 4, generator=generator,
                          device=generator.device if generator is not None else None).tolist()
    for b in range(batch_size):
        u = iter(uniforms[b])
        mask = masks[b]
        count = 0
        while count < num_mask_patches:
            limit = min(num_mask_patches - count, max_patches_per_block)
            added = 0
            for _ in range(tries):
                u_area, u_aspect, u_top, u_left = next(u)
                area = min_patches_per_block + (limit - min_patches_per_block) * u_area
                aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect)
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if w < grid_w and h < grid_h:
                    top = min(int(u_top * (grid_h - h + 1)), grid_h - h)
                    left = min(int(u_left * (grid_w - w + 1)), grid_w - w)
                    block = mask[top : top + h, left : left + w]
                    new = h * w - int(block.sum())
                    if 0 < new <= limit:
                        block.fill_(True)
                        added = new
                        break
            if added == 0:
                break
            count += added
    return masks.view(batch_size, -1).to(device)
