"""A Hugging Face tokenizer for an exported text model trained with a sentencepiece vocabulary.

fairseq feeds the model dictionary ids: the sentencepiece pieces of a line looked up in
``dict.txt`` (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, then the dictionary's symbols,
``<mask>`` appended last). transformers' ``XLMRobertaTokenizer`` is a Unigram tokenizer with
sentencepiece's normaliser and RoBERTa's ``<s> A </s>`` / ``<s> A </s></s> B </s>``
templates: given the pieces with their sentencepiece scores *in dictionary order*, it
produces these ids, except where two segmentations score exactly alike: the two libraries
break such ties differently (``>>>`` as ``>> >`` or ``> >>``: the same pieces in another
order; 4 of 235 held-out lines in ``tests/test_export_hf.py``). Only unigram sentencepiece models (what ``d2v_plugin.prep.text``
trains) can be written this way; fairseq's GPT-2 BPE is RoBERTa's own tokenizer
(``AutoTokenizer.from_pretrained("FacebookAI/roberta-base")`` for Meta's checkpoints).
"""

import inspect
import os
from typing import Optional

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def find_sentencepiece_model(data_dir: Optional[str]) -> Optional[str]:
    """``spm.model`` in a pretraining data directory (``OUT/bin``) or beside it (``OUT``)."""
    if not data_dir:
        return None
    for folder in (data_dir, os.path.dirname(os.path.abspath(data_dir))):
        candidate = os.path.join(folder, "spm.model")
        if os.path.isfile(candidate):
            return candidate
    return None


def write_hf_tokenizer(out_dir: str, spm_model: str, dictionary) -> str:
    """Write ``tokenizer.json`` / ``tokenizer_config.json`` into ``out_dir``; returns a note.

    ``dictionary``: the model's fairseq dictionary (``<mask>`` included). Raises ValueError
    when the tokenizer cannot reproduce fairseq's ids (not a unigram model; dictionary
    symbols that are not pieces of the model; a dictionary without ``<mask>`` last)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import XLMRobertaTokenizer

    if "vocab" not in inspect.signature(XLMRobertaTokenizer.__init__).parameters:
        raise ValueError("this transformers version builds XLMRobertaTokenizer from a file only; transformers >= 5 is needed")
    proto = sentencepiece_model_pb2.ModelProto()
    with open(spm_model, "rb") as f:
        proto.ParseFromString(f.read())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise ValueError(f"{spm_model} is not a unigram sentencepiece model")
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    symbols = list(dictionary.symbols)
    if tuple(symbols[:4]) != SPECIALS or symbols[-1] != "<mask>":
        raise ValueError("the dictionary does not start with fairseq's <s> <pad> </s> <unk> and end with <mask>")
    vocab = [(s, 0.0) for s in SPECIALS]
    for symbol in symbols[4:-1]:
        pid = sp.piece_to_id(symbol)
        if sp.is_unknown(pid) or sp.id_to_piece(pid) != symbol:
            raise ValueError(f"dictionary symbol {symbol!r} is not a piece of {spm_model}")
        vocab.append((symbol, float(sp.get_score(pid))))
    vocab.append(("<mask>", 0.0))
    charsmap = proto.normalizer_spec.precompiled_charsmap or None
    tokenizer = XLMRobertaTokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap,
                                    add_prefix_space=proto.normalizer_spec.add_dummy_prefix)
    tokenizer.save_pretrained(out_dir)
    return f"tokenizer: {spm_model} as XLMRobertaTokenizer in fairseq dictionary order (AutoTokenizer.from_pretrained works)"
