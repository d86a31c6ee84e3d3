"""Predictions of fine-tuned text models: class probabilities (or regression values) and
SQuAD-style answer spans, from raw text, in batches."""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .text_tokenizer import TextTokenizer

Text = Union[str, Tuple[str, str]]  # one sentence, or a pair


@dataclass
class TextClassification:
    """Outputs for a batch of B examples and a head with C outputs."""

    logits: torch.Tensor  # (B, C) fp32: class logits, or regression values
    probabilities: Optional[torch.Tensor]  # (B, C) softmax of the logits; None for a regression head
    labels: Optional[List[str]]  # predicted class name per example; None for a regression head
    classes: Optional[List[str]]  # names of the C outputs (class order of the head)


@dataclass
class SpanAnswer:
    text: str  # the answer, a substring of the context ("" = no answer, SQuAD 2.0)
    score: float  # start + end logit of the answer span
    null_odds: float  # no-answer score minus the best span's score (SQuAD 2.0 threshold)
    nbest: List[Tuple[str, float]]  # candidate answers with their scores, best first


class _Predictor:
    def __init__(self, model, record, dictionary, device, dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.record = record
        self.dictionary = dictionary
        self.device = torch.device(device)
        self.tokenizer = TextTokenizer(record.tokenizer, dictionary) if record.tokenizer is not None else None
        if self.tokenizer is None:
            raise ValueError(
                f"{record.path}: no tokenizer is recorded for this model; pass tokenizer='spm:MODEL', 'gpt2:DIR' or 'none'"
            )

    def _padded(self, rows: Sequence[List[int]]):
        pad = self.dictionary.pad()
        width = max(len(r) for r in rows)
        source = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            source[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        return source.to(self.device), source.eq(pad).to(self.device)


class TextClassifier(_Predictor):
    """``classifier(texts)`` -> :class:`TextClassification`; a text is a string or a pair of strings.

    Examples are built as in fine-tuning: ``<s> A </s>`` or ``<s> A </s> </s> B </s>``,
    cut to the task's ``max_positions``.
    """

    def encode(self, text: Text) -> List[int]:
        task = self.record.task_cfg
        eos = self.dictionary.eos()
        first, second = (text, None) if isinstance(text, str) else text
        ids = self.tokenizer.encode(first) + [eos]
        if task.get("init_token") is not None:
            ids = [task["init_token"]] + ids
        if second is not None:
            extra = self.tokenizer.encode(second) + [eos]
            if task.get("separator_token") is not None:
                extra = [task["separator_token"]] + extra
            ids += extra
        return ids[: task.get("max_positions") or len(ids)]

    @torch.no_grad()
    def predict_ids(self, rows: Sequence[List[int]]) -> torch.Tensor:
        source, padding_mask = self._padded(rows)
        return self.model(source, padding_mask=padding_mask).float().cpu()

    def __call__(self, texts: Union[Text, Sequence[Text]], batch_size: int = 32) -> TextClassification:
        if isinstance(texts, (str, tuple)):
            texts = [texts]
        rows = [self.encode(t) for t in texts]
        logits = torch.cat([self.predict_ids(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)])
        if self.record.task_cfg.get("regression_target"):
            return TextClassification(logits, None, None, None)
        classes = self.record.classes or [str(i) for i in range(logits.size(1))]
        probabilities = logits.softmax(-1)
        return TextClassification(logits, probabilities, [classes[i] for i in probabilities.argmax(-1).tolist()], classes)


class SpanReader(_Predictor):
    """``reader(questions, contexts)`` -> one :class:`SpanAnswer` per question, decoded exactly as
    SQuAD validation decodes (windows over long contexts, n-best search, SQuAD 2.0 threshold)."""

    def __call__(self, questions: Union[str, Sequence[str]], contexts: Union[str, Sequence[str]], batch_size: int = 32) -> List[SpanAnswer]:
        from ..data.squad_features import SquadData, SquadExample, build_features, decode_example

        if isinstance(questions, str):
            questions, contexts = [questions], [contexts]
        if len(questions) != len(contexts):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
        task = self.record.task_cfg
        data = SquadData("<input>", {}, list(contexts), [SquadExample(str(i), q, i) for i, q in enumerate(questions)])
        feats, _ = build_features(data, self.tokenizer.impl, task["max_seq_length"], task["doc_stride"],
                                  task["max_query_length"], bos=self.dictionary.bos(), eos=self.dictionary.eos())
        starts, ends = [], []
        with torch.no_grad():
            for i in range(0, len(feats.tokens), batch_size):
                rows = [list(t) for t in feats.tokens[i:i + batch_size]]
                source, padding_mask = self._padded(rows)
                out = self.model(source, padding_mask=padding_mask)
                for j, r in enumerate(rows):
                    starts.append(out["start_logits"][j, : len(r)].float().cpu().numpy())
                    ends.append(out["end_logits"][j, : len(r)].float().cpu().numpy())
        answers = []
        for ex_index, windows in enumerate(feats.example_windows):
            p = decode_example(
                data, feats, ex_index, [starts[w] for w in windows], [ends[w] for w in windows],
                n_best_size=task["n_best_size"], max_answer_length=task["max_answer_length"],
                version_2=bool(task.get("version_2_with_negative")),
                null_score_diff_threshold=task.get("null_score_diff_threshold", 0.0),
            )
            answers.append(SpanAnswer(p.text, p.nbest[0][1] if p.nbest else float("-inf"), p.null_odds, p.nbest))
        return answers
