"""What every modality encoder shares: local features -> masking -> prenet, and decoder input.

A modality encoder turns raw input (token ids, waveform, image) into a (B, T, C)
sequence for the shared transformer. In training it also masks: the student keeps
only the visible steps (``remove_masked``), and :meth:`decoder_input` later puts noise
vectors back at the masked steps so the decoder can predict targets there.
"""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.modules import GradMultiply
from omegaconf import II

from ..alibi import AlibiCache, apply_alibi_scale, extend_learned_bias, initial_alibi_bias, make_alibi_scale
from ..block_masking import block_mask
from ..blocks import BlockStack
from ..decoders import DecoderConfig
from ..masking import (
    MaskInfo,
    MaskSeed,
    channel_mask,
    clone_seed,
    gather_alibi,
    gather_steps,
    mask_generator,
    mask_info_from_mask,
    span_mask,
    token_mask,
)


@dataclass
class ModalityConfig(FairseqDataclass):
    prenet_depth: int = field(default=4, metadata={"help": "transformer blocks private to this modality, before the shared ones"})
    prenet_layerdrop: float = field(default=0.0, metadata={"help": "probability of skipping a prenet block in training"})
    prenet_dropout: float = field(default=0.0, metadata={"help": "dropout on the prenet input"})
    start_drop_path_rate: float = field(default=0.0, metadata={"help": "stochastic depth of the first prenet block"})
    end_drop_path_rate: float = field(default=0.0, metadata={"help": "stochastic depth of the last prenet block"})
    num_extra_tokens: int = field(default=0, metadata={"help": "learned tokens prepended to the sequence (1 = a CLS token)"})
    init_extra_token_zero: bool = field(default=True, metadata={"help": "initialise the first extra token at zero"})
    mask_noise_std: float = field(default=0.01, metadata={"help": "std of the noise the decoder sees at masked steps"})
    mask_prob_min: Optional[float] = field(default=None, metadata={"help": "if set, draw mask_prob uniformly from [mask_prob_min, mask_prob] per batch"})
    mask_prob: float = field(default=0.7, metadata={"help": "fraction of steps hidden from the student"})
    inverse_mask: bool = field(default=False, metadata={"help": "spans/blocks mark the visible steps instead of the hidden ones"})
    mask_prob_adjust: float = field(default=0.0, metadata={"help": "raise the span start probability to compensate for overlapping spans"})
    keep_masked_pct: float = field(default=0.0, metadata={"help": "the student also sees this fraction of the masked steps (still predicted); 0 = it sees none"})
    mask_length: int = field(default=5, metadata={"help": "span length; 1 masks independent steps"})
    add_masks: bool = field(default=False, metadata={"help": "span masks (fairseq compute_mask_indices): top rows up with extra masked steps instead of unmasking to equalise the counts"})
    mask_dropout: float = field(default=0.0, metadata={"help": "span and block masks: fraction of each row's masked steps randomly unmasked again"})
    encoder_zero_mask: bool = field(default=True, metadata={"help": "masked steps are zeros where the full-length sequence is used (speech conv positions); false = noise of std mask_noise_std"})
    mask_channel_prob: float = field(default=0.0, metadata={"help": "where masked steps are zeroed (speech): probability of starting a span of zeroed channels, for the whole row"})
    mask_channel_length: int = field(default=64, metadata={"help": "length of each zeroed channel span (mask_channel_prob)"})
    ema_local_encoder: bool = field(default=False, metadata={"help": "with ema_encoder_only=false: the teacher has its own (EMA) copy of the local encoder"})
    local_grad_mult: float = field(default=1.0, metadata={"help": "gradient multiplier for the local encoder (0 freezes it)"})
    use_alibi_encoder: bool = field(default=False, metadata={"help": "add ALiBi attention biases (1-D for speech and text, 2-D over the patch grid for images)"})
    learned_alibi: bool = field(default=False, metadata={"help": "learn the ALiBi bias itself, initialised with ALiBi values for alibi_max_pos steps (needs use_alibi_encoder)"})
    alibi_max_pos: Optional[int] = field(default=None, metadata={"help": "steps covered by a learned ALiBi bias; longer 1-D inputs repeat its edge values"})
    alibi_scale: float = field(default=1.0, metadata={"help": "initial ALiBi scale"})
    learned_alibi_scale: bool = field(default=False, metadata={"help": "learn the ALiBi scale"})
    learned_alibi_scale_per_head: bool = field(default=False, metadata={"help": "one ALiBi scale per head"})
    learned_alibi_scale_per_layer: bool = field(default=False, metadata={"help": "one ALiBi scale per layer"})
    num_alibi_heads: int = field(default=II("model.num_heads"), metadata={"help": "heads that receive an ALiBi bias"})
    model_depth: int = field(default=II("model.depth"), metadata={"help": "depth of the shared encoder (for per-layer ALiBi scales)"})
    decoder: Optional[DecoderConfig] = field(default_factory=DecoderConfig, metadata={"help": "the decoder that predicts targets at masked steps"})


class ModalityEncoder(nn.Module):
    """Base class; subclasses build ``local_encoder`` and may override the hooks below.

    Hooks: ``positions`` (fixed positions added before masking), ``alibi_geometry``,
    ``compute_mask``, ``convert_padding_mask``, ``reset_parameters``. A subclass may set
    ``relative_positional_encoder``: a module run on the full masked sequence (zeros at
    hidden steps), e.g. a conv positional encoder, whose output is added to ``x``.
    ALiBi (``alibi_scale``, a learned ``alibi_bias``) is built here for every modality.
    """

    def __init__(self, cfg: ModalityConfig, embed_dim: int, make_block, norm_layer, layer_norm_first: bool):
        super().__init__()
        self.modality_cfg = cfg
        self.embed_dim = embed_dim
        self.project_features = nn.Identity()
        dpr = np.linspace(cfg.start_drop_path_rate, cfg.end_drop_path_rate, cfg.prenet_depth)
        self.context_encoder = BlockStack(
            nn.ModuleList(make_block(float(dpr[i])) for i in range(cfg.prenet_depth)),
            norm_layer(embed_dim) if not layer_norm_first and cfg.prenet_depth > 0 else None,
            layer_norm_first,
            cfg.prenet_layerdrop,
            cfg.prenet_dropout if cfg.prenet_depth > 0 else 0.0,
        )
        self.extra_tokens = None
        if cfg.num_extra_tokens > 0:
            self.extra_tokens = nn.Parameter(torch.zeros(1, cfg.num_extra_tokens, embed_dim))
            if not cfg.init_extra_token_zero:
                nn.init.normal_(self.extra_tokens)
            elif cfg.num_extra_tokens > 1:
                nn.init.normal_(self.extra_tokens[:, 1:])
        self.decoder = None  # built by subclasses once their geometry is known
        self.relative_positional_encoder = None
        self._build_alibi(cfg)

    def _build_alibi(self, cfg: ModalityConfig) -> None:
        self.alibi_scale = None
        self.alibi_bias = None  # learned_alibi: the bias itself is a parameter (Meta's key name)
        self._alibi = AlibiCache()
        if not cfg.use_alibi_encoder:
            if cfg.learned_alibi:
                raise ValueError("learned_alibi needs use_alibi_encoder=true")
            return
        self.alibi_scale = make_alibi_scale(
            cfg.prenet_depth + cfg.model_depth,
            cfg.num_alibi_heads,
            cfg.alibi_scale,
            learned=cfg.learned_alibi_scale,
            per_layer=cfg.learned_alibi_scale_per_layer,
            per_head=cfg.learned_alibi_scale_per_head,
        )
        if cfg.learned_alibi:
            if not cfg.alibi_max_pos:
                raise ValueError("learned_alibi needs alibi_max_pos (the number of steps the learned bias covers)")
            dims, distance = self.alibi_geometry()
            self.alibi_bias = nn.Parameter(initial_alibi_bias(cfg.num_alibi_heads, cfg.alibi_max_pos, dims, distance))

    # ---- hooks -----------------------------------------------------------------------
    def reset_parameters(self):
        """Re-initialise modality-specific layers after the model-wide BERT init."""

    def positions(self, x, padding_mask):
        return None

    def alibi_geometry(self) -> Tuple[int, str]:
        """(dims, distance) of this modality's ALiBi: 1-D over time unless overridden."""
        return 1, "manhattan"

    def convert_padding_mask(self, x, padding_mask):
        return padding_mask

    def mask_prob(self) -> float:
        """This batch's mask probability: ``mask_prob``, or a draw from [mask_prob_min, mask_prob]."""
        cfg = self.modality_cfg
        if cfg.mask_prob_min is not None and 0 <= cfg.mask_prob_min < cfg.mask_prob:
            return float(np.random.uniform(cfg.mask_prob_min, cfg.mask_prob))
        return cfg.mask_prob

    def compute_mask(self, B: int, T: int, padding_mask, device, generator: Optional[torch.Generator]) -> Optional[MaskInfo]:
        """Draw a mask for (B, T) steps, or None when nothing is masked."""
        cfg = self.modality_cfg
        mask_prob = self.mask_prob()
        if mask_prob <= 0:
            return None
        if cfg.mask_length == 1:
            return token_mask(B, T, mask_prob, device, generator, cfg.keep_masked_pct)
        return span_mask(
            B, T, padding_mask, mask_prob, cfg.mask_length, device, generator, cfg.inverse_mask,
            mask_dropout=cfg.mask_dropout, add_masks=cfg.add_masks, keep_masked_pct=cfg.keep_masked_pct,
        )

    def block_mask_info(self, B: int, grid: Tuple[int, ...], mask_prob: float, device, generator) -> MaskInfo:
        """Block masks over ``grid`` ((T,) frames or (H, W) patches) with this modality's settings."""
        cfg = self.modality_cfg
        mask = block_mask(
            B,
            grid,
            mask_prob=mask_prob,
            mask_length=cfg.mask_length,
            mask_prob_adjust=cfg.mask_prob_adjust,
            inverse_mask=cfg.inverse_mask,
            require_same_masks=True,
            mask_dropout=cfg.mask_dropout,
            device=device,
            generator=generator,
        )
        return mask_info_from_mask(mask, cfg.keep_masked_pct)

    # ---- ALiBi -----------------------------------------------------------------------
    def alibi(self, batch_size: int, time_steps: int, device):
        """``(bias (B, H, T, T) float32, per-layer scale or None)``, or ``(None, None)`` without ALiBi."""
        if self.alibi_scale is None:
            return None, None
        cfg = self.modality_cfg
        dims, distance = self.alibi_geometry()
        if self.alibi_bias is not None:
            if dims == 2 and self.alibi_bias.size(-1) != time_steps:
                raise ValueError(f"a learned 2-D ALiBi bias covers {self.alibi_bias.size(-1)} patches, got {time_steps}")
            bias = extend_learned_bias(self.alibi_bias.float(), 1, time_steps)
        else:
            bias = self._alibi.get(1, time_steps, cfg.num_alibi_heads, device, dims, distance)
        bias, scale = apply_alibi_scale(bias, self.alibi_scale.float())
        return bias.expand(batch_size, -1, -1, -1), scale

    # ---- forward ---------------------------------------------------------------------
    def local_features(self, source):
        mult = self.modality_cfg.local_grad_mult
        if mult <= 0:
            with torch.no_grad():
                x = self.local_encoder(source)
        else:
            x = self.local_encoder(source)
            if mult != 1.0:
                x = GradMultiply.apply(x, mult)
        return self.project_features(x)

    def forward(self, source, padding_mask, mask: bool, remove_masked: bool, clone_batch: int = 1,
                mask_seed: Optional[MaskSeed] = None, precomputed_mask: Optional[torch.Tensor] = None):
        return self.contextualized_features(
            self.local_features(source), padding_mask, mask, remove_masked, clone_batch, mask_seed, precomputed_mask
        )

    def apply_mask(self, x, mask_info: Optional[MaskInfo]):
        """The full-length sequence the student's conv positions see: masked steps zeroed (or
        noise, ``encoder_zero_mask=false``), optionally whole channel spans zeroed."""
        cfg = self.modality_cfg
        if mask_info is not None:
            m = mask_info.mask.to(torch.bool).unsqueeze(-1)
            if cfg.encoder_zero_mask:
                x = x * (~m).to(x.dtype)
            else:
                x = torch.where(m, torch.randn_like(x) * cfg.mask_noise_std, x)
        if cfg.mask_channel_prob > 0:
            B, T, C = x.shape
            x = x.masked_fill(channel_mask(B, T, C, cfg.mask_channel_prob, cfg.mask_channel_length, x.device), 0)
        return x

    def contextualized_features(self, x, padding_mask, mask: bool, remove_masked: bool, clone_batch: int = 1,
                                mask_seed: Optional[MaskSeed] = None, precomputed_mask: Optional[torch.Tensor] = None):
        """Local features (B, T, C) -> masked, prenet-encoded sequence for the shared blocks.

        ``precomputed_mask`` (B * clone_batch, T), 1 = masked, replaces drawing a mask (rows in
        ``repeat_interleave`` order: sample 0 clone 0, sample 0 clone 1, ...).
        Returns a dict: ``x``, ``local_features`` (the unmasked input, for the teacher),
        ``padding_mask``, ``alibi_bias``, ``alibi_scale``, ``encoder_mask`` (MaskInfo or None),
        ``full_padding_mask`` (padding of every step, before the student's steps are gathered).
        """
        if padding_mask is not None:
            padding_mask = self.convert_padding_mask(x, padding_mask)
        local_features = x
        B, T, _ = x.shape

        pos = self.positions(x, padding_mask)
        if pos is not None:
            x = x + pos

        mask_info = None
        if mask:
            if clone_batch > 1:
                x = x.repeat_interleave(clone_batch, 0)
                if padding_mask is not None:
                    padding_mask = padding_mask.repeat_interleave(clone_batch, 0)
            if precomputed_mask is not None:
                if tuple(precomputed_mask.shape) != (x.size(0), T):
                    raise ValueError(
                        f"precomputed_mask has shape {tuple(precomputed_mask.shape)}, expected (batch * clone_batch, steps) "
                        f"= {(x.size(0), T)}"
                    )
                mask_info = mask_info_from_mask(precomputed_mask.to(x.device), self.modality_cfg.keep_masked_pct)
            else:
                generator = mask_generator(clone_seed(mask_seed, clone_batch), x.device)
                mask_info = self.compute_mask(x.size(0), T, padding_mask, x.device, generator)
        full_padding_mask = padding_mask

        rel_encoder = self.relative_positional_encoder
        if mask and (rel_encoder is not None or not remove_masked):
            x = self.apply_mask(x, mask_info)
        rel = rel_encoder(x) if rel_encoder is not None else None

        if mask_info is not None and remove_masked:
            x = gather_steps(x, mask_info.ids_keep)
            if rel is not None:
                x = x + gather_steps(rel, mask_info.ids_keep)
            if padding_mask is not None and padding_mask.any():
                padding_mask = gather_steps(padding_mask, mask_info.ids_keep)
                if not padding_mask.any():
                    padding_mask = None
            else:
                padding_mask = None
        elif rel is not None:
            x = x + rel

        alibi_bias, alibi_scale = self.alibi(B, T, x.device)
        if alibi_bias is not None:
            if clone_batch > 1 and mask:
                alibi_bias = alibi_bias.repeat_interleave(clone_batch, 0)
            if mask_info is not None and remove_masked:
                alibi_bias = gather_alibi(alibi_bias, mask_info.ids_keep)

        if self.extra_tokens is not None:
            n = self.extra_tokens.size(1)
            x = torch.cat([self.extra_tokens.expand(x.size(0), -1, -1).to(x.dtype), x], dim=1)
            if padding_mask is not None:
                padding_mask = F.pad(padding_mask, (n, 0))
            if alibi_bias is not None:
                alibi_bias = F.pad(alibi_bias, (n, 0, n, 0))

        prenet_depth = self.modality_cfg.prenet_depth
        prenet_scale = alibi_scale[:prenet_depth] if alibi_scale is not None else None
        x = self.context_encoder(x, padding_mask, alibi_bias, prenet_scale)
        if alibi_scale is not None and alibi_scale.size(0) > 1:
            alibi_scale = alibi_scale[prenet_depth:]
        return {
            "x": x,
            "local_features": local_features,
            "padding_mask": padding_mask,
            "full_padding_mask": full_padding_mask,
            "alibi_bias": alibi_bias,
            "alibi_scale": alibi_scale,
            "encoder_mask": mask_info,
        }

    def decoder_input(self, x, mask_info: Optional[MaskInfo]):
        """Encoder output on visible steps -> full-length sequence with noise at masked steps."""
        cfg = self.modality_cfg
        x = F.dropout(x, cfg.decoder.input_dropout, training=self.training)
        x = x[:, cfg.num_extra_tokens :]
        if mask_info is None:
            return x
        num_masked = mask_info.ids_restore.size(1) - x.size(1)
        noise = x.new_empty(x.size(0), num_masked, x.size(-1)).normal_(0, cfg.mask_noise_std)
        x = gather_steps(torch.cat([x, noise], dim=1), mask_info.ids_restore)
        pos = None
        if cfg.decoder.add_positions_masked or cfg.decoder.add_positions_all:
            pos = self.positions(x, None)
            if pos is None:
                raise ValueError("decoder.add_positions_* needs a modality with fixed positions")
        if cfg.decoder.add_positions_masked:
            x = x + pos * mask_info.mask.to(x.dtype).unsqueeze(-1)
        if cfg.decoder.add_positions_all:
            x = x + pos
        return x

    def remove_pretraining_modules(self):
        self.decoder = None
        self._alibi.clear()
