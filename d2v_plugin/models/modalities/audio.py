"""Speech modality: wav2vec 2.0 conv feature extractor, projection, conv positions, ALiBi.

Waveform (B, S) -> conv feature extractor (B, C', T) -> LayerNorm + Linear (B, T, C) ->
[span mask] -> + convolutional positional encoding -> LayerNorm + dropout -> shared blocks.

Parameter names (``local_encoder.conv_layers.*``, ``project_features.{1,2}``,
``relative_positional_encoder.*``, ``context_encoder.norm``, ``alibi_scale``,
``decoder.*``) are those of Meta's ``data2vec_multi`` speech checkpoints.
"""

import ast
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum
from fairseq.models.wav2vec.wav2vec2 import ConvFeatureExtractionModel
from fairseq.modules import SamePad, TransposeLast

from ..blocks import BlockStack
from ..decoders import ConvDecoder
from ..masking import MaskInfo
from .base import ModalityConfig, ModalityEncoder

EXTRACTOR_MODES = ChoiceEnum(["default", "layer_norm"])


@dataclass
class AudioConfig(ModalityConfig):
    extractor_mode: EXTRACTOR_MODES = field(
        default="layer_norm",
        metadata={"help": "normalisation in the conv feature extractor: 'layer_norm' after every conv layer, "
                  "or 'default' (wav2vec 2.0 base: one GroupNorm after the first layer)"},
    )
    feature_encoder_spec: str = field(
        default="[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
        metadata={"help": "conv feature extractor layers as a Python-style list of (channels, kernel, stride) tuples; "
                  "only list/tuple literals of integers, + and * are allowed (the default gives 50 frames per second at 16 kHz)"},
    )
    conv_pos_width: int = field(default=95, metadata={"help": "total receptive width of the convolutional positional encoder (split over conv_pos_depth layers, kernel = max(3, width // depth))"})
    conv_pos_groups: int = field(default=16, metadata={"help": "groups of each positional convolution"})
    conv_pos_depth: int = field(default=5, metadata={"help": "number of convolution layers of the positional encoder"})
    conv_pos_pre_ln: bool = field(default=False, metadata={"help": "LayerNorm (with affine parameters) before the positional encoder"})


def parse_conv_spec(spec: str) -> List[Tuple[int, int, int]]:
    """Evaluate a feature extractor spec such as ``"[(512, 10, 5)] + [(512, 3, 2)] * 4"``.

    Only integer literals, lists, tuples, ``+`` and ``*`` are accepted: the string may
    come from a downloaded checkpoint, so it is never passed to ``eval``.
    """

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Mult) and isinstance(left, (list, tuple)) != isinstance(right, (list, tuple)):
                if max(v for v in (left, right) if isinstance(v, int)) > 1000:
                    raise ValueError("repeat count too large")
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element {ast.dump(node)[:60]}")

    try:
        layers = value(ast.parse(spec.strip(), mode="eval"))
    except (SyntaxError, ValueError, TypeError) as e:
        raise ValueError(f"feature_encoder_spec {spec!r} is not a list of (channels, kernel, stride) tuples: {e}") from None
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"feature_encoder_spec {spec!r} must be a non-empty list of (channels, kernel, stride) tuples")
    for layer in layers:
        if not (isinstance(layer, tuple) and len(layer) == 3 and all(isinstance(v, int) and v > 0 for v in layer)):
            raise ValueError(f"feature_encoder_spec {spec!r}: {layer!r} is not a (channels, kernel, stride) tuple of positive integers")
    return layers


def conv_output_lengths(lengths: torch.Tensor, layers: List[Tuple[int, int, int]]) -> torch.Tensor:
    """Frames produced from ``lengths`` samples by unpadded convolutions (kernel, stride)."""
    lengths = lengths.long()
    for _, kernel, stride in layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp_min(0)


def conv_positional_encoder(embed_dim: int, width: int, depth: int, groups: int, pre_ln: bool) -> nn.Module:
    """``depth`` x (grouped conv -> LayerNorm without affine -> GELU) over time, on (B, T, C)."""
    k = max(3, width // depth)

    def layer():
        return nn.Sequential(
            nn.Conv1d(embed_dim, embed_dim, kernel_size=k, padding=k // 2, groups=groups),
            SamePad(k),
            TransposeLast(),
            nn.LayerNorm(embed_dim, elementwise_affine=False),
            TransposeLast(),
            nn.GELU(),
        )

    encoder = nn.Sequential(TransposeLast(), *[layer() for _ in range(depth)], TransposeLast())
    if pre_ln:
        encoder = nn.Sequential(nn.LayerNorm(embed_dim), encoder)
    return encoder


class AudioEncoder(ModalityEncoder):
    modality_cfg: AudioConfig

    def __init__(self, cfg: AudioConfig, embed_dim: int, make_block, norm_layer, layer_norm_first: bool):
        super().__init__(cfg, embed_dim, make_block, norm_layer, layer_norm_first)
        self.feature_enc_layers = parse_conv_spec(cfg.feature_encoder_spec)
        feature_dim = self.feature_enc_layers[-1][0]
        self.local_encoder = ConvFeatureExtractionModel(
            conv_layers=self.feature_enc_layers, dropout=0.0, mode=str(cfg.extractor_mode), conv_bias=False
        )
        self.project_features = nn.Sequential(
            TransposeLast(), nn.LayerNorm(feature_dim), nn.Linear(feature_dim, embed_dim)
        )
        if cfg.conv_pos_depth > 0:
            if embed_dim % cfg.conv_pos_groups != 0:
                raise ValueError(f"embed_dim {embed_dim} is not divisible by conv_pos_groups {cfg.conv_pos_groups}")
            self.relative_positional_encoder = conv_positional_encoder(
                embed_dim, cfg.conv_pos_width, cfg.conv_pos_depth, cfg.conv_pos_groups, cfg.conv_pos_pre_ln
            )
        # Speech normalises (post-norm models) and drops out the projected features even
        # without prenet blocks (Meta's audio encoder); reuse the prenet blocks built above.
        self.context_encoder = BlockStack(
            self.context_encoder.blocks,
            norm_layer(embed_dim) if not layer_norm_first else None,
            layer_norm_first,
            cfg.prenet_layerdrop,
            cfg.prenet_dropout,
        )
        self.decoder = ConvDecoder(cfg.decoder, embed_dim, dims=1) if cfg.decoder is not None else None


    def reset_parameters(self):
        """PyTorch's default init for the projections (Meta re-initialises them after BERT init)."""
        for mod in self.project_features.modules():
            if isinstance(mod, nn.Linear):
                mod.reset_parameters()
        if self.decoder is not None:
            for mod in self.decoder.proj.modules():
                if isinstance(mod, nn.Linear):
                    mod.reset_parameters()

    # ---- hooks -----------------------------------------------------------------------
    def convert_padding_mask(self, x, padding_mask):
        """Sample-level padding (B, S) -> frame-level padding (B, T) from the conv arithmetic."""
        lengths = conv_output_lengths((~padding_mask.bool()).sum(-1), self.feature_enc_layers)
        frames = torch.arange(x.size(1), device=x.device)
        return frames[None, :] >= lengths[:, None]

    def compute_mask(self, B: int, T: int, padding_mask, device, generator: Optional[torch.Generator]) -> Optional[MaskInfo]:
        """Block masks as in Meta's speech recipe (the dataset's ``compute_block_mask_1d``).

        Span centres are drawn at rate ``(mask_prob + mask_prob_adjust) / mask_length``
        (the adjustment compensates for overlapping spans), then random steps are
        unmasked or masked until exactly ``int(T * mask_prob)`` steps of every row are
        hidden. Like Meta's, the masks ignore padding; the loss never counts padded frames.
        """
        mask_prob = self.mask_prob()
        if mask_prob <= 0:
            return None
        return self.block_mask_info(B, (T,), mask_prob, device, generator)
