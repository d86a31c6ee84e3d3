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


def _num_updates(ckpt: Dict[str, Any]) -> int:
    history = ckpt.get("optimizer_history") or []
    return int(history[-1].get("num_updates", 0)) if history else 0


def set_dotted(values: Dict[str, Any], dc_type, key: str, value: Any) -> None:
    """``values["a"]["b"] = value`` for ``key`` "a.b", checked against the fields of ``dc_type``."""
    parts = key.split(".")
    node, node_type = values, dc_type
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node_type)} if node_type is not None else {}
        f = fields.get(part)
        if f is None:
            raise KeyError(f"override {key!r}: {'.'.join(parts[:i + 1])} is not a field of {node_type.__name__}")
        if i == len(parts) - 1:
            node[part] = value
            return
        nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        node_type = type(nested) if dataclasses.is_dataclass(nested) else None
        if node_type is None:
            raise KeyError(f"override {key!r}: {'.'.join(parts[:i + 1])} has no sub-fields")
        node = node.setdefault(part, {})


def _vocabulary_task(arch, state, dictionary, path: str):
    """What a text model needs to be built (its vocabulary, from the embedding in ``state``,
    checked against ``dictionary`` when given); None for other modalities."""
    if arch.vocab_key is None or arch.vocab_key not in state:
        return None
    vocab = state[arch.vocab_key].size(0)
    if dictionary is not None and len(dictionary) != vocab:
        raise ValueError(f"dictionary has {len(dictionary)} symbols but {path} was trained with {vocab}")
    return _TaskInfo(dictionary if dictionary is not None else VocabularyInfo(vocab))


def _build(path: str, ckpt: Dict[str, Any], dictionary, purpose: str, overrides: Optional[Dict[str, Any]] = None):
    """(model, student state) for a data2vec checkpoint of any supported architecture
    (:mod:`d2v_plugin.models.architectures`), ours or Meta's."""
    from .compat import check_unsupported
    from .models.architectures import architecture

    values = _model_cfg_dict(ckpt, path)
    name = values.get("_name") or values.get("arch")
    arch = architecture(name, path)
    if name == "data2vec_multi":
        check_unsupported(values, purpose, path)
    values = arch.from_meta_config(dict(values))
    for key, value in (overrides or {}).items():
        set_dotted(values, arch.config, key, value)
    cfg = model_config(values, arch.config)
    skip_ema = purpose != "training"
    cfg.skip_ema = skip_ema
    state = arch.from_meta_state(dict(ckpt["model"]))
    if skip_ema:
        state.pop("_ema", None)
    elif "_ema" not in state:
        logger.warning(f"{path} holds no EMA teacher (_ema): the teacher starts from the student")
    task = _vocabulary_task(arch, state, dictionary, path)
    model = arch.model(cfg, task=task, skip_ema=skip_ema)
    return model, state


def _load_strict(model, state, path: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: its weights do not fit the model its config describes: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]} (an option of the checkpoint's config that d2v_plugin builds differently?)"
        )


# fine-tuning models whose encoder (under ``encoder.``) records its architecture in
# ``model.pretrained_model_args``
FINETUNED_MODELS = ("d2v_text_classification", "d2v_span_qa", "d2v_image_classification", "d2v_ctc")


def finetuned_encoder(values: Dict[str, Any], state: Dict[str, Any], dictionary, path: str):
    """The encoder of a fine-tuned model, freshly built from its recorded architecture
    (``values``: the fine-tuning model's config; ``state``: the whole model's weights), and
    the encoder's weights (``encoder.*`` of ``state``, prefix removed), not yet loaded."""
    from .models.architectures import architecture
    from .models.finetuning.pretrained import encoder_from_args

    args = values.get("pretrained_model_args")
    if not args:
        raise ValueError(f"{path}: a {values.get('_name')} model without model.pretrained_model_args (the encoder's architecture)")
    arch = architecture(args.get("_name") or "data2vec_multi", path)
    encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    task = _vocabulary_task(arch, encoder_state, dictionary, path)
    return encoder_from_args(args, task), encoder_state


def _finetuned_student(path: str, ckpt: Dict[str, Any], dictionary=None):
    """The encoder of a fine-tuned checkpoint (its head dropped), built from the recorded architecture."""
    model, state = finetuned_encoder(_model_cfg_dict(ckpt, path), ckpt["model"], dictionary, path)
    _load_strict(model, state, path)
    model.eval()
    return model


def load_student(path: str, dictionary=None):
    """The student of a data2vec checkpoint (1.0 or 2.0, ours or Meta's), in eval mode,
    without EMA teacher, decoder or regression head (what fine-tuning starts from).
    ``path`` may also be a directory written by ``d2v-export --format inference`` (or its
    ``config.json``): then the weights come from its safetensors file; or a fine-tuned
    checkpoint (GLUE / text classification, SQuAD): then its encoder, without the head."""
    from .export.inference import is_inference_dir, load_inference

    if is_inference_dir(path):
        return load_inference(path, dictionary)
    ckpt = read_checkpoint(path)
    if _model_cfg_dict(ckpt, path).get("_name") in FINETUNED_MODELS:
        return _finetuned_student(path, ckpt, dictionary)
    model, state = _build(path, ckpt, dictionary, "features")
    _load_strict(model, state, path)
    model.remove_pretraining_modules()
    model.eval()
    return model


def load_encoder(path: str, dictionary=None):
    """The student encoder of a data2vec checkpoint (1.0 or 2.0, ours or Meta's, any modality)
    for feature extraction.

    Returns a :class:`d2v_plugin.Encoder` in eval mode: ``encoder(source, padding_mask=None,
    output_hidden_states=False)`` gives an :class:`d2v_plugin.EncoderOutput`
    (``last_hidden_state`` (B, T, C), ``padding_mask``, ``hidden_states``; the image CLS token
    removed, in ``cls``). ``dictionary`` (a fairseq Dictionary) only checks a text
    checkpoint's vocabulary size. Nothing in the file is executed (``weights_only`` loading).
    ``path`` may be an exported inference directory (``d2v-export --format inference``).
    """
    from .encoder import Encoder

    return Encoder(load_student(path, dictionary))


def load_pretraining_model(path: str, overrides: Optional[Dict[str, Any]] = None, dictionary=None):
    """The whole training model (student, EMA teacher, decoder or head) of a data2vec checkpoint
    (1.0 or 2.0), ours or Meta's, e.g. to continue pretraining or to replay a training step.

    ``overrides``: ``{"dotted.config.key": value}`` applied to the checkpoint's model config
    before building (``{"encoder_dropout": 0.0, "modalities.text.mask_noise_std": 0.0}``).
    The model comes back in train mode with the checkpoint's update count, and the teacher
    exactly as saved (``_ema``): the next ``set_num_updates(n + 1)`` makes one EMA step.
    """
    ckpt = read_checkpoint(path)
    model, state = _build(path, ckpt, dictionary, "training", overrides)
    model.eval()  # no EMA step while the update count is restored
    model.set_num_updates(_num_updates(ckpt))
    _load_strict(model, state, path)
    model.train()
    return model
