"""Masks for the student: which time steps it sees and which it must predict.

Every function returns a :class:`MaskInfo` whose ``mask`` is 1 at masked (hidden) steps.
All rows of a batch keep the same number of steps, so the student can run on the
gathered visible steps only, without padding.
"""

from typing import NamedTuple, Optional

import numpy as np
import torch
from fairseq.data.data_utils import compute_mask_indices


class MaskInfo(NamedTuple):
    mask: torch.Tensor  # (B, T), 1 = masked / predicted by the decoder
    ids_restore: torch.Tensor  # (B, T): position of each original step in [visible, masked] order
    ids_keep: torch.Tensor  # (B, T_keep): indices of the visible steps, in order of appearance


class MaskSeed(NamedTuple):
    """Makes masks reproducible: the same sample ids at the same update give the same mask."""

    seed: int
    update: int
    ids: torch.Tensor


def _generator(seed: Optional[MaskSeed], device) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed.seed, seed.update, int(seed.ids.sum().item()))) % (2**31))
    return g


def token_mask(B: int, T: int, mask_prob: float, device, seed: Optional[MaskSeed] = None) -> MaskInfo:
    """Mask ``int(T * mask_prob)`` independently chosen steps per row (data2vec 2.0 text)."""
    len_keep = int(T * (1 - mask_prob))
    noise = torch.rand(B, T, generator=_generator(seed, device), device=device)
    ids_shuffle = noise.argsort(dim=1)  # lowest noise is kept
    mask = torch.ones(B, T, device=device)
    mask.scatter_(1, ids_shuffle[:, :len_keep], 0.0)
    return mask_info_from_mask(mask)


def span_mask(
    B: int,
    T: int,
    padding_mask: Optional[torch.Tensor],
    mask_prob: float,
    mask_length: int,
    device,
    seed: Optional[MaskSeed] = None,
    inverse: bool = False,
) -> MaskInfo:
    """Spans of ``mask_length`` steps starting at ``mask_prob`` of the positions (wav2vec 2.0 style).

    With ``inverse`` the spans mark what stays visible. Rows get the same mask count.
    """
    prob = 1 - mask_prob if inverse else mask_prob
    mask = compute_mask_indices(
        (B, T),
        padding_mask,
        prob,
        mask_length,
        min_masks=1,
        require_same_masks=True,
        seed=seed.seed if seed is not None else None,
        epoch=seed.update if seed is not None else None,
        indices=seed.ids if seed is not None else None,
    )
    mask = torch.from_numpy(np.asarray(mask)).to(device)
    if inverse:
        mask = ~mask
    return mask_info_from_mask(mask)


def mask_info_from_mask(mask: torch.Tensor) -> MaskInfo:
    """Build a MaskInfo from a (B, T) mask with the same number of masked steps in every row."""
    mask = mask.to(torch.uint8)
    num_masked = mask.sum(dim=1)
    if (num_masked != num_masked[0]).any():
        raise ValueError("every row of a mask must hide the same number of steps")
    # stable sort: visible steps keep their order, masked ones follow
    ids_shuffle = mask.argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1)
    len_keep = mask.size(1) - int(num_masked[0])
    return MaskInfo(mask=mask, ids_restore=ids_restore, ids_keep=ids_shuffle[:, :len_keep])


def gather_steps(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) -> x at ids (B, T') along dim 1."""
    index = ids.view(*ids.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


def gather_alibi(alibi_bias: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Restrict a (B, H, T, T) attention bias to the visible steps on both axes."""
    B, H, T, _ = alibi_bias.shape
    rows = ids_keep[:, None, :, None].expand(-1, H, -1, T)
    bias = torch.gather(alibi_bias, 2, rows)
    cols = ids_keep[:, None, None, :].expand(-1, H, bias.size(2), -1)
    return torch.gather(bias, 3, cols)
