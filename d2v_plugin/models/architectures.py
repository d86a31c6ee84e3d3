"""Every model architecture a data2vec checkpoint can hold, in one table.

``load_encoder``, ``load_pretraining_model`` and fine-tuning find the architecture of a
checkpoint by its ``cfg.model._name`` here. Each entry says how to read Meta's version of
it: Meta's config names (``from_meta_config``) and Meta's parameter names
(``from_meta_state``); both are identity for our own checkpoints.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

ARCHITECTURES: Dict[str, "Architecture"] = {}


def _same(values):
    return values


@dataclass(frozen=True)
class Architecture:
    name: str  # fairseq model name (cfg.model._name)
    config: type  # our config dataclass
    model: type  # model class: model(cfg, task=None, skip_ema=False); task only needs source_dictionary (text)
    modality: str  # "TEXT", "AUDIO" or "IMAGE"; None = read from the config (data2vec_multi)
    # checkpoint config values (a dict) -> values of ``config``: renames Meta's fields and sets
    # Meta's behaviour where our defaults differ from it (detected by a field only ours write)
    from_meta_config: Callable[[Dict[str, Any]], Dict[str, Any]] = _same
    # checkpoint model state -> our parameter names (``_ema`` included); identity for ours
    from_meta_state: Callable[[Dict[str, Any]], Dict[str, Any]] = _same
    # key of the token embedding in *our* state dict (text: the vocabulary size comes from it)
    vocab_key: Optional[str] = None


def register_architecture(arch: Architecture) -> Architecture:
    ARCHITECTURES[arch.name] = arch
    return arch


def architecture(name: Optional[str], source: str = "checkpoint") -> Architecture:
    """The entry for ``name``, or a ValueError that lists what is supported."""
    import d2v_plugin.models  # noqa: F401  (registers every architecture)

    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise ValueError(f"{source}: model {name!r} is not supported; d2v_plugin reads {sorted(ARCHITECTURES)}")
    return arch


def architecture_of(model) -> Architecture:
    """The entry whose model class ``model`` is an instance of."""
    import d2v_plugin.models  # noqa: F401

    for arch in ARCHITECTURES.values():
        if type(model) is arch.model:
            return arch
    raise ValueError(f"{type(model).__name__} is not a registered data2vec architecture")
