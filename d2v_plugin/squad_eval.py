"""SQuAD v1.1 / v2.0 evaluation with the semantics of the official evaluation scripts.

Written for this project (not a copy); it reproduces what the official scripts of the
SQuAD explorer (``evaluate-v1.1.py`` and ``evaluate-v2.0.py``) compute:

* an answer is normalised by lower-casing it, deleting every ASCII punctuation character,
  replacing the articles *a*, *an*, *the* (whole words) by a space and collapsing
  whitespace;
* exact match (EM) compares normalised strings; F1 is the bag-of-tokens F1 of the
  normalised strings; each question scores the best value over its gold answers;
* **v1.1**: every question of the data set counts; one without a prediction scores 0.
  Printed keys: ``exact_match``, ``f1`` (in percent).
* **v2.0**: gold answers that normalise to the empty string are ignored and a question
  without any (unanswerable) has the single gold answer ``""``; F1 between two empty
  answers is 1. Only questions with a prediction are scored (the official script prints
  "Missing prediction for ..." for the others). With no-answer probabilities
  (``--na-prob-file``, default 0 for all), a prediction whose probability exceeds
  ``--na-prob-thresh`` (default 1.0) is taken as "no answer". Printed keys: ``exact``,
  ``f1``, ``total``, ``HasAns_exact``/``_f1``/``_total``, ``NoAns_exact``/``_f1``/``_total``
  and, with a probability file, ``best_exact``, ``best_exact_thresh``, ``best_f1``,
  ``best_f1_thresh``: the best scores reachable by one threshold on the probabilities and
  that threshold.

Which rules apply: ``--version auto`` (the default) uses v1.1 for a data file whose
``version`` field is ``"1.1"`` (unless a no-answer probability file is given) and v2.0
otherwise.

Usage::

    d2v-squad-eval dev-v2.0.json predictions.json [--na-prob-file null_odds.json]
    python -m d2v_plugin.squad_eval dev-v1.1.json predictions.json
"""

import argparse
import collections
import json
import re
import string
import sys
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1_v1",
    "f1_v2",
    "evaluate_v1",
    "evaluate_v2",
    "evaluate",
    "main",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


class SquadEvalError(ValueError):
    """Input that cannot be evaluated (malformed files, nothing to score)."""


# ----------------------------------------------------------------------------
# answers


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, replace articles by a space, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> List[str]:
    return normalize_answer(text).split() if text else []


def exact_match(gold: str, prediction: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def _f1(gold_tokens: List[str], pred_tokens: List[str]) -> float:
    overlap = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_v1(gold: str, prediction: str) -> float:
    """v1.1 token F1: 0 whenever nothing overlaps (two empty answers included)."""
    return _f1(normalize_answer(gold).split(), normalize_answer(prediction).split())


def f1_v2(gold: str, prediction: str) -> float:
    """v2.0 token F1: if either side is empty, 1 when both are and 0 otherwise."""
    gold_tokens, pred_tokens = _tokens(gold), _tokens(prediction)
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    return _f1(gold_tokens, pred_tokens)


# ----------------------------------------------------------------------------
# data files


def _questions(articles) -> Iterator[Mapping]:
    """Every question (``qa`` dict) of a SQuAD ``data`` list, in file order."""
    if not isinstance(articles, list):
        raise SquadEvalError("SQuAD data: 'data' must be a list of articles")
    for article in articles:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                if "id" not in qa or "answers" not in qa:
                    raise SquadEvalError(f"SQuAD data: a question lacks 'id' or 'answers': {str(qa)[:200]}")
                yield qa


def _articles(dataset) -> list:
    """Accept the whole data file (dict with 'data') or its 'data' list."""
    if isinstance(dataset, dict):
        if "data" not in dataset:
            raise SquadEvalError("SQuAD data file has no 'data' field")
        return dataset["data"]
    return dataset


def _percent(total: float, count: int) -> float:
    return 100.0 * total / count


# ----------------------------------------------------------------------------
# v1.1


def evaluate_v1(dataset, predictions: Mapping[str, str], warn=None) -> Dict[str, float]:
    """Official v1.1 results: ``{"exact_match": ..., "f1": ...}`` in percent.

    ``dataset`` is the data file's content (or its ``data`` list). Questions without a
    prediction score 0 and are reported through ``warn`` (default: stderr).
    """
    warn = warn or _stderr
    em = f1 = 0.0
    count = 0
    for qa in _questions(_articles(dataset)):
        count += 1
        qid = qa["id"]
        if qid not in predictions:
            warn(f"Unanswered question {qid} will receive score 0.")
            continue
        prediction = predictions[qid]
        golds = [a["text"] for a in qa["answers"]]
        em += max((exact_match(g, prediction) for g in golds), default=0)
        f1 += max((f1_v1(g, prediction) for g in golds), default=0.0)
    if count == 0:
        raise SquadEvalError("the SQuAD data holds no questions")
    return {"exact_match": _percent(em, count), "f1": _percent(f1, count)}


# ----------------------------------------------------------------------------
# v2.0


def _raw_scores_v2(articles, predictions, warn) -> Tuple[Dict[str, int], Dict[str, float], Dict[str, bool]]:
    exact, f1, has_answer = {}, {}, {}
    for qa in _questions(articles):
        qid = qa["id"]
        has_answer[qid] = bool(qa["answers"])
        golds = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])] or [""]
        if qid not in predictions:
            warn(f"Missing prediction for {qid}")
            continue
        prediction = predictions[qid]
        exact[qid] = max(exact_match(g, prediction) for g in golds)
        f1[qid] = max(f1_v2(g, prediction) for g in golds)
    return exact, f1, has_answer


def _thresholded(scores, na_probs, has_answer, threshold):
    """Scores after predicting "no answer" wherever the probability exceeds ``threshold``."""
    out = {}
    for qid, score in scores.items():
        if na_probs[qid] > threshold:
            out[qid] = float(not has_answer[qid])
        else:
            out[qid] = score
    return out


def _summary(exact, f1, qids) -> "collections.OrderedDict[str, float]":
    n = len(qids)
    return collections.OrderedDict(
        [
            ("exact", _percent(sum(exact[q] for q in qids), n)),
            ("f1", _percent(sum(f1[q] for q in qids), n)),
            ("total", n),
        ]
    )


def _best_threshold(predictions, scores, na_probs, has_answer) -> Tuple[float, float]:
    """Sweep the threshold over the sorted probabilities; return (best score %, threshold).

    Starting from "every question is unanswerable" (score = number of unanswerable
    questions of the whole data set), each question in increasing order of probability
    switches to its prediction: an answerable one gains its score, an unanswerable one
    loses 1 if the prediction is non-empty. Ties in probability keep the order of
    ``na_probs``; questions without a score are skipped; the denominator is the number of
    scored questions.
    """
    running = best = sum(1 for answerable in has_answer.values() if not answerable)
    best_threshold = 0.0
    for qid in sorted(na_probs, key=lambda q: na_probs[q]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            running += scores[qid]
        elif predictions[qid]:
            running -= 1
        if running > best:
            best = running
            best_threshold = na_probs[qid]
    return _percent(best, len(scores)), best_threshold


def evaluate_v2(
    dataset,
    predictions: Mapping[str, str],
    na_probs: Optional[Mapping[str, float]] = None,
    na_prob_thresh: float = 1.0,
    warn=None,
) -> "collections.OrderedDict[str, float]":
    """Official v2.0 results (see the module doc for the keys).

    ``na_probs`` maps question ids to the probability (or any score) that the question
    has no answer; without it every probability is 0 and no ``best_*`` keys are added.
    """
    warn = warn or _stderr
    articles = _articles(dataset)
    exact_raw, f1_raw, has_answer = _raw_scores_v2(articles, predictions, warn)
    if not exact_raw:
        raise SquadEvalError("no question of the data set has a prediction")
    missing = [q for q in has_answer if q not in exact_raw]
    if missing:
        # the official script stops with a KeyError in its HasAns/NoAns breakdown here
        raise SquadEvalError(
            f"{len(missing)} of {len(has_answer)} questions have no prediction (e.g. {missing[0]}); "
            "SQuAD v2.0 evaluation needs a prediction (possibly \"\") for every question"
        )
    probs = dict(na_probs) if na_probs is not None else {q: 0.0 for q in predictions}
    absent = [q for q in exact_raw if q not in probs]
    if absent:
        raise SquadEvalError(f"the no-answer probabilities lack {len(absent)} questions (e.g. {absent[0]})")
    exact = _thresholded(exact_raw, probs, has_answer, na_prob_thresh)
    f1 = _thresholded(f1_raw, probs, has_answer, na_prob_thresh)
    result = _summary(exact, f1, list(exact))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, answerable in has_answer.items() if answerable == wanted]
        if qids:
            for key, value in _summary(exact, f1, qids).items():
                result[f"{prefix}_{key}"] = value
    if na_probs is not None:
        best_exact, exact_threshold = _best_threshold(predictions, exact_raw, probs, has_answer)
        best_f1, f1_threshold = _best_threshold(predictions, f1_raw, probs, has_answer)
        result["best_exact"] = best_exact
        result["best_exact_thresh"] = exact_threshold
        result["best_f1"] = best_f1
        result["best_f1_thresh"] = f1_threshold
    return result


# ----------------------------------------------------------------------------
# either version


def resolve_version(dataset, version: str = "auto", with_na_probs: bool = False) -> str:
    """``"1.1"`` or ``"2.0"``: ``auto`` picks 1.1 only for a data file marked version 1.1."""
    if version in ("1.1", "2.0"):
        return version
    if version != "auto":
        raise SquadEvalError(f"unknown SQuAD version {version!r} (auto, 1.1 or 2.0)")
    marked = str(dataset.get("version", "")) if isinstance(dataset, dict) else ""
    return "1.1" if marked.lstrip("v") == "1.1" and not with_na_probs else "2.0"


def evaluate(dataset, predictions, na_probs=None, na_prob_thresh: float = 1.0, version: str = "auto", warn=None):
    """Evaluate with the rules of ``version`` (see :func:`resolve_version`)."""
    version = resolve_version(dataset, version, na_probs is not None)
    if version == "1.1":
        if na_probs is not None:
            raise SquadEvalError("no-answer probabilities apply to SQuAD v2.0 evaluation only")
        return evaluate_v1(dataset, predictions, warn=warn)
    return evaluate_v2(dataset, predictions, na_probs, na_prob_thresh, warn=warn)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------
# command line


def _load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SquadEvalError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SquadEvalError(f"{what} {path} is not valid JSON: {e}") from None


def _check_mapping(obj, path: str, what: str, value_types) -> None:
    if not isinstance(obj, dict) or not all(isinstance(v, value_types) for v in obj.values()):
        raise SquadEvalError(f"{path}: {what} must be a JSON object mapping question ids to {value_types[0].__name__}s")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="d2v-squad-eval",
        description="Evaluate SQuAD predictions exactly as the official v1.1 / v2.0 scripts do; "
        "prints the result as JSON.",
    )
    p.add_argument("data_file", metavar="DATA.json", help="SQuAD data file (e.g. dev-v1.1.json or dev-v2.0.json)")
    p.add_argument("pred_file", metavar="PREDICTIONS.json", help="JSON object: question id -> predicted answer text")
    p.add_argument("--na-prob-file", "-n", metavar="NA.json", help="JSON object: question id -> no-answer probability (v2.0)")
    p.add_argument("--na-prob-thresh", "-t", type=float, default=1.0,
                   help="predict 'no answer' when the no-answer probability exceeds this (v2.0; default: 1.0)")
    p.add_argument("--out-file", "-o", metavar="F", help="write the JSON result to F instead of stdout")
    p.add_argument("--version", choices=("auto", "1.1", "2.0"), default="auto",
                   help="evaluation rules: auto (default) = the data file's version, 2.0 with --na-prob-file")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        dataset = _load_json(args.data_file, "data file")
        if not isinstance(dataset, dict) or "data" not in dataset:
            raise SquadEvalError(f"{args.data_file} is not a SQuAD data file (no 'data' field)")
        predictions = _load_json(args.pred_file, "prediction file")
        _check_mapping(predictions, args.pred_file, "predictions", (str,))
        na_probs = None
        if args.na_prob_file:
            na_probs = _load_json(args.na_prob_file, "no-answer probability file")
            _check_mapping(na_probs, args.na_prob_file, "no-answer probabilities", (float, int))
        version = resolve_version(dataset, args.version, na_probs is not None)
        marked = str(dataset.get("version", ""))
        if version == "1.1" and marked != "1.1":
            _stderr(f"Evaluation expects v-1.1, but got dataset with v-{marked}")
        result = evaluate(dataset, predictions, na_probs, args.na_prob_thresh, version=version)
    except SquadEvalError as e:
        _stderr(f"d2v-squad-eval: error: {e}")
        return 2
    indent = 2 if version == "2.0" else None
    if args.out_file:
        with open(args.out_file, "w", encoding="utf-8") as f:
            json.dump(result, f)
    else:
        print(json.dumps(result, indent=indent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
