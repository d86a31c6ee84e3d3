"""Light convolutional decoders that predict the teacher's targets at masked steps.

Parameter names (``blocks.<i>.0`` for the convolutions, ``proj``) match Meta's
checkpoints.
"""

from dataclasses import dataclass, field

import torch.nn as nn
import torch.nn.functional as F

from fairseq.dataclass import FairseqDataclass


@dataclass
class DecoderConfig(FairseqDataclass):
    decoder_dim: int = field(default=384, metadata={"help": "channels of the decoder convolutions"})
    decoder_groups: int = field(default=16, metadata={"help": "groups of each decoder convolution"})
    decoder_kernel: int = field(default=5, metadata={"help": "kernel size of the decoder convolutions"})
    decoder_layers: int = field(default=5, metadata={"help": "number of convolution blocks"})
    input_dropout: float = field(default=0.1, metadata={"help": "dropout on the encoder output fed to the decoder"})
    add_positions_masked: bool = field(default=False, metadata={"help": "add fixed positions to the masked steps' inputs"})
    add_positions_all: bool = field(default=False, metadata={"help": "add fixed positions to every input step"})
    decoder_residual: bool = field(default=True, metadata={"help": "residual connections around the convolution blocks"})
    projection_layers: int = field(default=1, metadata={"help": "linear layers of the output projection"})
    projection_ratio: float = field(default=2.0, metadata={"help": "hidden width of the projection, times decoder_dim"})


class _ChannelLayerNorm(nn.Module):
    """LayerNorm without affine parameters over dim 1 (the channels) of a conv activation."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.layer_norm(x.movedim(1, -1), (self.dim,)).movedim(-1, 1)


class _TrimEnd(nn.Module):
    """Drop the extra last step an even kernel with padding k//2 produces (keeps length)."""

    def __init__(self, kernel: int, dims: int):
        super().__init__()
        self.trim = 1 if kernel % 2 == 0 else 0
        self.dims = dims

    def forward(self, x):
        if not self.trim:
            return x
        return x[..., :-1] if self.dims == 1 else x[..., :-1, :-1]


def _conv_block(in_dim: int, cfg: DecoderConfig, dims: int) -> nn.Sequential:
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    return nn.Sequential(
        conv(in_dim, cfg.decoder_dim, cfg.decoder_kernel, padding=cfg.decoder_kernel // 2, groups=cfg.decoder_groups),
        _TrimEnd(cfg.decoder_kernel, dims),
        _ChannelLayerNorm(cfg.decoder_dim),
        nn.GELU(),
    )


def _projection(cfg: DecoderConfig, out_dim: int) -> nn.Module:
    layers, dim = [], cfg.decoder_dim
    for i in range(cfg.projection_layers - 1):
        nxt = int(dim * cfg.projection_ratio) if i == 0 else dim
        layers += [nn.Linear(dim, nxt), nn.GELU()]
        dim = nxt
    layers.append(nn.Linear(dim, out_dim))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class ConvDecoder(nn.Module):
    """Stacked convolutions over time (``dims=1``) or over a patch grid (``dims=2``).

    Input and output are (B, T, C); for 2-D, T must equal ``grid_h * grid_w``.
    """

    def __init__(self, cfg: DecoderConfig, embed_dim: int, dims: int = 1, grid_h: int = 0, grid_w: int = 0):
        super().__init__()
        self.cfg = cfg
        self.dims = dims
        self.grid = (grid_h, grid_w)
        self.blocks = nn.Sequential(
            *[_conv_block(embed_dim if i == 0 else cfg.decoder_dim, cfg, dims) for i in range(cfg.decoder_layers)]
        )
        self.proj = _projection(cfg, embed_dim)

    def forward(self, x):
        B, T, C = x.shape
        x = x.transpose(1, 2)
        if self.dims == 2:
            x = x.reshape(B, C, *self.grid)
        residual = x
        for block in self.blocks:
            x = block(x)
            if self.cfg.decoder_residual and residual.shape == x.shape:
                x = x + residual
            residual = x
        x = x.reshape(B, x.size(1), T).transpose(1, 2)
        return self.proj(x)
