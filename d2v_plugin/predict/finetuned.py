"""A fine-tuned model (pretrained encoder + task head) read back for prediction.

:func:`read_finetuned` takes a fine-tuning checkpoint (``checkpoint_best.pt`` of a GLUE /
text-classification or SQuAD run) or a directory written by ``d2v-export --format
inference`` from one, and returns a :class:`Finetuned` record: the model's name and config,
its weights, the class names and the text tokenizer. Neither the fine-tuning data nor
fairseq's task is needed once exported; a checkpoint reads its class names and tokenizer
from the fine-tuning data directory its config names (or they are passed in).
:func:`build_model` turns the record into the fairseq model, weights loaded, in eval mode.
"""

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

from ..checkpoints import FINETUNED_MODELS, _load_strict, _model_cfg_dict, finetuned_encoder, model_config, read_checkpoint
from .text_tokenizer import TokenizerSpec, from_classification_data, from_squad_task


@dataclass
class Finetuned:
    name: str  # fairseq model name (d2v_text_classification, d2v_span_qa, ...)
    model_cfg: Dict[str, Any]  # the fine-tuning model's config, pretrained_model_args included
    task_cfg: Dict[str, Any]  # the fine-tuning task's config (what prediction needs of it)
    state: Dict[str, torch.Tensor]  # the whole model's weights
    path: str  # where it was read from
    classes: Optional[List[str]] = None  # names of the outputs of a classification head
    tokenizer: Optional[TokenizerSpec] = None  # text models
    dict_path: Optional[str] = None  # text models: the input dictionary (dict.txt, <mask> not listed)


def _label_names(data_dir: str) -> Optional[List[str]]:
    from fairseq.data import Dictionary

    path = os.path.join(data_dir, "label", "dict.txt")
    if not os.path.isfile(path):
        return None
    labels = Dictionary.load(path)
    return list(labels.symbols[labels.nspecial:])


def _from_checkpoint(path: str, ckpt: Dict[str, Any], values: Dict[str, Any]) -> Finetuned:
    from omegaconf import OmegaConf

    name = values["_name"]
    task = ckpt["cfg"].get("task") or {}
    task = OmegaConf.to_container(task, resolve=True) if OmegaConf.is_config(task) else dict(task)
    rec = Finetuned(name, values, task, ckpt["model"], path)
    if name == "d2v_text_classification":
        rec.dict_path = os.path.join(task.get("data", ""), "input0", "dict.txt")
        rec.tokenizer = from_classification_data(task.get("data", ""))
        if not task.get("regression_target"):
            rec.classes = _label_names(task.get("data", ""))
    elif name == "d2v_span_qa":
        rec.dict_path = task.get("dict_path")
        rec.tokenizer = from_squad_task(task)
    return rec


def find_finetuned(path: str) -> Optional[Finetuned]:
    """The fine-tuned model of a checkpoint or inference export, read once; None when the
    file holds a pretrained encoder only."""
    from ..export.inference import is_inference_dir, read_config, read_finetuned_export

    if is_inference_dir(path):
        return read_finetuned_export(path) if read_config(path).get("finetuned") else None
    ckpt = read_checkpoint(path)
    values = _model_cfg_dict(ckpt, path)
    return _from_checkpoint(path, ckpt, values) if values.get("_name") in FINETUNED_MODELS else None


def read_finetuned(path: str) -> Finetuned:
    """The fine-tuned model of a checkpoint or of an inference export directory."""
    from ..export.inference import is_inference_dir

    rec = find_finetuned(path)
    if rec is None:
        what = ("holds an exported encoder without a task head (exported from a pretraining checkpoint)" if is_inference_dir(path)
                else f"is a pretraining checkpoint, not a fine-tuned model (one of {', '.join(FINETUNED_MODELS)})")
        raise ValueError(f"{path} {what}; d2v_plugin.load_encoder(path) reads it")
    return rec


def input_dictionary(rec: Finetuned):
    from ..tasks._common import load_text_dictionary

    if not rec.dict_path or not os.path.isfile(rec.dict_path):
        raise FileNotFoundError(
            f"{rec.path}: the input dictionary {rec.dict_path or '(none recorded)'} does not exist "
            "(was the fine-tuning data moved? export the model with d2v-export --format inference while it is there)"
        )
    return load_text_dictionary(rec.dict_path)


def _text_classification(rec: Finetuned, encoder):
    from ..models.finetuning.text_classification import Data2VecTextClassificationConfig, Data2VecTextClassificationModel

    return Data2VecTextClassificationModel(model_config(rec.model_cfg, Data2VecTextClassificationConfig), encoder)


def _span_qa(rec: Finetuned, encoder):
    from ..models.finetuning.span_qa import SpanQAConfig, SpanQAModel

    return SpanQAModel(model_config(rec.model_cfg, SpanQAConfig), encoder, pad_idx=1)


def _ctc(rec: Finetuned, encoder):
    from ..models.finetuning.ctc import D2vCtcConfig, D2vCtcModel

    cfg = model_config(rec.model_cfg, D2vCtcConfig)
    return D2vCtcModel(cfg, encoder, len(cfg.target_symbols))


def _image_classification(rec: Finetuned, encoder):
    from ..models.finetuning.image_classification import ImageClassificationModel, ImageClassificationModelConfig

    cfg = model_config(rec.model_cfg, ImageClassificationModelConfig)
    return ImageClassificationModel(cfg, encoder, cfg.num_classes)


# model name -> (record, encoder) -> the fine-tuned model around that encoder
HEADS: Dict[str, Callable] = {
    "d2v_text_classification": _text_classification,
    "d2v_span_qa": _span_qa,
    "d2v_ctc": _ctc,
    "d2v_image_classification": _image_classification,
}


def build_model(rec: Finetuned, dictionary=None):
    """The fine-tuned fairseq model of ``rec``, weights loaded, in eval mode."""
    head = HEADS.get(rec.name)
    if head is None:
        raise ValueError(f"{rec.path}: no predictor for {rec.name} models (supported: {', '.join(HEADS)})")
    encoder, _ = finetuned_encoder(rec.model_cfg, rec.state, dictionary, rec.path)
    model = head(rec, encoder)
    _load_strict(model, rec.state, rec.path)
    return model.eval()
