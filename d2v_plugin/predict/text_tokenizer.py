"""The tokenizer of a fine-tuned text model: raw text -> fairseq dictionary ids.

Which tokenizer a model uses is recorded at data preparation: ``summary.json`` of a
classification data directory (``d2v_plugin.prep.classification``: ``spm``, ``gpt2`` or
``none``) or the SQuAD task's ``bpe`` / ``sentencepiece_model`` / ``gpt2_*`` settings.
:class:`TokenizerSpec` holds that record; :class:`TextTokenizer` encodes exactly as the
fine-tuning data was encoded (the same classes as the SQuAD pipeline use).
"""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

KINDS = ("sentencepiece", "gpt2", "none")
# file names inside an inference export
EXPORT_FILES = {"model": "sentencepiece.model", "encoder_json": "encoder.json", "vocab_bpe": "vocab.bpe"}


@dataclass
class TokenizerSpec:
    kind: str  # sentencepiece | gpt2 | none (whitespace-separated dictionary symbols)
    files: Dict[str, str] = field(default_factory=dict)  # sentencepiece: model; gpt2: encoder_json, vocab_bpe

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {self.kind!r} (one of {', '.join(KINDS)})")

    def to_json(self) -> Dict:
        return {"kind": self.kind, "files": dict(self.files)}

    @classmethod
    def from_json(cls, values: Dict, folder: Optional[str] = None) -> "TokenizerSpec":
        files = {k: (os.path.join(folder, v) if folder else v) for k, v in (values.get("files") or {}).items()}
        return cls(values["kind"], files)


def parse_spec(spec: str) -> TokenizerSpec:
    """``spm:MODEL``, ``gpt2:DIR`` (encoder.json and vocab.bpe inside) or ``none``."""
    if spec == "none":
        return TokenizerSpec("none")
    if spec.startswith("spm:"):
        return TokenizerSpec("sentencepiece", {"model": spec[4:]})
    if spec.startswith("gpt2:"):
        d = spec[5:]
        return TokenizerSpec("gpt2", {"encoder_json": os.path.join(d, "encoder.json"), "vocab_bpe": os.path.join(d, "vocab.bpe")})
    raise ValueError(f"tokenizer {spec!r}: use spm:MODEL, gpt2:DIR or none")


def from_classification_data(data_dir: str) -> Optional[TokenizerSpec]:
    """The tokenizer recorded in ``DATA/summary.json`` (None when there is no such file)."""
    path = os.path.join(data_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        recorded = json.load(f).get("tokenizer") or {}
    kind = recorded.get("kind")
    if kind == "spm":
        return TokenizerSpec("sentencepiece", {"model": recorded["path"]})
    if kind == "gpt2":
        return parse_spec(f"gpt2:{recorded['path']}")
    if kind == "none":
        return TokenizerSpec("none")
    return None


def from_squad_task(task: Dict) -> TokenizerSpec:
    """The tokenizer of a SQuAD fine-tuning run (its task config), with the task's defaults."""
    beside = os.path.dirname(os.path.abspath(task["dict_path"]))
    if task.get("bpe") == "sentencepiece":
        return TokenizerSpec("sentencepiece", {"model": task.get("sentencepiece_model") or os.path.join(beside, "spm.model")})
    return TokenizerSpec("gpt2", {
        "encoder_json": task.get("gpt2_encoder_json") or os.path.join(beside, "encoder.json"),
        "vocab_bpe": task.get("gpt2_vocab_bpe") or os.path.join(beside, "vocab.bpe"),
    })


class _Whitespace:
    name = "none"

    def __init__(self, dictionary):
        self.dictionary = dictionary

    def encode(self, text: str):
        ids = [self.dictionary.index(w) for w in text.split()]
        return ids, None


class TextTokenizer:
    """Encodes text into dictionary ids (no ``<s>`` / ``</s>``), and SQuAD-style with character spans."""

    def __init__(self, spec: TokenizerSpec, dictionary):
        from ..data.squad_features import build_tokenizer

        self.spec = spec
        self.dictionary = dictionary
        for what, path in spec.files.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"tokenizer file {path} ({what}) does not exist; pass tokenizer='spm:MODEL' / 'gpt2:DIR'")
        if spec.kind == "none":
            self.impl = _Whitespace(dictionary)
        else:
            self.impl = build_tokenizer(
                spec.kind, dictionary, sentencepiece_model=spec.files.get("model"),
                gpt2_encoder_json=spec.files.get("encoder_json"), gpt2_vocab_bpe=spec.files.get("vocab_bpe"),
            )

    def encode(self, text: str) -> List[int]:
        return list(self.impl.encode(text)[0])
