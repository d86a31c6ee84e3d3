"""2-D block masks over a grid of image patches (data2vec 2.0 images).

Semantics of Meta's ``compute_block_mask_2d`` (fairseq ``data_utils``), in its default
mode (overlapping blocks, no neighbour expansion):

1. With ``inverse_mask`` the blocks mark what stays *visible*: the block probability
   becomes ``1 - mask_prob``.
2. ``int(L * (p + mask_prob_adjust) / mask_length**2 * (1 + mask_dropout))`` block
   centres are drawn uniformly (with replacement) from the ``L = H * W`` patches; each
   grows into a ``mask_length x mask_length`` square (offset ``mask_length // 2``,
   cut at the grid's border).
3. ``require_same_masks``: every row is brought to exactly ``int(L * p)`` marked
   patches by unmarking random marked ones or marking random unmarked ones.
4. With ``inverse_mask`` the result is flipped, so 1 = hidden from the student.

This implementation is vectorised over the batch (a max-pool grows the centres into
blocks; a random top-k equalises the counts) and runs on any device with an optional
``torch.Generator`` for reproducible masks.
"""

from typing import Optional

import torch
import torch.nn.functional as F


def block_mask_2d(
    batch_size: int,
    grid_h: int,
    grid_w: int,
    mask_prob: float,
    mask_length: int,
    mask_prob_adjust: float = 0.0,
    inverse_mask: bool = False,
    require_same_masks: bool = True,
    mask_dropout: float = 0.0,
    device=None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A (B, grid_h * grid_w) uint8 mask, 1 = masked (hidden from the student).

    Patches are numbered row by row (index ``r * grid_w + c``), the order of a
    flattened patch embedding.
    """
    if mask_length < 2:
        raise ValueError(f"block masks need mask_length >= 2 (got {mask_length}); use a token mask for 1")
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in [0, 1], got {mask_prob}")
    B, L = batch_size, grid_h * grid_w
    p = 1 - mask_prob if inverse_mask else mask_prob

    num_centres = int(L * ((p + mask_prob_adjust) / mask_length**2) * (1 + mask_dropout))
    centres = torch.zeros(B, L, device=device)
    if num_centres > 0:
        idx = torch.randint(0, L, (B, num_centres), device=device, generator=generator)
        centres.scatter_(1, idx, 1.0)

    # grow each centre c into rows/cols [c - off, c - off + k - 1]: a max over the window
    # [r + off - k + 1, r + off] around every output cell r
    k, off = mask_length, mask_length // 2
    grid = F.pad(centres.view(B, 1, grid_h, grid_w), (k - 1 - off, off, k - 1 - off, off))
    mask = F.max_pool2d(grid, kernel_size=k, stride=1).view(B, L)

    if require_same_masks:
        target = int(L * p)
        # marked patches rank above unmarked ones, random order within each group: the
        # top `target` keep a random subset of the marked ones or add random unmarked ones
        noise = torch.rand(B, L, device=device, generator=generator)
        keep = (mask + noise).topk(target, dim=1).indices
        mask = torch.zeros_like(mask).scatter_(1, keep, 1.0)

    if inverse_mask:
        mask = 1 - mask
    return mask.to(torch.uint8)


def num_masked_patches(num_patches: int, mask_prob: float, inverse_mask: bool) -> int:
    """How many patches :func:`block_mask_2d` hides per row with ``require_same_masks``."""
    if inverse_mask:
        return num_patches - int(num_patches * (1 - mask_prob))
    return int(num_patches * mask_prob)
