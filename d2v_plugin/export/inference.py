"""Slim inference export: the student's weights as safetensors plus a JSON config.

``export_inference(checkpoint, out_dir, dtype)`` writes, into ``out_dir``:

- ``model.safetensors``: the student's state dict (no EMA teacher, decoder, regression head
  or optimizer state), floating-point tensors cast to ``dtype`` (fp32, bf16 or fp16);
- ``config.json``: ``{"format": "d2v_plugin.inference", "version": 1, "architecture",
  "model" (our resolved model config), "dtype", "vocab_size" (text)}``;
- ``dict.txt`` for text, copied when the checkpoint has one beside it (``dict.txt`` or
  ``NAME.dict.txt`` for ``NAME.checkpoint.pt`` / ``NAME.pt``).

``load_inference(out_dir)`` builds the model back from ``config.json`` and the safetensors
file only: nothing is unpickled. ``d2v_plugin.load_encoder(out_dir)`` uses it.
"""

import json
import os
import shutil
from typing import Any, Dict, Optional

import torch

FORMAT = "d2v_plugin.inference"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
DICT = "dict.txt"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def cast_state(state: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Floating-point tensors cast to ``dtype``, others as they are; every tensor its own
    contiguous copy (safetensors refuses tensors that share memory)."""
    return {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in state.items()
    }


def model_config_dict(model) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(model.cfg), resolve=True, enum_to_str=True)


def _dictionary_beside(path: str) -> Optional[str]:
    folder, base = os.path.split(os.path.abspath(path))
    stems = [base]
    for suffix in (".checkpoint.pt", ".pt"):
        if base.endswith(suffix):
            stems.append(base[: -len(suffix)])
            break
    for candidate in [os.path.join(folder, f"{s}.{DICT}") for s in stems[1:]] + [os.path.join(folder, DICT)]:
        if os.path.isfile(candidate):
            return candidate
    return None


def _dir_bytes(paths) -> int:
    return sum(os.path.getsize(p) for p in paths)


def export_inference(path: str, out_dir: str, dtype: str = "fp32") -> Dict[str, Any]:
    """Export the student of checkpoint ``path`` into ``out_dir``; returns a summary dict
    (``architecture``, ``modality``, ``dtype``, ``parameters``, ``checkpoint_bytes``,
    ``exported_bytes``, ``size_reduction``, ``files``).

    A fine-tuned checkpoint (text classification, SQuAD, CTC speech recognition, image
    classification) is exported whole: encoder and head, with a ``finetuned`` section in
    ``config.json`` (the model and task config, the class names) and, for text, the
    dictionary and tokenizer files, so that ``d2v_plugin.load_model(out_dir)`` predicts from
    raw input without the fine-tuning data."""
    from ..predict.finetuned import HEADS

    target = torch_dtype(dtype)
    finetuned = _finetuned_record(path)
    if finetuned is not None and finetuned.name in HEADS:
        return _export_finetuned(finetuned, path, out_dir, dtype, target)
    from ..checkpoints import load_student

    model = load_student(path)
    state = cast_state(model.state_dict(), target)
    config = _config(model, dtype)
    files = _write(out_dir, config, state)
    if "vocab_size" in config:
        dictionary = _dictionary_beside(path)
        if dictionary is not None:
            files.append(shutil.copyfile(dictionary, os.path.join(out_dir, DICT)))
    return _summary(path, out_dir, config, state, files)


def _finetuned_record(path: str):
    """The fine-tuned model of checkpoint ``path`` (None for a pretraining checkpoint or an export)."""
    from ..predict.finetuned import find_finetuned

    return None if is_inference_dir(path) else find_finetuned(path)


def _config(encoder, dtype: str) -> Dict[str, Any]:
    from ..models.architectures import architecture_of

    arch = architecture_of(encoder)
    config: Dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": arch.name,
        "modality": encoder.mode,
        "dtype": dtype,
        "model": model_config_dict(encoder),
    }
    config["model"]["_name"] = arch.name  # as in a fairseq checkpoint's cfg.model
    embedding = encoder.state_dict().get(arch.vocab_key) if arch.vocab_key is not None else None
    if embedding is not None:
        config["vocab_size"] = int(embedding.size(0))
    return config


def _write(out_dir: str, config: Dict[str, Any], state: Dict[str, torch.Tensor]):
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    weights = os.path.join(out_dir, WEIGHTS)
    save_file(state, weights, metadata={"format": FORMAT, "architecture": config["architecture"], "dtype": config["dtype"]})
    config_path = os.path.join(out_dir, CONFIG)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return [weights, config_path]


def _export_finetuned(rec, path: str, out_dir: str, dtype: str, target: torch.dtype) -> Dict[str, Any]:
    from ..predict.finetuned import build_model, input_dictionary
    from ..predict.text_tokenizer import EXPORT_FILES

    dictionary = input_dictionary(rec) if rec.dict_path else None
    model = build_model(rec, dictionary)
    state = cast_state(model.state_dict(), target)
    config = _config(model.encoder, dtype)
    tokenizer = None
    copies = []
    if rec.tokenizer is not None:
        files = {}
        for what, src in rec.tokenizer.files.items():
            if not os.path.isfile(src):
                raise FileNotFoundError(f"{path}: its tokenizer file {src} ({what}) does not exist")
            files[what] = EXPORT_FILES[what]
            copies.append((src, EXPORT_FILES[what]))
        tokenizer = {"kind": rec.tokenizer.kind, "files": files}
    config["finetuned"] = {"name": rec.name, "model": rec.model_cfg, "task": rec.task_cfg,
                           "classes": rec.classes, "tokenizer": tokenizer}
    written = _write(out_dir, config, state)
    if rec.dict_path:
        written.append(shutil.copyfile(rec.dict_path, os.path.join(out_dir, DICT)))
    for src, name in copies:
        written.append(shutil.copyfile(src, os.path.join(out_dir, name)))
    return _summary(path, out_dir, config, state, written)


def _summary(path, out_dir, config, state, files) -> Dict[str, Any]:
    ckpt_bytes = _dir_bytes(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else os.path.getsize(path)
    out_bytes = _dir_bytes(files)
    summary = {
        "format": "inference",
        "checkpoint": path,
        "out_dir": out_dir,
        "architecture": config["architecture"],
        "modality": config["modality"],
        "dtype": config["dtype"],
        "parameters": sum(v.numel() for v in state.values()),
        "checkpoint_bytes": ckpt_bytes,
        "exported_bytes": out_bytes,
        "size_reduction": ckpt_bytes / out_bytes,
        "files": [os.path.basename(p) for p in files],
    }
    if "finetuned" in config:
        summary["head"] = config["finetuned"]["name"]
    return summary


def is_inference_dir(path: str) -> bool:
    """True for an exported directory, or the ``config.json`` inside one."""
    if os.path.isdir(path):
        return True
    return os.path.basename(path) == CONFIG


def read_config(path: str) -> Dict[str, Any]:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(folder, CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} is not an exported d2v_plugin inference directory: no {CONFIG}")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {config_path}: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a d2v_plugin inference config (format {FORMAT!r} expected)")
    if config.get("version") != VERSION:
        raise ValueError(f"{config_path}: version {config.get('version')!r} is not supported (expected {VERSION})")
    return config


def load_inference(path: str, dictionary=None, dtype: Optional[torch.dtype] = None):
    """The student model of an exported directory (or its ``config.json``), in eval mode.

    Weights come from ``model.safetensors`` (no pickle). The model is built in fp32 and the
    stored weights are cast into it, unless ``dtype`` (a torch dtype) asks for another.
    """
    from ..checkpoints import VocabularyInfo, _load_strict, _TaskInfo, model_config
    from ..models.architectures import architecture

    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = read_config(folder)
    config_path = os.path.join(folder, CONFIG)
    arch = architecture(config.get("architecture"), config_path)
    cfg = model_config(dict(config["model"]), arch.config)
    cfg.skip_ema = True
    task = None
    if "vocab_size" in config:
        vocab = int(config["vocab_size"])
        if dictionary is not None and len(dictionary) != vocab:
            raise ValueError(f"dictionary has {len(dictionary)} symbols but {folder} was trained with {vocab}")
        task = _TaskInfo(dictionary if dictionary is not None else VocabularyInfo(vocab))
    weights = os.path.join(folder, WEIGHTS)
    state = _read_weights(folder)
    if "finetuned" in config:  # the encoder of a fine-tuned model: its head is left out
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    model = arch.model(cfg, task=task, skip_ema=True)
    model.remove_pretraining_modules()
    _load_strict(model, state, weights)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    return model


def _read_weights(folder: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} does not exist")
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {weights}: {e}") from e


def read_finetuned_export(path: str):
    """The :class:`d2v_plugin.predict.finetuned.Finetuned` record of an exported fine-tuned model."""
    from ..predict.finetuned import Finetuned
    from ..predict.text_tokenizer import TokenizerSpec

    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = read_config(folder)
    section = config.get("finetuned")
    if section is None:
        raise ValueError(
            f"{folder} holds an exported encoder without a task head (exported from a pretraining checkpoint); "
            "d2v_plugin.load_encoder reads it"
        )
    state = {k: v.float() if v.is_floating_point() else v for k, v in _read_weights(folder).items()}
    tokenizer = section.get("tokenizer")
    text = "vocab_size" in config
    return Finetuned(
        name=section["name"], model_cfg=section["model"], task_cfg=section.get("task") or {}, state=state,
        path=folder, classes=section.get("classes"),
        tokenizer=(TokenizerSpec.from_json(tokenizer, folder) if tokenizer else TokenizerSpec("none")) if text else None,
        dict_path=os.path.join(folder, DICT) if text else None,
    )
