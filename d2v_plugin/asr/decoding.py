"""CTC decoding of letter posteriors: greedy (best path) and beam search with a KenLM n-gram LM.

Letters follow fairseq's wav2vec 2.0 convention (``dict.ltr.txt``): one symbol per letter,
``|`` marks word boundaries, the CTC blank is the dictionary's ``<s>`` (index 0).

Beam search uses ``flashlight-text`` (the decoder fairseq's own ``w2l_decoder`` wraps), an
optional extra: ``pip install "d2v_plugin[asr]"`` or ``pip install flashlight-text``. A
word-level ARPA model is decoded with a lexicon spelled from the LM's own unigrams, so
``--lm ARPA`` is all it needs.
"""

from typing import List, Optional, Sequence

import torch

BLANK_WORD = "<s>"
WORD_SEP = "|"
SPECIAL = ("<s>", "<pad>", "</s>", "<unk>")


def letters_to_text(symbols: Sequence[str]) -> str:
    """``["H", "I", "|", "Y", "O", "U", "|"]`` -> ``"HI YOU"``."""
    return " ".join("".join(s for s in symbols if s not in SPECIAL).replace(WORD_SEP, " ").split())


def ltr_to_text(line: str) -> str:
    """A ``.ltr`` line (``"H I | Y O U |"``) as words (``"HI YOU"``)."""
    return letters_to_text(line.split())


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, symbols: Sequence[str], blank: int = 0) -> List[str]:
    """Best path of (B, T, V) posteriors: argmax per frame, repeats merged, blanks dropped."""
    best = log_probs.argmax(-1).cpu()
    texts = []
    for row, n in zip(best, lengths.tolist()):
        ids = torch.unique_consecutive(row[: int(n)])
        texts.append(letters_to_text([symbols[i] for i in ids.tolist() if i != blank]))
    return texts


def flashlight_decoder_module():
    try:
        from flashlight.lib.text import decoder
        from flashlight.lib.text.decoder import kenlm  # noqa: F401  (built with KenLM)
    except ImportError:
        raise ImportError(
            "beam search with a language model needs flashlight-text, an optional extra: "
            "pip install flashlight-text (or pip install -e \".[asr]\" in the d2v_plugin checkout)"
        ) from None
    return decoder


def arpa_unigrams(path: str) -> List[str]:
    """The words of an ARPA file's ``\\1-grams:`` section (``<s>``, ``</s>``, ``<unk>`` left out)."""
    words, inside = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("\\"):
                inside = line == "\\1-grams:"
                continue
            if inside and line:
                parts = line.split()
                if len(parts) >= 2 and parts[1] not in ("<s>", "</s>", "<unk>"):
                    words.append(parts[1])
    if not words:
        raise ValueError(f"{path}: no \\1-grams: section with words; is it an ARPA language model?")
    return words


class BeamSearchDecoder:
    """flashlight-text's lexicon decoder with a word-level KenLM model (ARPA or binary).

    Words outside the LM's unigrams cannot be produced (a lexicon-constrained search, as in
    fairseq's ``kenlm`` decoder); ``lm_weight`` and ``word_score`` are fairseq's defaults for
    LibriSpeech 4-gram decoding of base models (``examples/speech_recognition``: tune them on dev).
    """

    def __init__(self, symbols: Sequence[str], lm_path: str, beam: int = 50, lm_weight: float = 2.0,
                 word_score: float = -1.0, unk_score: float = float("-inf"), sil_score: float = 0.0,
                 beam_threshold: float = 25.0, blank: int = 0):
        d = flashlight_decoder_module()
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary as WordDictionary

        self.symbols = list(symbols)
        if not _is_arpa(lm_path):
            raise ValueError(f"{lm_path}: not an ARPA file (only ARPA language models are supported: their unigrams spell the lexicon)")
        words = arpa_unigrams(lm_path)
        index = {s: i for i, s in enumerate(self.symbols)}
        lexicon = {}
        for w in words:
            spelling = list(w) + [WORD_SEP]
            if all(c in index for c in spelling):
                lexicon[w] = [spelling]
        if not lexicon:
            raise ValueError(f"{lm_path}: none of its words can be spelled with the model's letters {self.symbols[4:]}")
        self.word_dict = WordDictionary()
        for word in list(lexicon) + ["<unk>"]:
            self.word_dict.add_entry(word)
        self.word_dict.set_default_index(self.word_dict.get_index("<unk>"))
        self.lm = KenLM(lm_path, self.word_dict)
        trie = d.Trie(len(self.symbols), index[WORD_SEP])
        start = self.lm.start(False)
        unk = self.word_dict.get_index("<unk>")
        for word, spellings in lexicon.items():
            w = self.word_dict.get_index(word)
            _, score = self.lm.score(start, w)
            for s in spellings:
                trie.insert([index[c] for c in s], w, score)
        trie.smear(d.SmearingMode.MAX)
        opts = d.LexiconDecoderOptions(
            beam_size=beam, beam_size_token=len(self.symbols), beam_threshold=beam_threshold, lm_weight=lm_weight,
            word_score=word_score, unk_score=unk_score, sil_score=sil_score, log_add=False,
            criterion_type=d.CriterionType.CTC,
        )
        self.decoder = d.LexiconDecoder(opts, trie, self.lm, index[WORD_SEP], blank, unk, [], False)

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> List[str]:
        emissions = log_probs.float().cpu().contiguous()
        B, T, V = emissions.shape
        texts = []
        for b in range(B):
            n = int(lengths[b])
            e = emissions[b, :n].contiguous()
            results = self.decoder.decode(e.data_ptr(), n, V)
            words = [self.word_dict.get_entry(w) for w in results[0].words if w >= 0] if results else []
            texts.append(" ".join(words))
        return texts


def _is_arpa(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"\\data\\")


def make_decoder(symbols: Sequence[str], lm: Optional[str] = None, **beam_options):
    """A callable ``(log_probs (B, T, V), lengths (B)) -> texts``: greedy, or beam search with ``lm``."""
    if lm is None:
        return lambda log_probs, lengths: greedy_decode(log_probs, lengths, symbols)
    return BeamSearchDecoder(symbols, lm, **beam_options).decode
