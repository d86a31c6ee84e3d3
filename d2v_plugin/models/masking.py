"""Masks for the student: which time steps it sees and which it must predict.

Every function returns a :class:`MaskInfo` whose ``mask`` is 1 at masked (hidden) steps.
All rows of a batch keep the same number of steps, so the student can run on the
gathered visible steps only, without padding.

Reproducible masks have one source: :func:`mask_generator`, a ``torch.Generator`` seeded
from (``common.seed``, update, sample ids). Every mask drawer below takes that generator.
"""

from typing import NamedTuple, Optional

import numpy as np
import torch
from fairseq.data.data_utils import compute_mask_indices


class MaskInfo(NamedTuple):
    mask: torch.Tensor  # (B, T), 1 = masked / predicted by the decoder
    ids_restore: torch.Tensor  # (B, T): position of each original step in [kept, dropped] order
    ids_keep: torch.Tensor  # (B, T_keep): indices of the steps the student sees, in order of appearance


class MaskSeed(NamedTuple):
    """Makes masks reproducible: the same sample ids at the same update give the same mask."""

    seed: int
    update: int
    ids: torch.Tensor


def mask_generator(seed: Optional[MaskSeed], device) -> Optional[torch.Generator]:
    """The one seeding scheme of every mask: a generator keyed by (seed, update, sample ids).

    ``None`` (no seed) means the global RNG. The same batch at the same update (a replayed
    update, a resumed run) gets the same masks whatever happened before.
    """
    if seed is None:
        return None
    ids = tuple(int(i) for i in torch.as_tensor(seed.ids).flatten().tolist())
    g = torch.Generator(device=device)
    g.manual_seed(hash((int(seed.seed), int(seed.update), ids)) % (2**63 - 1))
    return g


def clone_seed(seed: Optional[MaskSeed], clone_batch: int) -> Optional[MaskSeed]:
    """The seed of a batch repeated ``clone_batch`` times: clone c of sample i gets id i * clone_batch + c."""
    if seed is None or clone_batch == 1:
        return seed
    ids = torch.as_tensor(seed.ids).repeat_interleave(clone_batch) * clone_batch
    ids = ids + torch.arange(clone_batch, device=ids.device).repeat(len(seed.ids))
    return seed._replace(ids=ids)


def token_mask(B: int, T: int, mask_prob: float, device, generator: Optional[torch.Generator] = None, keep_masked_pct: float = 0.0) -> MaskInfo:
    """Mask ``T - int(T * (1 - mask_prob))`` independently chosen steps per row (data2vec 2.0 text)."""
    len_keep = int(T * (1 - mask_prob))
    noise = torch.rand(B, T, generator=generator, device=device)
    ids_shuffle = noise.argsort(dim=1)  # lowest noise is kept
    mask = torch.ones(B, T, device=device)
    mask.scatter_(1, ids_shuffle[:, :len_keep], 0.0)
    return mask_info_from_mask(mask, keep_masked_pct)


def span_mask(
    B: int,
    T: int,
    padding_mask: Optional[torch.Tensor],
    mask_prob: float,
    mask_length: int,
    device,
    generator: Optional[torch.Generator] = None,
    inverse: bool = False,
    mask_dropout: float = 0.0,
    add_masks: bool = False,
    keep_masked_pct: float = 0.0,
) -> MaskInfo:
    """Spans of ``mask_length`` steps starting at ``mask_prob`` of the positions (wav2vec 2.0 style,
    fairseq ``compute_mask_indices``: ``mask_dropout`` unmasks that fraction of each row's
    spans again, ``add_masks`` then tops rows up to the same count).

    With ``inverse`` the spans mark what stays visible. Rows get the same mask count.
    """
    prob = 1 - mask_prob if inverse else mask_prob
    seed = _fairseq_seed(generator)
    mask = compute_mask_indices(
        (B, T),
        padding_mask,
        prob,
        mask_length,
        min_masks=1,
        require_same_masks=True,
        mask_dropout=mask_dropout,
        add_masks=add_masks,
        seed=seed,
        epoch=0 if seed is not None else None,
        indices=torch.arange(B) if seed is not None else None,
    )
    mask = torch.from_numpy(np.asarray(mask)).to(device)
    if inverse:
        mask = ~mask
    return mask_info_from_mask(mask, keep_masked_pct)


def mask_info_from_mask(mask: torch.Tensor, keep_masked_pct: float = 0.0) -> MaskInfo:
    """Build a MaskInfo from a (B, T) mask with the same number of masked steps in every row.

    ``keep_masked_pct``: the student also sees this fraction of the masked steps (the first
    ones in position order); they are still predicted (Meta's ``keep_masked_pct``).
    """
    mask = mask.to(torch.uint8)
    num_masked = mask.sum(dim=1)
    if (num_masked != num_masked[0]).any():
        raise ValueError(
            f"every row of a mask must hide the same number of steps, got {num_masked.tolist()} "
            "(a precomputed_mask is (B * clone_batch, T) with equal row sums)"
        )
    # stable sort: visible steps keep their order, masked ones follow
    ids_shuffle = mask.argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1)
    len_keep = mask.size(1) - int(num_masked[0])
    if keep_masked_pct > 0:
        len_keep += round((mask.size(1) - len_keep) * keep_masked_pct)
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


def _fairseq_seed(generator: Optional[torch.Generator]) -> Optional[int]:
    """fairseq's ``compute_mask_indices`` seeds numpy per row from (seed, epoch, index): its seed
    comes from our generator (None: numpy's global RNG)."""
    if generator is None:
        return None
    return int(torch.randint(1, 2**31 - 1, (1,), generator=generator, device=generator.device).item())


def channel_mask(B: int, T: int, C: int, prob: float, length: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, T, C) bool: spans of channels zeroed at every step of a row (Meta's ``mask_channel_prob``)."""
    seed = _fairseq_seed(generator)
    m = compute_mask_indices(
        (B, C), None, prob, length, seed=seed, epoch=0 if seed is not None else None,
        indices=torch.arange(B) if seed is not None else None,
    )
    return torch.from_numpy(np.asarray(m)).to(device).unsqueeze(1).expand(-1, T, -1)
