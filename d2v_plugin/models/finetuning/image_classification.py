"""``d2v_image_classification``: a data2vec image encoder (2.0 or 1.0, ours or Meta's) with a classification head.

Fine-tuning (Meta's data2vec 2.0 recipe, fairseq ``examples/data2vec/models/
mae_image_classification.py``): the encoder's patch outputs are mean-pooled (or the CLS
output is taken), normalised by a LayerNorm on the pooled vector (``use_fc_norm``), and a
linear layer (truncated-normal init, std 0.02) gives the logits. Stochastic depth rises
linearly to ``drop_path_rate`` over the blocks; layer-wise learning-rate decay scales each
block's learning rate by ``layer_decay ** (L + 1 - layer)`` through fairseq's per-parameter
``optim_overrides`` (a composite optimizer with ``dynamic_groups: true`` turns them into
parameter groups). Mixup / cutmix and label smoothing live in the criterion
(``d2v_image_classification``), augmentation in the task.

Linear probing (``linear_probe=true``): the encoder is frozen and kept in eval mode (no
dropout, no drop path); the pooled features go through a BatchNorm without affine
parameters, then a linear layer (MAE's linear-probe head).

The pretrained encoder's architecture is recorded in ``model.pretrained_model_args`` and the
class names in ``model.class_names``, so a fine-tuned checkpoint re-loads without the
pretrained file or the data (``d2v_plugin.classify.ImageClassifier``).
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from omegaconf import MISSING, OmegaConf

from ..architectures import architecture_of
from .pretrained import encoder_from_args, finetuning_encoder, load_pretrained_encoder, remember

logger = logging.getLogger(__name__)

POOLING = ChoiceEnum(["mean_pooling", "cls_token"])


@dataclass
class ImageClassificationModelConfig(FairseqDataclass):
    model_path: str = field(default=MISSING, metadata={"help": "pretrained data2vec image checkpoint (2.0 or 1.0, ours or Meta's, e.g. base_imagenet.pt)"})
    num_classes: int = field(default=0, metadata={"help": "outputs of the head; 0 = the number of class folders of task.data/train"})
    class_names: Optional[List[str]] = field(
        default=None, metadata={"help": "set automatically at the first build: the class folder names, so predictions can be named"}
    )
    linear_probe: bool = field(
        default=False,
        metadata={"help": "linear probing: frozen encoder (eval mode), BatchNorm without affine on the pooled features, linear head"},
    )
    prediction_mode: POOLING = field(default="mean_pooling", metadata={"help": "mean_pooling of the patch outputs (Meta's recipe) or the cls_token output"})
    use_fc_norm: bool = field(default=True, metadata={"help": "fine-tuning: LayerNorm on the pooled features before the head (Meta's recipe)"})
    drop_path_rate: float = field(default=0.1, metadata={"help": "stochastic depth of the last block, rising linearly from 0 (Meta: base 0.1, large 0.2)"})
    layer_decay: float = field(default=0.65, metadata={"help": "layer-wise lr decay: block i of L gets lr * layer_decay ** (L + 1 - i); 0 or 1 = off"})
    encoder_dropout: float = field(default=0.0, metadata={"help": "dropout after attention and feed-forward (2.0: encoder_dropout, post_mlp_drop; 1.0: none)"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on attention weights"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout inside the feed-forward network"})
    no_pretrained_weights: bool = field(
        default=False, metadata={"help": "build the encoder from the checkpoint's config but keep it randomly initialised (a baseline)"}
    )
    pretrained_model_args: Any = field(
        default=None,
        metadata={"help": "set automatically at the first build: the pretrained encoder's config, so fine-tuned checkpoints re-load without model_path"},
    )


def regularised_args(args: Dict[str, Any], cfg: ImageClassificationModelConfig) -> Dict[str, Any]:
    """The encoder config ``args`` (a dict with ``_name``) with the fine-tuning run's drop path
    and dropouts, set as Meta's fine-tuning sets them."""
    args = dict(args)
    if args["_name"] == "data2vec_multi":
        image = dict(args["modalities"]["image"])
        prenet, depth = image["prenet_depth"], args["depth"]
        dpr = np.linspace(0, cfg.drop_path_rate, depth).tolist()
        image["start_drop_path_rate"] = dpr[0]
        image["end_drop_path_rate"] = max(0.0, dpr[prenet - 1]) if prenet > 0 else 0.0
        args["start_drop_path_rate"], args["end_drop_path_rate"] = dpr[min(prenet, depth - 1)], dpr[-1]
        args["modalities"] = dict(args["modalities"], image=image)
        args.update(encoder_dropout=cfg.encoder_dropout, post_mlp_drop=cfg.encoder_dropout,
                    attention_dropout=cfg.attention_dropout, activation_dropout=cfg.activation_dropout,
                    dropout_input=0.0, layerdrop=0.0)
    else:  # data2vec_vision (1.0)
        args.update(drop_path=cfg.drop_path_rate, attention_dropout=cfg.attention_dropout)
    return args


def load_image_encoder(model_path: str, cfg: ImageClassificationModelConfig):
    """The pretrained image encoder of ``model_path``, rebuilt with the run's regularisation."""
    pretrained = load_pretrained_encoder(model_path, "IMAGE")
    args = OmegaConf.to_container(OmegaConf.structured(pretrained.cfg), resolve=True, enum_to_str=True)
    args["_name"] = architecture_of(pretrained).name
    encoder = encoder_from_args(regularised_args(args, cfg), None)
    encoder.load_state_dict(pretrained.state_dict())
    encoder.train()
    return encoder


def encoder_blocks(encoder) -> List[nn.Module]:
    """The transformer blocks of an image encoder, bottom to top (2.0: prenet, then shared)."""
    if architecture_of(encoder).name == "data2vec_multi":
        return list(encoder.modality_encoders["IMAGE"].context_encoder.blocks) + list(encoder.blocks)
    return list(encoder.encoder.blocks)


def layer_lr_scales(encoder, decay: float) -> Dict[str, float]:
    """``{parameter name: lr scale}`` of layer-wise lr decay over the encoder's L blocks
    (the head, outside the encoder, keeps scale 1).

    data2vec 2.0 (Meta's mae_image_classification): block i (1-based) gets
    ``decay ** (L + 1 - i)``; every other encoder parameter (patch embedding, CLS token,
    norms) keeps scale 1. data2vec 1.0 (BEiT's layer ids, which Meta's code means to use but
    whose names miss our/Meta's ``encoder.blocks.*``): patch embedding and CLS token are layer 0
    (``decay ** (L + 1)``), block i layer i, the relative position bias layer L, the final norm
    L + 1.
    """
    blocks = encoder_blocks(encoder)
    num_layers = len(blocks) + 1
    scale = [decay ** (num_layers - i) for i in range(num_layers + 1)]
    block_of = {id(p): i + 1 for i, b in enumerate(blocks) for p in b.parameters()}
    v1 = architecture_of(encoder).name != "data2vec_multi"
    out = {}
    for name, p in encoder.named_parameters():
        if id(p) in block_of:
            out[name] = scale[block_of[id(p)]]
        elif v1 and (name.startswith("patch_embed") or name == "cls_emb"):
            out[name] = scale[0]
        elif v1 and "rel_pos_bias" in name:
            out[name] = scale[num_layers - 1]
        else:
            out[name] = 1.0
    return out


@register_model("d2v_image_classification", dataclass=ImageClassificationModelConfig)
class ImageClassificationModel(BaseFairseqModel):
    def __init__(self, cfg: ImageClassificationModelConfig, encoder, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.linear_probe = bool(cfg.linear_probe)
        self.cls_pooling = str(cfg.prediction_mode) == "cls_token"
        dim = encoder.embed_dim
        if self.linear_probe:
            encoder.requires_grad_(False)
            self.fc_norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        else:
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if cfg.use_fc_norm else None
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01 if self.linear_probe else 0.02)
        nn.init.zeros_(self.head.bias)
        self._set_optim_overrides()

    def _set_optim_overrides(self):
        """No weight decay on biases and 1-D parameters; layer-wise lr decay on the encoder."""
        decay = self.cfg.layer_decay
        scales = layer_lr_scales(self.encoder, decay) if 0 < decay < 1 and not self.linear_probe else {}
        for name, p in self.named_parameters():
            opt = {}
            if p.dim() == 1 or name.endswith(".bias"):
                opt["weight_decay_scale"] = 0
            s = scales.get(name[len("encoder."):], 1.0) if name.startswith("encoder.") else 1.0
            if s != 1.0:
                opt["lr_scale"] = s
            p.optim_overrides = {"optimizer": opt}

    @classmethod
    def build_model(cls, cfg: ImageClassificationModelConfig, task):
        first_build = cfg.pretrained_model_args is None
        if first_build:
            names = getattr(task, "class_names", None)
            if names:
                remember(cfg, "class_names", list(names))
            if cfg.num_classes <= 0:
                remember(cfg, "num_classes", len(names or []))
        if cfg.num_classes <= 0:
            raise ValueError("model.num_classes must be positive (0 = the number of class folders of task.data/train)")
        if cfg.class_names and len(cfg.class_names) != cfg.num_classes:
            raise ValueError(f"model.num_classes={cfg.num_classes} but the data has {len(cfg.class_names)} classes")
        encoder, args = finetuning_encoder(cfg, task, "IMAGE", load=lambda path: load_image_encoder(path, cfg))
        if first_build and cfg.no_pretrained_weights:
            encoder = encoder_from_args(args, task)
        return cls(cfg, encoder, cfg.num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.linear_probe:
            self.encoder.eval()  # frozen features: no dropout, no drop path
        return self

    def features(self, source):
        """Pooled encoder features (B, C), before the feature norm."""
        x = self.encoder.extract_features(source, remove_extra_tokens=not self.cls_pooling)["x"]
        return x[:, 0] if self.cls_pooling else x.mean(dim=1)

    def forward(self, source, **unused):
        """Logits (B, num_classes) of images (B, 3, H, W) normalised with the ImageNet mean and std."""
        if self.linear_probe:
            with torch.no_grad():
                x = self.features(source)
        else:
            x = self.features(source)
        if self.fc_norm is not None:
            x = self.fc_norm(x)
        return self.head(x)

    def max_positions(self):
        return None
