"""``d2v_ctc``: a letter CTC head on a pretrained data2vec speech encoder (1.0 or 2.0, ours or Meta's).

The mechanics of Meta's wav2vec 2.0 / data2vec fine-tuning recipe (``wav2vec_ctc``):

- the conv feature extractor is frozen (``feature_grad_mult: 0``);
- time masking (``mask_prob``, ``mask_length``) and channel masking (``mask_channel_prob``,
  ``mask_channel_length``) of the encoder input while training (``apply_mask``), through the
  encoder's own masking (2.0: block masks with noise at masked frames; 1.0: wav2vec spans
  replaced by ``mask_emb``);
- the whole encoder is frozen for the first ``freeze_finetune_updates`` (only the head learns);
- ``layerdrop`` of the transformer blocks;
- the fine-tuning dropouts of the transformer blocks (``dropout``, ``attention_dropout``,
  ``activation_dropout``; the recipes: 0, 0 and 0.1) replace the ones the encoder was
  pretrained with, as Meta's ``wav2vec_ctc`` overrides them;
- the audio normalisation the encoder was pretrained with (the pretrained checkpoint's
  ``task.normalize``) is applied to every waveform inside the model (zero mean, unit variance
  over its real samples), so training, validation and ``d2v-transcribe`` all feed what the
  encoder expects without a setting to keep in sync.

At the first build the encoder's architecture (``pretrained_model_args``), its normalisation
(``normalize``) and the letter dictionary (``target_symbols``) are recorded in the model
config, which fairseq saves in every checkpoint: a fine-tuned checkpoint re-loads without the
pretrained file or the data directory (:class:`d2v_plugin.asr.SpeechRecognizer`).
"""

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import MISSING

from ...checkpoints import read_checkpoint
from ..blocks import Block
from .pretrained import encoder_from_args, finetuning_encoder, load_pretrained_encoder, remember

logger = logging.getLogger(__name__)


@dataclass
class D2vCtcConfig(FairseqDataclass):
    model_path: str = field(default=MISSING, metadata={"help": "pretrained data2vec speech checkpoint (ours or Meta's; 2.0 data2vec_multi AUDIO or 1.0 data2vec_audio)"})
    no_pretrained_weights: bool = field(default=False, metadata={"help": "build the encoder from the checkpoint's config but keep it randomly initialised (the untrained baseline)"})
    apply_mask: bool = field(default=True, metadata={"help": "mask the encoder input (time and channels) while training"})
    mask_prob: float = field(default=0.65, metadata={"help": "time masking: fraction of frames masked (Meta's recipe: 0.65, 960 h: 0.5)"})
    mask_length: int = field(default=10, metadata={"help": "time masking: length of each masked span, in frames"})
    mask_channel_prob: float = field(default=0.5, metadata={"help": "channel masking: probability of starting a span of zeroed channels (0 = off)"})
    mask_channel_length: int = field(default=64, metadata={"help": "channel masking: length of each zeroed channel span"})
    zero_mask: bool = field(default=False, metadata={"help": "2.0 encoders: masked frames are zeros (false: small noise, Meta's fine-tuning default)"})
    layerdrop: float = field(default=0.1, metadata={"help": "probability of skipping each transformer block while training"})
    feature_grad_mult: float = field(default=0.0, metadata={"help": "gradient multiplier of the conv feature extractor; 0 freezes it (Meta's recipe)"})
    freeze_finetune_updates: int = field(default=0, metadata={"help": "the encoder is frozen (only the CTC head trains) for this many updates"})
    final_dropout: float = field(default=0.0, metadata={"help": "dropout on the encoder output before the CTC head"})
    dropout: Optional[float] = field(
        default=None,
        metadata={"help": "dropout after each block's attention projection and feed-forward network while fine-tuning; "
                  "null = keep the pretrained encoder's (Meta's recipes: 0.0)"},
    )
    attention_dropout: Optional[float] = field(
        default=None,
        metadata={"help": "dropout on the attention weights while fine-tuning; null = keep the pretrained encoder's (Meta's recipes: 0.0)"},
    )
    activation_dropout: Optional[float] = field(
        default=None,
        metadata={"help": "dropout after the feed-forward network's activation while fine-tuning; "
                  "null = keep the pretrained encoder's (Meta's recipes: 0.1)"},
    )
    normalize: Optional[bool] = field(
        default=None,
        metadata={"help": "normalise each waveform to zero mean and unit variance; null (default) = what the pretrained "
                  "checkpoint's task used (task.normalize), recorded at the first build"},
    )
    pretrained_model_args: Any = field(
        default=None,
        metadata={"help": "set automatically at the first build: the pretrained encoder's config, so fine-tuned checkpoints re-load without model_path"},
    )
    target_symbols: Any = field(
        default=None,
        metadata={"help": "set automatically at the first build: the symbols of the letter dictionary (dict.ltr.txt), so fine-tuned checkpoints decode without the data directory"},
    )


def pretrained_normalize(model_path: str) -> bool:
    """Whether the checkpoint at ``model_path`` was pretrained on normalised audio (its ``task.normalize``).

    Meta's data2vec 2.0 speech models always were (their fine-tuning code asserts it); a
    checkpoint without a task config (an exported inference directory) is taken as normalised
    when it is a 2.0 model and with a warning otherwise.
    """
    ckpt = read_checkpoint(model_path) if not _is_dir(model_path) else {}
    cfg = ckpt.get("cfg") or {}
    task = cfg.get("task") if hasattr(cfg, "get") else None
    if task is not None and task.get("normalize") is not None:
        return bool(task.get("normalize"))
    args = ckpt.get("args")
    if args is not None and hasattr(args, "normalize"):
        return bool(args.normalize)
    model = (cfg.get("model") if hasattr(cfg, "get") else None) or {}
    if model.get("_name") == "data2vec_multi":
        return True
    logger.warning(f"{model_path}: no task.normalize recorded; feeding unnormalised audio (set model.normalize to choose)")
    return False


def _is_dir(path):
    import os

    return os.path.isdir(path)


def apply_finetuning_options(encoder, cfg: D2vCtcConfig) -> None:
    """Set the recipe's masking, layerdrop and feature-extractor gradient on ``encoder``
    (a data2vec 2.0 ``Data2VecMultiModel`` or 1.0 ``Data2VecAudioModel``); all are read at run time."""
    if hasattr(encoder, "modality_encoders"):  # 2.0
        audio = encoder.modality_encoders["AUDIO"].modality_cfg
        audio.mask_prob = cfg.mask_prob
        audio.mask_prob_min = None
        audio.mask_length = cfg.mask_length
        audio.mask_channel_prob = cfg.mask_channel_prob
        audio.mask_channel_length = cfg.mask_channel_length
        audio.encoder_zero_mask = cfg.zero_mask
        audio.inverse_mask = False
        audio.keep_masked_pct = 0.0
        audio.local_grad_mult = cfg.feature_grad_mult
        encoder.cfg.layerdrop = cfg.layerdrop
    else:  # 1.0
        enc_cfg = encoder.cfg
        enc_cfg.mask_prob = cfg.mask_prob
        enc_cfg.mask_length = cfg.mask_length
        enc_cfg.mask_channel_prob = cfg.mask_channel_prob
        enc_cfg.mask_channel_length = cfg.mask_channel_length
        enc_cfg.feature_grad_mult = cfg.feature_grad_mult
        enc_cfg.encoder_layerdrop = cfg.layerdrop
        encoder.encoder.layerdrop = cfg.layerdrop
    apply_dropouts(encoder, cfg)


def apply_dropouts(encoder: nn.Module, cfg: D2vCtcConfig) -> None:
    """Set the fine-tuning dropouts on every transformer block of ``encoder`` (fields left
    null keep the pretrained values). The blocks are the same class in 1.0 and 2.0 encoders."""
    for block in encoder.modules():
        if not isinstance(block, Block):
            continue
        if cfg.dropout is not None:
            block.attn.proj_drop.p = cfg.dropout
            block.post_mlp_dropout.p = cfg.dropout
        if cfg.attention_dropout is not None:
            block.attn.attn_drop = cfg.attention_dropout
        if cfg.activation_dropout is not None:
            # 1.0 speech blocks have no dropout after fc2 (an Identity there), 2.0 blocks do
            for drop in (block.mlp.drop1, block.mlp.drop2):
                if isinstance(drop, nn.Dropout):
                    drop.p = cfg.activation_dropout


def normalize_waveforms(source: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Each row to zero mean and unit variance over its real samples; padding stays 0
    (the same as ``F.layer_norm`` of the unpadded waveform)."""
    x = source.float()
    real = torch.ones_like(x, dtype=torch.bool) if padding_mask is None else ~padding_mask.bool()
    n = real.sum(-1, keepdim=True).clamp_min(1)
    mean = (x * real).sum(-1, keepdim=True) / n
    var = (((x - mean) * real) ** 2).sum(-1, keepdim=True) / n
    return (((x - mean) / torch.sqrt(var + 1e-5)) * real).to(source.dtype)


@register_model("d2v_ctc", dataclass=D2vCtcConfig)
class D2vCtcModel(BaseFairseqModel):
    def __init__(self, cfg: D2vCtcConfig, encoder: nn.Module, num_symbols: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.final_dropout = nn.Dropout(cfg.final_dropout)
        self.head = nn.Linear(encoder.embed_dim, num_symbols)
        nn.init.xavier_uniform_(self.head.weight)  # Meta's wav2vec_ctc projection
        nn.init.zeros_(self.head.bias)
        self.num_updates = 0
        apply_finetuning_options(encoder, cfg)

    @classmethod
    def build_model(cls, cfg: D2vCtcConfig, task):
        dictionary = task.target_dictionary
        if dictionary is None:
            raise ValueError("d2v_ctc needs a task with a letter dictionary (task._name=d2v_audio_finetuning, dict.ltr.txt)")
        first_build = cfg.pretrained_model_args is None
        encoder, args = finetuning_encoder(cfg, task, "AUDIO", load=lambda path: load_pretrained_encoder(path, "AUDIO"))
        if first_build:
            if cfg.no_pretrained_weights:
                encoder = encoder_from_args(args, task)
                encoder.train()
            if cfg.normalize is None:
                remember(cfg, "normalize", pretrained_normalize(cfg.model_path))
                logger.info(f"audio normalisation of {cfg.model_path}: normalize={cfg.normalize}")
            remember(cfg, "target_symbols", list(dictionary.symbols))
        elif list(cfg.target_symbols or []) != list(dictionary.symbols):
            raise ValueError(
                f"the letter dictionary of task.data ({len(dictionary)} symbols) is not the one this model was "
                f"fine-tuned with ({len(cfg.target_symbols or [])} symbols)"
            )
        return cls(cfg, encoder, len(dictionary))

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def encoder_features(self, source, padding_mask, mask: bool):
        """(B, T, C) frame features and the frame padding mask (None: no padding)."""
        enc = self.encoder
        if hasattr(enc, "modality_encoders"):
            out = enc.extract_features(source, padding_mask=padding_mask, mask=mask, mode="AUDIO")
            return out["x"], out["padding_mask"]
        if not mask:
            out = enc.extract_features(source, padding_mask=padding_mask)
            return out["x"], out["padding_mask"]
        x, pm = enc.encoder_input(source, padding_mask)
        x = enc.apply_mask(x, enc.draw_mask(x, pm, None))
        x, _ = enc.encoder(x, pm)
        return x, pm

    def forward(self, source, padding_mask=None, **unused):
        """Waveforms (B, S) -> ``{"logits": (B, T, V) float, "padding_mask": (B, T) or None}``."""
        if self.cfg.normalize:
            source = normalize_waveforms(source, padding_mask)
        frozen = self.training and self.num_updates < self.cfg.freeze_finetune_updates
        mask = self.cfg.apply_mask and self.training
        with torch.no_grad() if frozen else contextlib.nullcontext():
            x, pm = self.encoder_features(source, padding_mask, mask)
        logits = self.head(self.final_dropout(x)).float()
        return {"logits": logits, "padding_mask": pm}

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        logits = net_output["logits"]
        return F.log_softmax(logits, dim=-1) if log_probs else F.softmax(logits, dim=-1)

    @staticmethod
    def output_lengths(net_output) -> torch.Tensor:
        logits, pm = net_output["logits"], net_output["padding_mask"]
        if pm is None:
            return torch.full((logits.size(0),), logits.size(1), dtype=torch.long, device=logits.device)
        return (~pm).long().sum(-1)
