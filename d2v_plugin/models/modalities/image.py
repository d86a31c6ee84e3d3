"""Image modality: conv patch embedding, fixed 2-D sin-cos positions, CLS token, block masks.

An image (B, C, H, W) becomes a sequence of ``(H / patch) * (W / patch)`` patch vectors
(row by row). Training hides most patches with inverse block masking (the visible
patches form a few square blocks) and the student encodes only the visible ones; a
2-D convolutional decoder over the patch grid predicts the teacher's representations
of the hidden ones. Parameter names follow Meta's checkpoints
(``local_encoder[.0].proj``, ``local_encoder.1``, ``fixed_positional_encoder.positions``,
``extra_tokens``, ``context_encoder``, ``decoder``, ``alibi_scale``).
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..alibi import ALIBI_DISTANCES
from ..blocks import BlockStack
from ..decoders import ConvDecoder
from ..masking import MaskInfo
from .base import ModalityConfig, ModalityEncoder

@dataclass
class ImageConfig(ModalityConfig):
    input_size: int = field(default=224, metadata={"help": "height and width of the (square) input images, in pixels"})
    in_chans: int = field(default=3, metadata={"help": "channels of the input images"})
    patch_size: int = field(default=16, metadata={"help": "side of the square patches the images are cut into"})
    embed_dim: int = field(
        default=768,
        metadata={"help": "width of the patch embedding; if it differs from model.embed_dim a linear layer projects it"},
    )
    alibi_dims: int = field(default=2, metadata={"help": "ALiBi over the 2-D patch grid (only 2 is supported for images)"})
    alibi_distance: str = field(default="manhattan", metadata={"help": "patch distance of the 2-D ALiBi bias: manhattan or euclidean"})
    fixed_positions: bool = field(default=True, metadata={"help": "add fixed 2-D sin-cos position embeddings to the patches"})
    transformer_decoder: bool = field(default=False, metadata={"help": "not supported (Meta's transformer decoder); must be false"})
    enc_dec_transformer: bool = field(default=False, metadata={"help": "not supported (Meta's encoder-decoder transformer); must be false"})


def sincos_positions_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed position embeddings, patches row by row.

    The first half of the channels encodes the column, the second half the row; each
    half is ``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 10000 ** (-i / (dim / 4))``
    (the MAE / data2vec layout). Computed in float64, returned as float32.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos positions need an embedding width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos):
        angles = pos.reshape(-1, 1) * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution: (B, C, H, W) -> (B, H/p * W/p, dim)."""

    def __init__(self, input_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.input_size = input_size
        self.in_chans = in_chans
        self.grid = (input_size // patch_size, input_size // patch_size)
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        if images.dim() != 4 or images.size(1) != self.in_chans or tuple(images.shape[2:]) != (self.input_size,) * 2:
            raise ValueError(
                f"expected images of shape (B, {self.in_chans}, {self.input_size}, {self.input_size}) "
                f"(model.modalities.image.in_chans / input_size), got {tuple(images.shape)}"
            )
        return self.proj(images).flatten(2).transpose(1, 2)


class FixedPositions(nn.Module):
    """Holds the (1, T, C) position table as a buffer: computed, never trained.

    It is saved in the state dict under ``positions`` because Meta's checkpoints store it
    there (as a frozen parameter); loading one keeps its values.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("positions", table.unsqueeze(0))

    def forward(self):
        return self.positions


class ImageEncoder(ModalityEncoder):
    modality_cfg: ImageConfig

    def __init__(self, cfg: ImageConfig, embed_dim: int, make_block, norm_layer, layer_norm_first: bool):
        if cfg.transformer_decoder or cfg.enc_dec_transformer:
            raise ValueError("model.modalities.image.transformer_decoder / enc_dec_transformer are not supported; use the conv decoder")
        if cfg.use_alibi_encoder and (cfg.alibi_dims != 2 or cfg.alibi_distance not in ALIBI_DISTANCES):
            raise ValueError(
                f"image ALiBi needs alibi_dims=2 and alibi_distance in {ALIBI_DISTANCES}, "
                f"got {cfg.alibi_dims} / {cfg.alibi_distance!r}"
            )
        super().__init__(cfg, embed_dim, make_block, norm_layer, layer_norm_first)

        patch_embed = PatchEmbed(cfg.input_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        w = patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.size(0), -1))  # as a linear layer over the flattened patch
        self.grid_h, self.grid_w = patch_embed.grid
        if cfg.embed_dim != embed_dim:
            self.local_encoder = nn.Sequential(patch_embed, nn.Linear(cfg.embed_dim, embed_dim))
        else:
            self.local_encoder = patch_embed

        self.fixed_positional_encoder = None
        if cfg.fixed_positions:
            self.fixed_positional_encoder = FixedPositions(sincos_positions_2d(embed_dim, self.grid_h, self.grid_w))

        if cfg.prenet_depth == 0:
            # without prenet blocks Meta's image encoder still has the prenet's LayerNorm
            # (post-norm models) and dropout, unlike text and audio
            self.context_encoder = BlockStack(
                nn.ModuleList(),
                norm_layer(embed_dim) if not layer_norm_first else None,
                layer_norm_first,
                cfg.prenet_layerdrop,
                cfg.prenet_dropout,
            )

        self.decoder = None
        if cfg.decoder is not None:
            self.decoder = ConvDecoder(cfg.decoder, embed_dim, dims=2, grid_h=self.grid_h, grid_w=self.grid_w)

    @property
    def num_patches(self) -> int:
        return self.grid_h * self.grid_w

    # ---- hooks -----------------------------------------------------------------------
    def positions(self, x, padding_mask):
        if self.fixed_positional_encoder is None:
            return None
        return self.fixed_positional_encoder().to(x.dtype)

    def alibi_geometry(self):
        return self.modality_cfg.alibi_dims, self.modality_cfg.alibi_distance

    def compute_mask(self, B: int, T: int, padding_mask, device, generator: Optional[torch.Generator]) -> Optional[MaskInfo]:
        cfg = self.modality_cfg
        if cfg.mask_length <= 1:
            return super().compute_mask(B, T, padding_mask, device, generator)
        if T != self.num_patches:
            raise ValueError(f"expected {self.num_patches} patches to mask, got {T}")
        mask_prob = self.mask_prob()
        if mask_prob <= 0:
            return None
        return self.block_mask_info(B, (self.grid_h, self.grid_w), mask_prob, device, generator)

    def reset_parameters(self):
        """Meta re-initialises the decoder's output projection with PyTorch's default Linear
        init after the model-wide BERT init; the model calls this once that init is done."""
        if self.decoder is not None:
            for mod in self.decoder.proj.modules():
                if isinstance(mod, nn.Linear):
                    mod.reset_parameters()
