"""data2vec 1.0 speech (``data2vec_audio``, arXiv 2202.03555): a wav2vec 2.0 encoder
regressing its own EMA teacher's averaged, instance-normalised FFN outputs.

Student: waveform (B, S) -> conv feature extractor -> (B, T, C') -> ``layer_norm`` ->
``post_extract_proj`` (B, T, C) [the teacher's input] -> ``dropout_input`` -> masked frames
replaced by the learned ``mask_emb`` -> ``encoder`` (padded frames zeroed, + ``pos_conv``,
post-LN ``layer_norm``, dropout, post-LN blocks) -> ``final_proj`` at the masked frames.
Teacher: an EMA copy of ``encoder`` (``ema_transformer_only``) run on the unmasked
features; with ``ema_layers_only`` its ``pos_conv`` is copied from the student, not averaged.

The model does not normalise waveforms: Meta's ``audio_base_ls.pt`` (and the compat
fixture ``v1_audio``) were trained with the task's ``normalize: true`` (zero mean, unit
variance per utterance; ``cfg["task"]["normalize"]`` of the checkpoint), so feed it
normalised audio (``d2v_audio_pretraining`` with ``task.normalize=true`` does it).

Parameter names are Meta's except inside the transformer blocks, which are the shared
:class:`~d2v_plugin.models.blocks.Block` (``META_NAMES`` below converts Meta's checkpoints).
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn
from fairseq.data.data_utils import compute_mask_indices
from fairseq.models import register_model
from fairseq.modules import GradMultiply
from fairseq.modules.transformer_sentence_encoder import init_bert_params

from ..architectures import Architecture, register_architecture
from ..blocks import Block, Mlp, run_stack
from ..data2vec2 import plain_config
from ..masking import channel_mask, span_mask
from ..modalities.audio import EXTRACTOR_MODES, ConvFeatureExtractionModel, conv_output_lengths, conv_positional_encoder, parse_conv_spec
from .base import Data2VecV1CommonConfig, Data2VecV1Model
from .meta_names import NameTable

logger = logging.getLogger(__name__)


@dataclass
class Data2VecAudioConfig(Data2VecV1CommonConfig):
    """Meta's ``Data2VecAudioConfig`` fields that this model implements (same names and
    meanings). Defaults are Meta's LibriSpeech base recipe (``base_librispeech.yaml``) where
    it sets a value, else wav2vec 2.0's defaults."""

    # feature extractor
    extractor_mode: EXTRACTOR_MODES = field(
        default="layer_norm",
        metadata={"help": "normalisation in the conv feature extractor: 'layer_norm' after every conv layer (data2vec's recipe), "
                  "or 'default' (one GroupNorm after the first layer, wav2vec 2.0 base)"},
    )
    conv_feature_layers: str = field(
        default="[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
        metadata={"help": "conv feature extractor layers as a list of (channels, kernel, stride) tuples; only list/tuple "
                  "literals of integers, + and * are allowed (the default gives 50 frames per second at 16 kHz)"},
    )
    conv_bias: bool = field(default=False, metadata={"help": "biases in the feature extractor's convolutions"})
    feature_grad_mult: float = field(default=1.0, metadata={"help": "scale the feature extractor's gradient by this; 0 = freeze it"})
    # transformer
    encoder_layers: int = field(default=12, metadata={"help": "number of transformer blocks"})
    encoder_embed_dim: int = field(default=768, metadata={"help": "transformer width"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "hidden size of each block's feed-forward network"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "attention heads"})
    layer_norm_first: bool = field(default=False, metadata={"help": "pre-norm blocks (and a final LayerNorm); false = post-norm, Meta's recipe"})
    dropout: float = field(default=0.1, metadata={"help": "dropout after attention, after each block's feed-forward network and on the encoder input"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on the attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the feed-forward network's activation"})
    encoder_layerdrop: float = field(default=0.05, metadata={"help": "skip each block with this probability while training (student only)"})
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the projected features before masking (student only)"})
    dropout_features: float = field(default=0.0, metadata={"help": "unused by data2vec 1.0 (Meta's config has it; kept so its configs load)"})
    # convolutional positional encoder
    conv_pos: int = field(default=95, metadata={"help": "total receptive width of the positional convolutions (kernel = max(3, conv_pos // pos_conv_depth))"})
    conv_pos_groups: int = field(default=16, metadata={"help": "groups of each positional convolution"})
    pos_conv_depth: int = field(default=5, metadata={"help": "number of positional convolution layers (>= 2; wav2vec 2.0's single weight-normed convolution, depth 1, is not implemented)"})
    # masking
    mask_prob: float = field(default=0.65, metadata={"help": "probability of each frame to start a masked span"})
    mask_length: int = field(default=10, metadata={"help": "masked span length in frames"})
    mask_selection: str = field(default="static", metadata={"help": "span length distribution; only 'static' (every span mask_length) is implemented"})
    require_same_masks: bool = field(default=True, metadata={"help": "mask the same number of frames in every row"})
    mask_dropout: float = field(default=0.0, metadata={"help": "unmask this fraction of each row's masked spans again"})
    mask_channel_prob: float = field(default=0.0, metadata={"help": "probability of each channel to start a zeroed channel span (student input)"})
    mask_channel_length: int = field(default=10, metadata={"help": "zeroed channel span length"})
    mask_channel_before: bool = field(default=False, metadata={"help": "zero channels before replacing masked frames by mask_emb (false: after)"})
    # teacher
    ema_transformer_only: bool = field(default=True, metadata={"help": "the teacher averages the transformer encoder only (the only option implemented)"})
    ema_layers_only: bool = field(default=True, metadata={"help": "copy the positional convolutions into the teacher instead of averaging them"})
    # Meta's fields this plugin drops from a checkpoint config: see UNSUPPORTED below


# Meta's settings that change the model but are not implemented: field -> (the value this
# plugin builds, why). A Meta config with another value is refused by from_meta_config.
UNSUPPORTED = {
    "layer_type": ("transformer", "only plain transformer blocks are implemented (no conformer / adapter layers)"),
    "activation_fn": ("gelu", "the blocks use GELU"),
    "mask_selection": ("static", "only static span lengths are implemented"),
    "no_mask_overlap": (False, "spans may overlap"),
    "no_mask_channel_overlap": (False, "channel spans may overlap"),
    "group_norm_target_layer": (False, "group-normalised target layers are not implemented"),
    "quantize_input": (False, "data2vec has no quantizer"),
}


def check_meta_config(values: Dict[str, Any]) -> None:
    """ValueError naming the first setting of a (Meta or our) config this model cannot build."""
    for key, (value, why) in UNSUPPORTED.items():
        if key in values and values[key] != value and str(values[key]) != str(value):
            raise ValueError(f"data2vec_audio: {key}={values[key]!r} is not supported ({why}; supported: {value!r})")
    if values.get("mask_channel_prob", 0) > 0 and str(values.get("mask_channel_selection", "static")) != "static":
        raise ValueError(f"data2vec_audio: mask_channel_selection={values['mask_channel_selection']!r} is not supported (only 'static')")
    depth = values.get("pos_conv_depth", 5)
    if depth is not None and depth < 2:
        raise ValueError(
            f"data2vec_audio: pos_conv_depth={depth} is not supported: wav2vec 2.0's single weight-normed positional "
            "convolution is not implemented (data2vec's recipe uses pos_conv_depth 5)"
        )
    if not values.get("ema_transformer_only", True) and not values.get("ema_layers_only", True):
        raise ValueError("data2vec_audio: ema_transformer_only=False (a teacher of the whole model) is not supported")


def from_meta_config(values: Dict[str, Any]) -> Dict[str, Any]:
    """Meta's checkpoint config -> ours: the names are the same; refuse what we do not build.
    (Fields we do not know, e.g. wav2vec 2.0's quantizer settings or ``final_dim``, which
    Meta's data2vec_audio ignores, are dropped by the loader.)"""
    check_meta_config(values)
    return values


# Meta's parameter names -> ours (applied to the student's names; the teacher's ``_ema``
# names are the same without the ``encoder.`` prefix). Names not listed are the same in
# both: feature_extractor.*, layer_norm, post_extract_proj, mask_emb, encoder.pos_conv.{i}.0,
# encoder.layer_norm, final_proj. Meta's q, k, v projections become our qkv (in row order).
QKV = ("q", "k", "v")
META_NAMES = NameTable([
    *[(rf"^encoder\.layers\.(\d+)\.self_attn\.{p}_proj\.(weight|bias)$", r"encoder.layers.\1.attn.qkv.\2") for p in QKV],
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.layers.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.fc([12])\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.norm2."),
], "data2vec_audio")


def meta_name(name: str) -> str:
    """Our name for one of Meta's student parameter names (q/k/v all give ``attn.qkv``)."""
    return META_NAMES.lookup(name)[0]


def from_meta_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """Meta's ``data2vec_audio`` state dict (``_ema`` included) -> ours; ours unchanged."""
    if not any(".self_attn." in k for k in state):
        return state
    state = dict(state)
    ema = state.pop("_ema", None)
    out = META_NAMES.convert(state)
    if ema is not None:
        teacher = META_NAMES.convert({"encoder." + k: v for k, v in ema.items()})
        out["_ema"] = {k[len("encoder."):]: v for k, v in teacher.items()}
    return out


class Data2VecAudioEncoder(nn.Module):
    """wav2vec 2.0's transformer encoder: zero padded frames, add the convolutional
    positional encoding, LayerNorm (post-norm) and dropout, then the blocks.

    ``forward(x, padding_mask, collect)`` -> (x, per-block FFN outputs / block outputs).
    """

    def __init__(self, cfg: Data2VecAudioConfig):
        super().__init__()
        dim = cfg.encoder_embed_dim
        if dim % cfg.conv_pos_groups != 0:
            raise ValueError(f"encoder_embed_dim {dim} is not divisible by conv_pos_groups {cfg.conv_pos_groups}")
        # Meta's pos_conv is the inner (B, C, T) layers: drop the (B, T, C) transposes around them
        layers = list(conv_positional_encoder(dim, cfg.conv_pos, cfg.pos_conv_depth, cfg.conv_pos_groups, False).children())[1:-1]
        self.pos_conv = nn.Sequential(*layers)
        self.layer_norm_first = cfg.layer_norm_first
        self.layers = nn.ModuleList(self._block(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layerdrop = cfg.encoder_layerdrop
        self.apply(init_bert_params)

    @staticmethod
    def _block(cfg: Data2VecAudioConfig) -> Block:
        dim = cfg.encoder_embed_dim
        blk = Block(
            dim,
            cfg.encoder_attention_heads,
            mlp_ratio=cfg.encoder_ffn_embed_dim / dim,
            qkv_bias=True,
            drop=cfg.dropout,
            attn_drop=cfg.attention_dropout,
            mlp_drop=cfg.activation_dropout,
            post_mlp_drop=cfg.dropout,
            layer_norm_first=cfg.layer_norm_first,
            ffn_targets=True,
        )
        if blk.mlp.fc1.out_features != cfg.encoder_ffn_embed_dim:
            blk.mlp = Mlp(dim, cfg.encoder_ffn_embed_dim, drop=cfg.activation_dropout)
        # wav2vec 2.0's FFN output (the target, Meta's fc_result) is taken right after fc2:
        # activation_dropout acts after the activation only
        blk.mlp.drop2 = nn.Identity()
        return blk

    def forward(self, x, padding_mask=None, collect: Optional[str] = None):
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        x, collected = run_stack(self.layers, x, padding_mask, None, collect, self.layerdrop, self.training)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x, collected


@register_model("data2vec_audio", dataclass=Data2VecAudioConfig)
class Data2VecAudioModel(Data2VecV1Model):
    """data2vec 1.0 speech; loads Meta's ``data2vec_audio`` checkpoints (``audio_base_ls.pt``)
    through :data:`META_NAMES`. Expects normalised waveforms (see the module docstring)."""

    mode = "AUDIO"

    def __init__(self, cfg: Data2VecAudioConfig, task=None, skip_ema: bool = False):
        super().__init__()
        self.cfg = cfg = plain_config(cfg)
        check_meta_config({k: getattr(cfg, k) for k in ("mask_selection", "pos_conv_depth", "ema_transformer_only", "ema_layers_only")})
        self.conv_layers = parse_conv_spec(cfg.conv_feature_layers)
        feature_dim = self.conv_layers[-1][0]
        dim = cfg.encoder_embed_dim
        self.feature_extractor = ConvFeatureExtractionModel(
            conv_layers=self.conv_layers, dropout=0.0, mode=str(cfg.extractor_mode), conv_bias=cfg.conv_bias
        )
        self.layer_norm = nn.LayerNorm(feature_dim)
        self.post_extract_proj = nn.Linear(feature_dim, dim)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.mask_emb = nn.Parameter(torch.empty(dim).uniform_())
        self.encoder = Data2VecAudioEncoder(cfg)
        self.final_proj = nn.Linear(dim, dim)
        self._init_teacher(skip_ema or cfg.skip_ema)

    @classmethod
    def build_model(cls, cfg: Data2VecAudioConfig, task=None):
        return cls(cfg, task=task, skip_ema=cfg.skip_ema)

    @property
    def embed_dim(self) -> int:
        return self.cfg.encoder_embed_dim

    def ema_copied(self, name: str) -> bool:
        return self.cfg.ema_layers_only and name.startswith("pos_conv.")

    def remove_pretraining_modules(self, modality=None):
        """Drop the teacher and ``final_proj``; ``mask_emb`` stays (fine-tuning masks too)."""
        super().remove_pretraining_modules(modality)
        self.final_proj = None

    # ---- hooks of Data2VecV1Model --------------------------------------------------------
    def encoder_input(self, source, padding_mask):
        """Waveforms (B, S) -> projected frame features (B, T, C) and the frame padding mask
        (True = padded; None when nothing is padded)."""
        mult = self.cfg.feature_grad_mult
        if mult > 0:
            features = self.feature_extractor(source)
            if mult != 1.0:
                features = GradMultiply.apply(features, mult)
        else:
            with torch.no_grad():
                features = self.feature_extractor(source)
        features = self.layer_norm(features.transpose(1, 2))
        frame_padding = None
        if padding_mask is not None and padding_mask.any():
            lengths = conv_output_lengths((~padding_mask.bool()).sum(-1), self.conv_layers)
            frame_padding = torch.arange(features.size(1), device=features.device)[None, :] >= lengths[:, None]
        return self.post_extract_proj(features), frame_padding

    def draw_mask(self, x, padding_mask, generator: Optional[torch.Generator]) -> torch.Tensor:
        """wav2vec 2.0 spans (fairseq ``compute_mask_indices``, ``min_masks=1``) inside each
        row's real frames, seeded from ``generator``."""
        cfg = self.cfg
        B, T = x.shape[:2]
        if cfg.require_same_masks:
            return span_mask(B, T, padding_mask, cfg.mask_prob, cfg.mask_length, x.device, generator,
                             mask_dropout=cfg.mask_dropout).mask.bool()
        seed = None
        if generator is not None:
            seed = int(torch.randint(1, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
        mask = compute_mask_indices(
            (B, T), padding_mask, cfg.mask_prob, cfg.mask_length, min_masks=1, require_same_masks=False,
            mask_dropout=cfg.mask_dropout, seed=seed, epoch=0 if seed is not None else None,
            indices=torch.arange(B) if seed is not None else None,
        )
        return torch.from_numpy(np.asarray(mask)).to(x.device)

    def apply_mask(self, x, mask: torch.Tensor, generator: Optional[torch.Generator] = None):
        """The student's input: dropout, masked frames replaced by ``mask_emb`` (and channel spans zeroed)."""
        cfg = self.cfg
        x = self.dropout_input(x)
        channels = None
        if cfg.mask_channel_prob > 0:
            channels = channel_mask(x.size(0), x.size(1), x.size(2), cfg.mask_channel_prob, cfg.mask_channel_length, x.device, generator)
        if channels is not None and cfg.mask_channel_before:
            x = x.masked_fill(channels, 0)
        x = torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        if channels is not None and not cfg.mask_channel_before:
            x = x.masked_fill(channels, 0)
        return x

    def predict(self, x):
        return self.final_proj(x)


register_architecture(
    Architecture(
        name="data2vec_audio",
        config=Data2VecAudioConfig,
        model=Data2VecAudioModel,
        modality="AUDIO",
        from_meta_config=from_meta_config,
        from_meta_state=from_meta_state,
    )
)
