"""Load the pretrained encoder a fine-tuning model starts from, with clear errors."""

from ...checkpoints import load_encoder


def load_pretrained_encoder(model_path: str, modality: str, dictionary=None):
    """The student encoder of ``model_path`` (ours or Meta's), checked to be of ``modality``.

    The encoder is returned in train mode, ready to be fine-tuned; its EMA teacher and
    decoder are gone. For text, ``dictionary`` must have the checkpoint's vocabulary size.
    """
    if not model_path:
        raise ValueError("model.model_path is required: the pretrained data2vec checkpoint to fine-tune")
    encoder = load_encoder(model_path, dictionary=dictionary)
    found = str(encoder.cfg.supported_modality).upper()
    if found != modality.upper():
        raise ValueError(f"{model_path} is a {found} model; this task needs a {modality.upper()} checkpoint")
    encoder.train()
    return encoder
