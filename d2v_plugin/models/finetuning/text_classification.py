"""``d2v_text_classification``: a pretrained data2vec text encoder with a sentence-level head.

The head reads the encoder output at the first token (``<s>``) and is fairseq's
``RobertaClassificationHead`` (dropout, dense ``C -> inner``, tanh, dropout, ``inner ->
num_classes``), as in Meta's ``data2vec_text_classification``. With one output and
``task.regression_target=true`` it is a regression head (STS-B).

The pretrained encoder comes from ``model.model_path`` (ours or Meta's checkpoint). Its
architecture is recorded in ``model.pretrained_model_args`` of the fine-tuning config,
so a fine-tuned checkpoint re-loads (``checkpoint_utils.load_model_ensemble_and_task``)
without the pretrained file.
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from fairseq import utils
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from fairseq.models.roberta.model import RobertaClassificationHead
from omegaconf import II, MISSING

from .pretrained import encoder_from_args, finetuning_encoder, load_pretrained_encoder

logger = logging.getLogger(__name__)


@dataclass
class Data2VecTextClassificationConfig(FairseqDataclass):
    model_path: str = field(default=MISSING, metadata={"help": "pretrained data2vec text checkpoint (ours or Meta's, e.g. nlp_base.pt)"})
    num_classes: int = field(default=II("task.num_classes"), metadata={"help": "outputs of the head: classes, or regression values"})
    pooler_dropout: float = field(default=0.0, metadata={"help": "dropout before and after the head's dense layer (Meta's data2vec recipe: 0)"})
    pooler_activation_fn: ChoiceEnum(utils.get_available_activation_fns()) = field(
        default="tanh", metadata={"help": "activation of the head's dense layer"}
    )
    pooler_inner_dim: Optional[int] = field(default=None, metadata={"help": "width of the head's dense layer (default: the encoder's width)"})
    no_pretrained_weights: bool = field(
        default=False, metadata={"help": "build the encoder from the checkpoint's config but keep it randomly initialised (a baseline)"}
    )
    pretrained_model_args: Any = field(
        default=None,
        metadata={"help": "set automatically at the first build: the pretrained encoder's config, so fine-tuned checkpoints re-load without model_path"},
    )


@register_model("d2v_text_classification", dataclass=Data2VecTextClassificationConfig)
class Data2VecTextClassificationModel(BaseFairseqModel):
    def __init__(self, cfg: Data2VecTextClassificationConfig, encoder):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        dim = encoder.embed_dim
        self.head = RobertaClassificationHead(
            input_dim=dim,
            inner_dim=cfg.pooler_inner_dim or dim,
            num_classes=cfg.num_classes,
            activation_fn=cfg.pooler_activation_fn,
            pooler_dropout=cfg.pooler_dropout,
        )

    @classmethod
    def build_model(cls, cfg: Data2VecTextClassificationConfig, task):
        if cfg.num_classes <= 0:
            raise ValueError("model.num_classes (default: task.num_classes) must be positive")
        first_build = cfg.pretrained_model_args is None
        encoder, args = finetuning_encoder(cfg, task, "TEXT", load=lambda path: _load_encoder(path, task))
        if first_build and cfg.no_pretrained_weights:
            encoder = encoder_from_args(args, task)
        _check_positions(encoder, task)
        return cls(cfg, encoder)

    def max_positions(self):
        return self.encoder.max_positions()

    def forward(self, source, padding_mask=None, **unused):
        """Logits (B, num_classes) from the encoder's output at the first token."""
        features = self.encoder.extract_features(source, padding_mask=padding_mask)["x"]
        return self.head(features)


def _load_encoder(model_path, task):
    try:
        return load_pretrained_encoder(model_path, "TEXT", task.source_dictionary)
    except ValueError as e:
        if "dictionary has" in str(e):
            data = getattr(task.cfg, "data", "task.data")
            raise ValueError(
                f"{e}. The fine-tuning data ({data}/input0/dict.txt, plus <mask>) was not made with the "
                "pretrained model's dictionary: tokenize and binarize it with that model's tokenizer and dict.txt"
            ) from e
        raise


def _check_positions(encoder, task):
    limit = encoder.max_positions()
    wanted = task.max_positions() if hasattr(task, "max_positions") else None
    if isinstance(wanted, int) and wanted > limit:
        raise ValueError(
            f"task.max_positions={wanted} exceeds the {limit} positions the pretrained encoder knows; "
            f"set task.max_positions={limit} (longer examples are then truncated, see task.shorten_method)"
        )
