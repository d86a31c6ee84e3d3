"""What every data2vec 1.0 model shares: config fields, the training forward, the loss.

data2vec 1.0 differs from 2.0 in three ways that shape this class:

- the student sees the *whole* sequence with masked steps replaced (a learned mask
  embedding, or the ``<mask>`` token for text), not only the visible steps, and there is
  no decoder: a small head (or nothing) maps the student's output to the targets;
- no clone batch: one mask per sample;
- the teacher is an EMA copy of the student's context encoder run on the unmasked input.

A modality subclass defines:

- ``encoder``: an ``nn.Module`` with ``forward(x, padding_mask, collect=None) -> (x, layers)``
  (``collect``: None, ``"targets"`` or ``"outputs"``, as ``Data2VecMultiModel.run_blocks``);
  the teacher is a copy of it (``_teacher_source``);
- ``encoder_input(source, padding_mask) -> (x, padding_mask)``: the unmasked input of
  ``encoder`` and the padding of its steps (None when nothing is padded);
- ``draw_mask(x, padding_mask, generator) -> (B, T) bool`` (True = masked) and
  ``apply_mask(x, mask, generator) -> x`` (the student's input; ``generator`` is the same
  mask generator, for any further random choice such as BERT's random tokens; None =
  the global RNG);
- ``predict(x) -> x``: the head on the student's output;
- ``num_extra_tokens`` (the image CLS token) and ``mode`` ("TEXT", "AUDIO", "IMAGE").
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel
from omegaconf import II

from ...encoder import EncoderOutput
from ..blocks import set_activation_checkpointing
from ..loss import regression_loss
from ..masking import MaskSeed, mask_generator
from ..targets import targets_from_config
from ..teacher import TeacherMixin

logger = logging.getLogger(__name__)


@dataclass
class Data2VecV1CommonConfig(FairseqDataclass):
    """Fields of Meta's three 1.0 configs that mean the same thing in each (same names)."""

    loss_beta: float = field(default=0.0, metadata={"help": "beta of the smooth L1 loss; 0 = L2 loss"})
    loss_scale: Optional[float] = field(default=None, metadata={"help": "multiply the loss by this; None or <= 0 = 1/sqrt(embed_dim)"})
    average_top_k_layers: int = field(default=8, metadata={"help": "targets average the teacher's last K blocks"})
    layer_norm_target_layer: bool = field(default=False, metadata={"help": "LayerNorm each target block output"})
    instance_norm_target_layer: bool = field(default=False, metadata={"help": "instance-normalise each target block output over time"})
    batch_norm_target_layer: bool = field(default=False, metadata={"help": "batch-normalise each target block output"})
    instance_norm_targets: bool = field(default=False, metadata={"help": "instance-normalise the averaged targets"})
    layer_norm_targets: bool = field(default=False, metadata={"help": "LayerNorm the averaged targets"})
    target_stats_exclude_padding: bool = field(
        default=False,
        metadata={"help": "instance/batch-normalise the targets with statistics over real (non-padded) steps only. "
                  "false = Meta's: over the whole padded sequence"},
    )
    ema_decay: float = field(default=0.999, metadata={"help": "teacher EMA decay at update 0"})
    ema_end_decay: float = field(default=0.9999, metadata={"help": "teacher EMA decay at ema_anneal_end_step and after"})
    ema_anneal_end_step: int = field(default=II("optimization.max_update"), metadata={"help": "update at which the decay reaches ema_end_decay (linear schedule)"})
    ema_same_dtype: bool = field(
        default=True,
        metadata={"help": "the teacher runs in the student's dtype (fp16/bf16 training; averaging stays in fp32 master weights); false = always fp32"},
    )
    log_norms: bool = field(default=True, metadata={"help": "log model_norm and ema_norm"})
    min_target_var: float = field(default=0.1, metadata={"help": "stop training if the target std falls below this (collapse)"})
    min_pred_var: float = field(default=0.01, metadata={"help": "stop training if the prediction std falls below this (collapse)"})
    min_local_var: float = field(
        default=0.0,
        metadata={"help": "stop training if local_var, the std of the modality (local) encoder's output, falls below "
                  "this (a collapsed feature encoder, fairseq #5239); 0 = off (Meta's recipes have no such check)"},
    )
    collapse_check_start: int = field(default=5000, metadata={"help": "check min_target_var / min_pred_var / min_local_var from this update on"})
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the reproducible masks"})
    skip_ema: bool = field(default=False, metadata={"help": "build no teacher (feature extraction / fine-tuning)"})
    activation_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute each transformer block's activations in the backward pass instead of storing them: "
                  "less memory for ~30% more compute, same gradients (torch.utils.checkpoint, non-reentrant)"},
    )


class Data2VecV1Model(TeacherMixin, BaseFairseqModel):
    """Base class of the data2vec 1.0 models; see the module docstring for the contract."""

    mode = "TEXT"
    num_extra_tokens = 0

    def _teacher_source(self) -> nn.Module:
        return self.encoder

    def _init_teacher(self, skip_ema: bool) -> None:
        # the last step of every 1.0 model's __init__: its blocks exist by now
        set_activation_checkpointing(self, getattr(self.cfg, "activation_checkpointing", False))
        super()._init_teacher(skip_ema)

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    # ---- subclass hooks ------------------------------------------------------------
    def encoder_input(self, source, padding_mask):
        raise NotImplementedError

    def draw_mask(self, x, padding_mask, generator: Optional[torch.Generator]) -> torch.Tensor:
        raise NotImplementedError

    def apply_mask(self, x, mask: torch.Tensor, generator: Optional[torch.Generator] = None):
        raise NotImplementedError

    def predict(self, x):
        return x

    def remove_pretraining_modules(self, modality=None):
        """Drop what only pretraining needs (the teacher; subclasses: the head)."""
        self.ema = None

    # ---- forward -------------------------------------------------------------------
    def forward(self, source, padding_mask=None, id=None, mask=True, features_only=False, precomputed_mask=None):
        """One training forward, or encoder features with ``features_only``.

        ``source``: token ids (B, T), waveforms (B, S) or images (B, C, H, W). ``id``: sample
        ids that seed the mask (reproducible, resumable); ``precomputed_mask`` (B, T) bool,
        True = masked, over the encoder's steps (speech: frames; images: patches, without
        CLS): use it instead of drawing one. Returns ``{"losses": {"regression": (N, C)},
        "sample_size", "target_var", "pred_var", "ema_decay", "masked_pct", "predictions",
        "targets"}``. Padded steps are never predicted.
        """
        if features_only:
            return self.extract_features(source, padding_mask)
        x, pm = self.encoder_input(source, padding_mask)
        if self.ema is None:
            raise RuntimeError("this model has no EMA teacher (skip_ema / fine-tuning); call extract_features")
        seed = MaskSeed(self.cfg.seed, self.num_updates, id) if id is not None else None
        generator = mask_generator(seed, x.device)
        if precomputed_mask is not None:
            expected = (x.size(0), x.size(1) - self.num_extra_tokens)
            if tuple(precomputed_mask.shape) != expected:
                raise ValueError(f"precomputed_mask has shape {tuple(precomputed_mask.shape)}; this batch needs {expected}")
            masked = precomputed_mask.to(device=x.device, dtype=torch.bool)
        elif mask:
            masked = self.draw_mask(x, pm, generator)
        else:
            raise ValueError("data2vec needs masked steps to predict: mask=False is only for features_only")
        student, _ = self.encoder(self.apply_mask(x, masked, generator), pm)
        n = self.num_extra_tokens
        student = student[:, n:]
        predicted = masked if pm is None else masked & ~pm[:, n:]
        pred = self.predict(student[predicted])
        targets = self.teacher_targets(x, pm)
        # the modality encoder's output at the real steps (1.0 text: tokens, its embedding runs inside encoder)
        local = None
        if x.is_floating_point():
            local = x[:, n:] if pm is None else x[:, n:][~pm[:, n:]]
        return self.compute_loss(pred, targets[predicted], predicted, local)

    @torch.no_grad()
    def teacher_targets(self, x, padding_mask):
        """The teacher (eval mode) on the unmasked input -> (B, T, C) fp32 targets, extra tokens removed."""
        if self.ema.device != x.device:
            self.ema.to(x.device)
        dtype = self.teacher_dtype(x.dtype if x.is_floating_point() else next(self.parameters()).dtype)  # tokens: the model's dtype
        self.ema.set_dtype(dtype)
        teacher = self.ema.model
        teacher.eval()
        inp = x.detach().to(dtype) if x.is_floating_point() else x
        _, layers = teacher(inp, padding_mask, collect="targets")
        n = self.num_extra_tokens
        layers = [layer[:, n:] for layer in layers]
        return targets_from_config(layers, self.cfg, padding_mask[:, n:] if padding_mask is not None else None)

    def compute_loss(self, pred, y, predicted, local_features=None):
        cfg = self.cfg
        scale = cfg.loss_scale if cfg.loss_scale is not None and cfg.loss_scale > 0 else None
        sample_size = predicted.sum()
        result = {
            "losses": {"regression": regression_loss(pred, y, cfg.loss_beta, scale)},
            "sample_size": sample_size,
            "predictions": pred,
            "targets": y,
        }
        result["masked_pct"] = float(sample_size) / max(predicted.numel(), 1)
        self.add_step_statistics(result, local_features)
        return result

    # ---- inference -----------------------------------------------------------------
    def encode(self, source, padding_mask=None, output_hidden_states: bool = False, keep_extra_tokens: bool = False) -> EncoderOutput:
        """The student's output on the unmasked input (see :class:`d2v_plugin.EncoderOutput`)."""
        x, pm = self.encoder_input(source, padding_mask)
        x, hidden = self.encoder(x, pm, collect="outputs" if output_hidden_states else None)
        return EncoderOutput.from_sequence(x, pm, hidden, self.num_extra_tokens, keep_extra_tokens, output_hidden_states)

    def extract_features(self, source, padding_mask=None, mask=False, remove_extra_tokens=True, **unused):
        """Meta's dict format: ``{"x": (B, T, C), "padding_mask", "layer_results"}`` (per-block
        target tensors, extra tokens removed when ``remove_extra_tokens``)."""
        if mask:
            raise ValueError("extract_features of a data2vec 1.0 model runs on the unmasked input (mask=False)")
        x, pm = self.encoder_input(source, padding_mask)
        x, layers = self.encoder(x, pm, collect="targets")
        n = self.num_extra_tokens if remove_extra_tokens else 0
        if n:
            x, layers = x[:, n:], [layer[:, n:] for layer in layers]
            pm = pm[:, n:] if pm is not None else None
        return {"x": x, "padding_mask": pm, "layer_results": layers}
