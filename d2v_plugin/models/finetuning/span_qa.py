"""``d2v_span_qa``: a pretrained data2vec text encoder with a start/end span head (SQuAD).

For every token the head predicts a start and an end logit. An unanswerable question
(SQuAD 2.0), or a window that does not contain the answer, is labelled with the first
token (``<s>``): "no answer" is the span (0, 0). The pretrained encoder's architecture is
recorded in ``model.pretrained_model_args``, so fine-tuned checkpoints re-load without
``model.model_path``.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import MISSING

from .pretrained import finetuning_encoder

logger = logging.getLogger(__name__)


@dataclass
class SpanQAConfig(FairseqDataclass):
    model_path: str = field(default=MISSING, metadata={"help": "pretrained data2vec text checkpoint (ours or Meta's data2vec_multi)"})
    head_dropout: float = field(default=0.0, metadata={"help": "dropout on the encoder output before the span head"})
    pretrained_model_args: Any = field(
        default=None,
        metadata={"help": "set automatically at the first build: the pretrained encoder's config, so fine-tuned checkpoints re-load without model_path"},
    )


@register_model("d2v_span_qa", dataclass=SpanQAConfig)
class SpanQAModel(BaseFairseqModel):
    def __init__(self, cfg: SpanQAConfig, encoder: nn.Module, pad_idx: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.pad_idx = pad_idx
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.span_head = nn.Linear(encoder.embed_dim, 2)
        nn.init.normal_(self.span_head.weight, std=0.02)
        nn.init.zeros_(self.span_head.bias)

    @classmethod
    def build_model(cls, cfg: SpanQAConfig, task):
        dictionary = task.source_dictionary
        encoder, _ = finetuning_encoder(cfg, task, "TEXT")
        limit = int(encoder.max_positions())
        wanted = task.max_positions()
        if wanted is not None and int(wanted) > limit:
            raise ValueError(
                f"task.max_seq_length={wanted} exceeds the {limit} positions {cfg.model_path} was pretrained with; "
                f"set task.max_seq_length<={limit}"
            )
        logger.info(f"span QA head on {cfg.model_path} ({sum(p.numel() for p in encoder.parameters())} encoder parameters)")
        return cls(cfg, encoder, dictionary.pad())

    def max_positions(self):
        return int(self.encoder.max_positions())

    def forward(self, source, padding_mask=None, **unused):
        """``source`` (B, T) token ids -> start and end logits (B, T); padding gets -inf."""
        if padding_mask is None:
            padding_mask = source.eq(self.pad_idx)
        x = self.encoder.extract_features(source, padding_mask=padding_mask)["x"]
        logits = self.span_head(self.dropout(x)).float()
        logits = logits.masked_fill(padding_mask.unsqueeze(-1), float("-inf"))
        start, end = logits.unbind(dim=-1)
        return {"start_logits": start, "end_logits": end}
