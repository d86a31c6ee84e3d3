"""What every modality encoder shares: local features -> masking -> prenet, and decoder input.

A modality encoder turns raw input (token ids, waveform, image) into a (B, T, C)
sequence for the shared transformer. In training it also masks: the student keeps
only the visible steps (``remove_masked``), and :meth:`decoder_input` later puts noise
vectors back at the masked steps so the decoder can predict targets there.
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.modules import GradMultiply
from omegaconf import II

from ..blocks import BlockStack
from ..decoders import DecoderConfig
from ..masking import MaskInfo, MaskSeed, gather_alibi, gather_steps, span_mask, token_mask


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
    mask_length: int = field(default=5, metadata={"help": "span length; 1 masks independent steps"})
    mask_dropout: float = field(default=0.0, metadata={"help": "speech/image block masks: fraction of each mask's steps randomly unmasked again"})
    ema_local_encoder: bool = field(default=False, metadata={"help": "with ema_encoder_only=false: the teacher has its own (EMA) copy of the local encoder"})
    local_grad_mult: float = field(default=1.0, metadata={"help": "gradient multiplier for the local encoder (0 freezes it)"})
    use_alibi_encoder: bool = field(default=False, metadata={"help": "add ALiBi attention biases"})
    alibi_scale: float = field(default=1.0, metadata={"help": "initial ALiBi scale"})
    learned_alibi_scale: bool = field(default=False, metadata={"help": "learn the ALiBi scale"})
    learned_alibi_scale_per_head: bool = field(default=False, metadata={"help": "one ALiBi scale per head"})
    learned_alibi_scale_per_layer: bool = field(default=False, metadata={"help": "one ALiBi scale per layer"})
    num_alibi_heads: int = field(default=II("model.num_heads"), metadata={"help": "heads that receive an ALiBi bias"})
    model_depth: int = field(default=II("model.depth"), metadata={"help": "depth of the shared encoder (for per-layer ALiBi scales)"})
    decoder: Optional[DecoderConfig] = field(default_factory=DecoderConfig, metadata={"help": "the decoder that predicts targets at masked steps"})


class ModalityEncoder(nn.Module):
    """Base class; subclasses build ``local_encoder`` and may override the hooks below.

    Hooks: ``positions`` (fixed positions added before masking), ``alibi_bias``,
    ``compute_mask``, ``convert_padding_mask``, ``reset_parameters``. A subclass may set
    ``relative_positional_encoder``: a module run on the full masked sequence (zeros at
    hidden steps), e.g. a conv positional encoder, whose output is added to ``x``.
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

    # ---- hooks -----------------------------------------------------------------------
    def reset_parameters(self):
        """Re-initialise modality-specific layers after the model-wide BERT init."""

    def positions(self, x, padding_mask):
        return None

    def alibi_bias(self, batch_size: int, time_steps: int, device):
        return None, None

    def convert_padding_mask(self, x, padding_mask):
        return padding_mask

    def mask_prob(self) -> float:
        """This batch's mask probability: ``mask_prob``, or a draw from [mask_prob_min, mask_prob]."""
        cfg = self.modality_cfg
        if cfg.mask_prob_min is not None and 0 <= cfg.mask_prob_min < cfg.mask_prob:
            return float(np.random.uniform(cfg.mask_prob_min, cfg.mask_prob))
        return cfg.mask_prob

    def compute_mask(self, B: int, T: int, padding_mask, device, seed: Optional[MaskSeed]) -> Optional[MaskInfo]:
        cfg = self.modality_cfg
        mask_prob = self.mask_prob()
        if mask_prob <= 0:
            return None
        if cfg.mask_length == 1:
            return token_mask(B, T, mask_prob, device, seed)
        return span_mask(B, T, padding_mask, mask_prob, cfg.mask_length, device, seed, cfg.inverse_mask)

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

    def forward(self, source, padding_mask, mask: bool, remove_masked: bool, clone_batch: int = 1, mask_seed: Optional[MaskSeed] = None):
        return self.contextualized_features(
            self.local_features(source), padding_mask, mask, remove_masked, clone_batch, mask_seed
        )

    def contextualized_features(self, x, padding_mask, mask: bool, remove_masked: bool, clone_batch: int = 1, mask_seed: Optional[MaskSeed] = None):
        """Local features (B, T, C) -> masked, prenet-encoded sequence for the shared blocks.

        Returns a dict: ``x``, ``local_features`` (the unmasked input, for the teacher),
        ``padding_mask``, ``alibi_bias``, ``alibi_scale``, ``encoder_mask`` (MaskInfo or None).
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
                if mask_seed is not None:
                    ids = mask_seed.ids.repeat_interleave(clone_batch) * clone_batch
                    ids = ids + torch.arange(clone_batch, device=ids.device).repeat(B)
                    mask_seed = mask_seed._replace(ids=ids)
            mask_info = self.compute_mask(x.size(0), T, padding_mask, x.device, mask_seed)

        rel_encoder = self.relative_positional_encoder
        if mask_info is not None and (rel_encoder is not None or not remove_masked):
            # hidden steps become zeros (what a positional conv sees, or the full-length output)
            x = x * (1 - mask_info.mask.to(x.dtype).unsqueeze(-1))
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

        alibi_bias, alibi_scale = self.alibi_bias(B, T, x.device)
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
