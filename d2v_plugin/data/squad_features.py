"""SQuAD data for span extraction: reading, tokenization with character offsets, windows, decoding.

The pieces, in the order the task uses them:

* :func:`read_squad` reads a SQuAD v1.1 / v2.0 json file into :class:`SquadExample` s.
* :func:`build_tokenizer` loads the pretrained model's tokenizer — a sentencepiece model
  or fairseq's GPT-2 BPE (``encoder.json`` + ``vocab.bpe``) — together with its fairseq
  dictionary; ``tokenizer.encode(text)`` returns dictionary indices and, for each token, the
  ``[start, end)`` characters of ``text`` it covers (surrounding whitespace excluded).
* :func:`build_features` cuts each question + context into windows of at most
  ``max_seq_length`` tokens, RoBERTa-style ``<s> question </s></s> context </s>``;
  consecutive windows start ``doc_stride`` context tokens apart. Each window carries the
  start/end token of the answer, or the first token (``<s>``) when the question is
  unanswerable or its answer is not entirely inside the window.
* :func:`decode_example` turns the start/end logits of an example's windows into the
  predicted answer text (n-best search over valid spans) and its no-answer score.
"""

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)

Span = Tuple[int, int]

# score difference reported when no span of the context is a valid answer
NO_SPAN_ODDS = 1e4


class SquadDataError(ValueError):
    """A SQuAD file or tokenizer that cannot be used, with the reason."""


# ----------------------------------------------------------------------------
# reading


@dataclass
class SquadExample:
    qid: str
    question: str
    context_id: int  # index into SquadData.contexts
    answers: List[Tuple[str, int]] = field(default_factory=list)  # (text, first character)
    is_impossible: bool = False


@dataclass
class SquadData:
    """One SQuAD file: the raw json (for the official evaluation) and its questions."""

    path: str
    raw: dict
    contexts: List[str]
    examples: List[SquadExample]

    @property
    def version(self) -> str:
        return str(self.raw.get("version", ""))


def read_squad(path: str, allow_impossible: bool) -> SquadData:
    """Read a SQuAD json file; ``allow_impossible`` = SQuAD 2.0 (questions without answer)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SQuAD file {path} does not exist (datasets/squad/prepare.sh downloads them)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SquadDataError(f"{path} is not valid JSON ({e}); download it again") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise SquadDataError(f"{path} is not a SQuAD file: expected an object with a 'data' list")
    contexts, examples, seen = [], [], set()
    for article in raw["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            if not isinstance(context, str):
                raise SquadDataError(f"{path}: a paragraph of {article.get('title', '?')!r} has no 'context' text")
            context_id = len(contexts)
            contexts.append(context)
            for qa in paragraph.get("qas", []):
                try:
                    qid, question, answers = qa["id"], qa["question"], qa["answers"]
                except KeyError as e:
                    raise SquadDataError(f"{path}: a question lacks the field {e}: {str(qa)[:200]}") from None
                if qid in seen:
                    raise SquadDataError(f"{path}: question id {qid!r} occurs twice")
                seen.add(qid)
                impossible = bool(qa.get("is_impossible", False)) or not answers
                if impossible and not allow_impossible:
                    raise SquadDataError(
                        f"{path}: question {qid} has no answer; that is SQuAD 2.0 data "
                        "(set task.version_2_with_negative=true, e.g. config finetuning/squad/v2)"
                    )
                parsed = [] if impossible else [(a["text"], int(a["answer_start"])) for a in answers]
                examples.append(SquadExample(qid, question, context_id, parsed, impossible))
    if not examples:
        raise SquadDataError(f"{path} holds no questions")
    return SquadData(path, raw, contexts, examples)


# ----------------------------------------------------------------------------
# tokenizers


def _trim(text: str, start: int, end: int) -> Span:
    """``[start, end)`` without whitespace at either edge (empty spans sit at ``end``)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


class SentencePieceTokenizer:
    """A sentencepiece model whose pieces are the symbols of the fairseq dictionary.

    Text is encoded word by word (whitespace-separated), which gives sentencepiece's own
    segmentation of the whole text (pieces never cross whitespace) and exact character
    offsets; a word that sentencepiece normalises into other characters gives all its
    pieces the whole word's span.
    """

    name = "sentencepiece"

    def __init__(self, model_path: str, dictionary):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"sentencepiece model {model_path} does not exist (set task.sentencepiece_model)")
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.dictionary = dictionary
        self.model_path = model_path
        n = self.sp.get_piece_size()
        pieces = [self.sp.id_to_piece(i) for i in range(n) if not (self.sp.is_control(i) or self.sp.is_unknown(i))]
        symbols = set(dictionary.symbols[dictionary.nspecial:]) - {"<mask>"}
        known = sum(p in symbols for p in pieces)
        covered = len(symbols & set(pieces))
        # a dictionary made from the model holds every piece, one counted from data most of
        # them; either way nearly all its symbols are pieces of the model
        if not pieces or covered < 0.9 * max(1, len(symbols)) or known < 0.5 * len(pieces):
            raise SquadDataError(
                f"tokenizer/dictionary mismatch: {known} of the {len(pieces)} pieces of {model_path} are in the "
                f"dictionary and {covered} of its {len(symbols)} symbols are pieces; use the sentencepiece model "
                "and dict.txt the checkpoint was pretrained with"
            )
        self._cache: Dict[str, Tuple[List[int], List[Span]]] = {}

    def _word(self, word: str, pieces: List[str]) -> Tuple[List[int], List[Span]]:
        ids = [self.dictionary.index(p) for p in pieces]
        surfaces = [p.replace("\u2581", "") for p in pieces]
        if "".join(surfaces) != word:
            return ids, [(0, len(word))] * len(pieces)
        spans, pos = [], 0
        for s in surfaces:
            spans.append((pos, pos + len(s)))
            pos += len(s)
        return ids, spans

    def encode(self, text: str) -> Tuple[List[int], List[Span]]:
        matches = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
        todo = sorted({w for _, w in matches if w not in self._cache})
        if todo:
            for word, pieces in zip(todo, self.sp.encode(todo, out_type=str)):
                if len(self._cache) > 500_000:
                    self._cache.clear()
                self._cache[word] = self._word(word, pieces)
        ids, spans = [], []
        for start, word in matches:
            word_ids, word_spans = self._cache[word]
            ids.extend(word_ids)
            spans.extend((start + a, start + b) for a, b in word_spans)
        return ids, spans


class GPT2Tokenizer:
    """fairseq's GPT-2 byte-level BPE; the dictionary's symbols are BPE ids (fairseq's dict.txt).

    Encodes exactly as ``fairseq.data.encoders.gpt2_bpe`` does, keeping for each token the
    characters whose bytes it holds.
    """

    name = "gpt2"

    def __init__(self, encoder_json: str, vocab_bpe: str, dictionary):
        from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

        for p in (encoder_json, vocab_bpe):
            if not os.path.isfile(p):
                raise FileNotFoundError(
                    f"GPT-2 BPE file {p} does not exist (set task.gpt2_encoder_json and task.gpt2_vocab_bpe; "
                    "fairseq's files: https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/)"
                )
        self.bpe = get_encoder(encoder_json, vocab_bpe)
        self.dictionary = dictionary
        symbols = [s for s in dictionary.symbols[dictionary.nspecial:] if s != "<mask>" and not s.startswith("madeupword")]
        numeric = sum(s.isdigit() and int(s) < len(self.bpe.encoder) for s in symbols)
        if not symbols or numeric < 0.9 * len(symbols):
            raise SquadDataError(
                f"tokenizer/dictionary mismatch: only {numeric} of the {len(symbols)} dictionary symbols are GPT-2 "
                f"BPE ids of {encoder_json}; use fairseq's GPT-2 dict.txt (the one the checkpoint was pretrained with)"
            )
        self._index = {}

    def _dict_index(self, bpe_id: int) -> int:
        idx = self._index.get(bpe_id)
        if idx is None:
            idx = self._index[bpe_id] = self.dictionary.index(str(bpe_id))
        return idx

    def encode(self, text: str) -> Tuple[List[int], List[Span]]:
        ids, spans = [], []
        byte_encoder = self.bpe.byte_encoder
        for m in self.bpe.pat.finditer(text):
            piece = m.group()
            owner = []  # character (within piece) of each byte
            for ci, ch in enumerate(piece):
                owner.extend([ci] * len(ch.encode("utf-8")))
            token = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
            pos = 0
            for sub in self.bpe.bpe(token).split(" "):
                first, last = owner[pos], owner[pos + len(sub) - 1]
                pos += len(sub)
                ids.append(self._dict_index(self.bpe.encoder[sub]))
                spans.append(_trim(text, m.start() + first, m.start() + last + 1))
        return ids, spans


def build_tokenizer(kind: str, dictionary, sentencepiece_model: Optional[str] = None, gpt2_encoder_json: Optional[str] = None, gpt2_vocab_bpe: Optional[str] = None):
    if kind == "sentencepiece":
        if not sentencepiece_model:
            raise SquadDataError("task.bpe=sentencepiece needs task.sentencepiece_model (the .model file of pretraining)")
        return SentencePieceTokenizer(sentencepiece_model, dictionary)
    if kind == "gpt2":
        if not (gpt2_encoder_json and gpt2_vocab_bpe):
            raise SquadDataError("task.bpe=gpt2 needs task.gpt2_encoder_json and task.gpt2_vocab_bpe")
        return GPT2Tokenizer(gpt2_encoder_json, gpt2_vocab_bpe, dictionary)
    raise SquadDataError(f"unknown tokenizer {kind!r} (sentencepiece or gpt2)")


# ----------------------------------------------------------------------------
# windows


@dataclass
class Features:
    """Windows of every example of one split, as flat arrays (window = feature)."""

    tokens: List[np.ndarray]  # per window: token ids
    example: np.ndarray  # per window: example index
    context_offset: np.ndarray  # per window: position of its first context token
    window_start: np.ndarray  # per window: index (in the context's tokens) of its first context token
    window_length: np.ndarray  # per window: number of context tokens
    start_positions: np.ndarray  # per window: answer start token (0 = none)
    end_positions: np.ndarray
    example_windows: List[List[int]]  # per example: its windows
    context_spans: List[np.ndarray]  # per context: (n_tokens, 2) character spans
    best_window: List[np.ndarray]  # per example: for each context token, the window where it has most context

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)


def window_starts(n_tokens: int, max_tokens: int, stride: int) -> List[Tuple[int, int]]:
    """(start, length) of the windows over ``n_tokens`` context tokens."""
    out, start = [], 0
    while True:
        length = min(n_tokens - start, max_tokens)
        out.append((start, length))
        if start + length >= n_tokens:
            return out
        start += min(length, stride)


def _best_windows(n_tokens: int, windows: Sequence[Tuple[int, int]]) -> np.ndarray:
    """For each token, the window in which it has the most context on its shorter side."""
    best = np.zeros(n_tokens, dtype=np.int32)
    best_score = np.full(n_tokens, -np.inf)
    for w, (start, length) in enumerate(windows):
        pos = np.arange(start, start + length)
        score = np.minimum(pos - start, start + length - 1 - pos) + 0.01 * length
        better = score > best_score[pos]
        best[pos[better]] = w
        best_score[pos[better]] = score[better]
    return best


def answer_tokens(context: str, spans: np.ndarray, text: str, start_char: int) -> Optional[Tuple[int, int]]:
    """First and last context token of an answer, or None when it cannot be located."""
    end_char = start_char + len(text)
    if context[start_char:end_char] != text:
        # a few SQuAD answers are off by some characters: take the nearest occurrence
        hits = [m.start() for m in re.finditer(re.escape(text), context)] if text else []
        if not hits:
            return None
        start_char = min(hits, key=lambda h: abs(h - start_char))
        end_char = start_char + len(text)
    nonempty = spans[:, 1] > spans[:, 0]
    covering = np.nonzero(nonempty & (spans[:, 1] > start_char))[0]
    ending = np.nonzero(nonempty & (spans[:, 0] < end_char))[0]
    if len(covering) == 0 or len(ending) == 0 or covering[0] > ending[-1]:
        return None
    return int(covering[0]), int(ending[-1])


def build_features(
    data: SquadData,
    tokenizer,
    max_seq_length: int,
    doc_stride: int,
    max_query_length: int,
    bos: int,
    eos: int,
    skip_unlocated: bool = False,
) -> Tuple[Features, int]:
    """Windows for every example; returns them and the number of answers that could not be located.

    With ``skip_unlocated`` (training) an example whose answer is not found in its context
    gets no windows, rather than windows labelled "no answer".
    """
    specials = 4  # <s> q </s> </s> c </s>
    context_ids, context_spans = [], []
    for context in data.contexts:
        ids, spans = tokenizer.encode(context)
        context_ids.append(np.asarray(ids, dtype=np.int32))
        context_spans.append(np.asarray(spans, dtype=np.int64).reshape(-1, 2))
    feats = Features([], [], [], [], [], [], [], [], context_spans, [])
    unlocated = 0
    for ex_index, ex in enumerate(data.examples):
        q_ids, _ = tokenizer.encode(ex.question)
        q_ids = q_ids[:max_query_length]
        room = max_seq_length - len(q_ids) - specials
        if room < 1:
            raise SquadDataError(
                f"max_seq_length={max_seq_length} leaves no room for the context after a question of "
                f"{len(q_ids)} tokens (max_query_length={max_query_length})"
            )
        ctx = context_ids[ex.context_id]
        spans = context_spans[ex.context_id]
        answer = None
        if ex.answers:
            answer = answer_tokens(data.contexts[ex.context_id], spans, *ex.answers[0])
            if answer is None:
                unlocated += 1
                if skip_unlocated:
                    feats.example_windows.append([])
                    feats.best_window.append(np.zeros(0, dtype=np.int32))
                    continue
        windows = window_starts(len(ctx), room, doc_stride)
        feats.best_window.append(_best_windows(len(ctx), windows))
        head = np.asarray([bos, *q_ids, eos, eos], dtype=np.int32)
        own = []
        for start, length in windows:
            own.append(len(feats.tokens))
            feats.tokens.append(np.concatenate([head, ctx[start:start + length], np.asarray([eos], dtype=np.int32)]))
            feats.example.append(ex_index)
            feats.context_offset.append(len(head))
            feats.window_start.append(start)
            feats.window_length.append(length)
            s = e = 0
            if answer is not None and start <= answer[0] and answer[1] < start + length:
                s, e = len(head) + answer[0] - start, len(head) + answer[1] - start
            feats.start_positions.append(s)
            feats.end_positions.append(e)
        feats.example_windows.append(own)
    for name in ("example", "context_offset", "window_start", "window_length", "start_positions", "end_positions"):
        setattr(feats, name, np.asarray(getattr(feats, name), dtype=np.int64))
    return feats, unlocated


# ----------------------------------------------------------------------------
# decoding


@dataclass
class Prediction:
    text: str
    null_odds: float  # null score minus best span score (> threshold: "no answer")
    nbest: List[Tuple[str, float]]


def decode_example(
    data: SquadData,
    feats: Features,
    ex_index: int,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> Prediction:
    """The answer of example ``ex_index`` from the logits of its windows (in ``example_windows`` order).

    A candidate span starts and ends on context tokens of one window, ends no earlier than
    it starts, has at most ``max_answer_length`` tokens and starts on a token for which this
    window is the one with most context; its score is start logit + end logit. The null
    score is the smallest ``<s>`` start + end score over the windows. SQuAD 2.0 predicts ""
    when null score - best span score > ``null_score_diff_threshold``.
    """
    ex = data.examples[ex_index]
    context = data.contexts[ex.context_id]
    spans = feats.context_spans[ex.context_id]
    best_window = feats.best_window[ex_index]
    candidates = []
    null_score = np.inf
    for w, (f, s_log, e_log) in enumerate(zip(feats.example_windows[ex_index], start_logits, end_logits)):
        null_score = min(null_score, float(s_log[0] + e_log[0]))
        off, wstart, wlen = int(feats.context_offset[f]), int(feats.window_start[f]), int(feats.window_length[f])
        k = min(n_best_size, len(s_log))
        top_s = np.argsort(-s_log, kind="stable")[:k]
        top_e = np.argsort(-e_log, kind="stable")[:k]
        for i in top_s:
            ci = i - off
            if ci < 0 or ci >= wlen or best_window[wstart + ci] != w:
                continue
            for j in top_e:
                cj = j - off
                if cj < ci or cj >= wlen or cj - ci + 1 > max_answer_length:
                    continue
                candidates.append((float(s_log[i] + e_log[j]), wstart + ci, wstart + cj))
    candidates.sort(key=lambda c: -c[0])
    nbest, seen = [], set()
    for score, a, b in candidates:
        text = context[spans[a, 0]:spans[b, 1]]
        if not text or text in seen:
            continue
        seen.add(text)
        nbest.append((text, score))
        if len(nbest) >= n_best_size:
            break
    if not nbest:
        return Prediction("", NO_SPAN_ODDS, [])
    best_text, best_score = nbest[0]
    odds = null_score - best_score
    if version_2 and odds > null_score_diff_threshold:
        return Prediction("", odds, nbest)
    return Prediction(best_text, odds, nbest)


__all__ = [
    "SquadDataError",
    "SquadExample",
    "SquadData",
    "read_squad",
    "SentencePieceTokenizer",
    "GPT2Tokenizer",
    "build_tokenizer",
    "Features",
    "window_starts",
    "answer_tokens",
    "build_features",
    "Prediction",
    "decode_example",
    "NO_SPAN_ODDS",
]
