"""Load the student encoder of a data2vec checkpoint (ours or Meta's) for inference.

Meta's checkpoints store their full training config (``cfg``) with fields this plugin
does not implement (other modalities' options, dead flags): only the fields our
dataclasses know are kept, recursively, so any checkpoint of a supported architecture
loads whatever its sizes.
"""

import dataclasses
import logging
import os
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf

logger = logging.getLogger(__name__)


class VocabularyInfo:
    """What the text modality needs from a dictionary when no task is at hand."""

    def __init__(self, size: int, pad: int = 1):
        self.size = size
        self.pad_index = pad

    def __len__(self):
        return self.size

    def pad(self):
        return self.pad_index


class _TaskInfo:
    def __init__(self, dictionary):
        self.source_dictionary = dictionary


def read_checkpoint(path: str) -> Dict[str, Any]:
    """``torch.load`` with ``weights_only=True``; fairseq's Namespace is allowed on import."""
    import d2v_plugin  # noqa: F401  (registers the safe globals)

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / truncated / not a checkpoint
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e


def known_fields(dc_type, values: Dict[str, Any]) -> Dict[str, Any]:
    """Keep only the keys ``dc_type`` declares; recurse into nested dataclass fields."""
    fields = {f.name: f for f in dataclasses.fields(dc_type)}
    out = {}
    for key, value in values.items():
        f = fields.get(key)
        if f is None or key == "_name":
            continue
        nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested) and isinstance(value, dict):
            value = known_fields(type(nested), value)
        out[key] = value
    return out


def model_config(model_cfg: Dict[str, Any], dc_type):
    """A resolved ``dc_type`` config from a checkpoint's ``cfg.model`` dict."""
    values = known_fields(dc_type, model_cfg)
    root = OmegaConf.create(
        {
            "model": OmegaConf.merge(OmegaConf.structured(dc_type), values),
            "optimization": {"max_update": model_cfg.get("max_update", 0) or 0},
            "common": {"seed": model_cfg.get("seed", 1) or 1},
        }
    )
    OmegaConf.resolve(root)
    return root.model


def _model_cfg_dict(ckpt: Dict[str, Any], path: str) -> Dict[str, Any]:
    cfg = ckpt.get("cfg")
    if cfg is not None and cfg.get("model") is not None:
        model = cfg["model"]
        return OmegaConf.to_container(model, resolve=True) if OmegaConf.is_config(model) else dict(model)
    args = ckpt.get("args")
    if args is not None:
        return vars(args)
    raise ValueError(f"{path} holds no model configuration (neither 'cfg' nor 'args')")


def load_encoder(path: str, dictionary=None):
    """The student encoder of a data2vec 2.0 checkpoint, in eval mode, without EMA teacher or decoder.

    ``encoder.extract_features(source, padding_mask=None)`` returns ``{"x": (B, T, C),
    "padding_mask": ...}``; image outputs have the CLS token removed. ``dictionary`` (a
    fairseq Dictionary) is only used to check a text checkpoint's vocabulary size.
    """
    from .models.data2vec2 import Data2VecMultiConfig, Data2VecMultiModel

    ckpt = read_checkpoint(path)
    values = _model_cfg_dict(ckpt, path)
    name = values.get("_name") or values.get("arch")
    if name != "data2vec_multi":
        raise ValueError(f"{path}: model {name!r} is not supported by load_encoder (expected data2vec_multi)")
    cfg = model_config(values, Data2VecMultiConfig)
    cfg.skip_ema = True
    state = {k: v for k, v in ckpt["model"].items() if k != "_ema"}
    task = None
    if str(cfg.supported_modality).upper() == "TEXT":
        key = "modality_encoders.TEXT.local_encoder.embed_tokens.weight"
        vocab = state[key].size(0)
        if dictionary is not None and len(dictionary) != vocab:
            raise ValueError(f"dictionary has {len(dictionary)} symbols but {path} was trained with {vocab}")
        task = _TaskInfo(dictionary if dictionary is not None else VocabularyInfo(vocab))
    model = Data2VecMultiModel(cfg, task=task, skip_ema=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its own config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model.remove_pretraining_modules()
    model.eval()
    return model
