"""The pretrained encoder a fine-tuning model starts from, with clear errors.

At the first build the encoder comes from ``model.model_path`` (ours or Meta's checkpoint)
and its architecture is recorded in ``model.pretrained_model_args``, which fairseq saves
in every checkpoint of the fine-tuning run. Re-loading a fine-tuned checkpoint builds that
architecture from the record (its weights come from the checkpoint), so the pretrained
file is no longer needed.
"""

from omegaconf import DictConfig, OmegaConf, open_dict

from ...checkpoints import load_student, model_config
from ..architectures import architecture_of


def load_pretrained_encoder(model_path: str, modality: str, dictionary=None):
    """The student encoder of ``model_path`` (data2vec 1.0 or 2.0, ours or Meta's), checked to be of ``modality``.

    The encoder is returned in train mode, ready to be fine-tuned; its EMA teacher and
    decoder are gone. For text, ``dictionary`` must have the checkpoint's vocabulary size.
    """
    if not model_path:
        raise ValueError("model.model_path is required: the pretrained data2vec checkpoint to fine-tune")
    encoder = load_student(model_path, dictionary=dictionary)
    found = encoder.mode
    if found != modality.upper():
        raise ValueError(f"{model_path} is a {found} model; this task needs a {modality.upper()} checkpoint")
    encoder.train()
    return encoder


def encoder_from_args(args, task):
    """A freshly initialised encoder of a recorded architecture (``pretrained_model_args``;
    its ``_name`` says which, data2vec_multi when absent: records written before 1.0 existed)."""
    from ..architectures import architecture

    if isinstance(args, DictConfig):
        args = OmegaConf.to_container(args, resolve=True)
    arch = architecture(args.get("_name") or "data2vec_multi", "model.pretrained_model_args")
    enc_cfg = model_config(dict(args), arch.config)
    enc_cfg.skip_ema = True
    encoder = arch.model(enc_cfg, task=task, skip_ema=True)
    encoder.remove_pretraining_modules()
    return encoder


def finetuning_encoder(cfg, task, modality: str, load=None):
    """The encoder of a fine-tuning model whose config has ``model_path`` and ``pretrained_model_args``.

    ``load(model_path)`` loads the pretrained encoder (default: :func:`load_pretrained_encoder`
    with the task's dictionary). Returns ``(encoder, args)``: ``args`` is the recorded
    architecture.
    """
    if cfg.pretrained_model_args is not None:
        # re-loading a fine-tuned checkpoint: its weights are loaded after this
        return encoder_from_args(cfg.pretrained_model_args, task), cfg.pretrained_model_args
    if load is None:
        encoder = load_pretrained_encoder(cfg.model_path, modality, getattr(task, "source_dictionary", None))
    else:
        encoder = load(cfg.model_path)
    args = OmegaConf.to_container(OmegaConf.structured(encoder.cfg), resolve=True, enum_to_str=True)
    args["_name"] = architecture_of(encoder).name
    remember(cfg, "pretrained_model_args", args)
    return encoder, args


def remember(cfg, key, value):
    """Set ``cfg.key`` on the model config and on the run's own config, which checkpoints save.

    fairseq builds models from a merged copy of ``cfg.model`` whose parent is the run's
    root config; writing there too is what makes the value reach ``checkpoint*.pt``.
    """
    cfg[key] = value
    parent = cfg._get_parent() if OmegaConf.is_config(cfg) else None
    node = parent.get("model") if parent is not None and "model" in parent else None
    if node is not None and node is not cfg and node.get("_name") == cfg.get("_name"):
        with open_dict(node):
            node[key] = value
