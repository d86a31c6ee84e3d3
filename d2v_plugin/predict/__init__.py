"""``d2v_plugin.load_model(path)``: a fine-tuned model that returns predictions.

``path`` is a fine-tuning checkpoint or its ``d2v-export --format inference`` directory.
What comes back depends on the head:

- text classification / regression (GLUE, any labelled text set): :class:`TextClassifier`,
  ``clf(["a sentence", ("a", "pair")])`` -> :class:`TextClassification` (probabilities,
  predicted class names);
- SQuAD: :class:`SpanReader`, ``reader(questions, contexts)`` -> :class:`SpanAnswer` list;
- CTC speech recognition: :class:`d2v_plugin.asr.recognizer.SpeechRecognizer`,
  ``asr.transcribe(files or 16 kHz waveforms)`` -> transcripts;
- image classification: :class:`d2v_plugin.classify.ImageClassifier`,
  ``clf.predict(images, top_k=5)`` -> :class:`d2v_plugin.classify.ClassPrediction` list.

Nothing in the files is executed: checkpoints are read with ``weights_only=True``,
exports from safetensors and JSON.
"""

from typing import Optional, Union

import torch

from .finetuned import Finetuned, build_model, find_finetuned, input_dictionary, read_finetuned
from .text import SpanAnswer, SpanReader, TextClassification, TextClassifier
from .text_tokenizer import TokenizerSpec, parse_spec


def _text(predictor):
    def make(rec, device, dtype, tokenizer=None):
        if tokenizer is not None:
            rec.tokenizer = parse_spec(tokenizer)
        dictionary = input_dictionary(rec)
        return predictor(build_model(rec, dictionary), rec, dictionary, device, dtype)

    return make


def _speech(rec, device, dtype, **options):
    from ..asr.recognizer import SpeechRecognizer

    return SpeechRecognizer.from_record(rec, device=device, dtype=dtype, **options)


def _image(rec, device, dtype):
    from ..classify import ImageClassifier

    return ImageClassifier.from_record(rec, device=device, dtype=dtype)


# fine-tuning model name -> (record, device, dtype, **options) -> predictor
PREDICTORS = {
    "d2v_text_classification": _text(TextClassifier),
    "d2v_span_qa": _text(SpanReader),
    "d2v_ctc": _speech,
    "d2v_image_classification": _image,
}


def load_model(path: str, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, **options):
    """The predictor of the fine-tuned model at ``path`` (see the module docstring).

    ``device`` / ``dtype``: where and in which precision the model runs (outputs are fp32).
    Options: text models take ``tokenizer`` (``spm:MODEL``, ``gpt2:DIR`` or ``none``,
    replacing the one recorded at data preparation, e.g. when that file moved); speech models
    take ``lm`` (an ARPA language model for beam search), ``batch_size`` and the beam options
    of :func:`d2v_plugin.asr.decoding.make_decoder`.
    """
    rec = read_finetuned(path)
    make = PREDICTORS.get(rec.name)
    if make is None:
        raise ValueError(f"{path}: no predictor for {rec.name} models (supported: {', '.join(PREDICTORS)})")
    return make(rec, device, dtype, **options)


__all__ = [
    "load_model", "Finetuned", "read_finetuned", "find_finetuned", "build_model", "TextClassifier",
    "TextClassification", "SpanReader", "SpanAnswer", "TokenizerSpec",
]
