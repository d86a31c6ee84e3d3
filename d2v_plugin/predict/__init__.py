"""``d2v_plugin.load_model(path)``: a fine-tuned model that returns predictions.

``path`` is a fine-tuning checkpoint or its ``d2v-export --format inference`` directory.
What comes back depends on the head:

- text classification / regression (GLUE, any labelled text set): :class:`TextClassifier`,
  ``clf(["a sentence", ("a", "pair")])`` -> :class:`TextClassification` (probabilities,
  predicted class names);
- SQuAD: :class:`SpanReader`, ``reader(questions, contexts)`` -> :class:`SpanAnswer` list.

Nothing in the files is executed: checkpoints are read with ``weights_only=True``,
exports from safetensors and JSON.
"""

from typing import Optional, Union

import torch

from .finetuned import Finetuned, build_model, input_dictionary, read_finetuned
from .text import SpanAnswer, SpanReader, TextClassification, TextClassifier
from .text_tokenizer import TokenizerSpec, parse_spec

PREDICTORS = {"d2v_text_classification": TextClassifier, "d2v_span_qa": SpanReader}


def load_model(
    path: str,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: Optional[str] = None,
):
    """The predictor of the fine-tuned model at ``path`` (see the module docstring).

    ``device`` / ``dtype``: where and in which precision the model runs (outputs are fp32).
    ``tokenizer`` (text models): ``spm:MODEL``, ``gpt2:DIR`` or ``none``, replacing the one
    recorded at data preparation (needed when that file moved).
    """
    rec = read_finetuned(path)
    predictor = PREDICTORS.get(rec.name)
    if predictor is None:
        raise ValueError(f"{path}: no predictor for {rec.name} models (supported: {', '.join(PREDICTORS)})")
    if tokenizer is not None:
        rec.tokenizer = parse_spec(tokenizer)
    dictionary = input_dictionary(rec)
    return predictor(build_model(rec, dictionary), rec, dictionary, device, dtype)


__all__ = [
    "load_model", "Finetuned", "read_finetuned", "build_model", "TextClassifier", "TextClassification",
    "SpanReader", "SpanAnswer", "TokenizerSpec",
]
