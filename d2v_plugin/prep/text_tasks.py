"""Two labelled tasks derived from the embedded default corpus, for offline downstream checks.

The default pretraining corpus (``python -m d2v_plugin.prep.text --default-corpus``) is
Python's bundled documentation, ``pydoc_data.topics.topics``: a dict from a topic key
(``"compound"``, ``"specialnames"``, ...) to that topic's text. Each key is one document of the
corpus and its blank-line separated blocks are the paragraphs. No labelled set ships offline,
so two real-language tasks are derived from it:

``topic_task``
    Which documentation topic a paragraph comes from: the ``n_topics`` topics with the most
    paragraphs of at least ``min_words`` words (by default ``compound``, ``specialnames``,
    ``types``, ``string-methods``), the same number of paragraphs from each (the smallest
    topic's count, so the classes are exactly balanced; chance is ``1 / n_topics``).
    Paragraphs whose text occurs more than once in the corpus are dropped.

``next_sentence_task``
    Whether sentence B directly follows sentence A inside the same paragraph (label ``"1"``)
    or is another sentence of the same topic that does not follow A (label ``"0"``). Each
    consecutive pair gives one positive and one negative with the same first sentence, so
    the classes are exactly balanced (chance 50%). Negatives come from the same topic, so the
    topic alone does not give the answer.

Both split by paragraph (``valid_fraction`` of the paragraphs of each class or topic go to
valid, chosen with ``random.Random(seed)``), and no text of valid occurs in train. The same
seed gives the same lists. The pretraining corpus holds these same paragraphs (unlabelled):
the tasks measure what pretraining on that text taught, like probing a model on its own
domain; they are not an unseen-text benchmark.

The content of ``pydoc_data`` depends on the Python version, so the counts do too
(``describe()`` prints them).
"""

import collections
import random
import re
import sys
from typing import Dict, List, Sequence, Tuple

from d2v_plugin.prep.text import _paragraph

# a sentence ends with . ! or ? followed by whitespace and an upper-case letter
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def default_documents() -> List[Tuple[str, List[str]]]:
    """``(topic key, paragraphs)`` of the default corpus, split as ``prep.text`` writes it."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        paragraphs = [_paragraph(p) for p in re.split(r"\n\s*\n", topics[key])]
        docs.append((key, [p for p in paragraphs if p]))
    return docs


def _split(items: Sequence, rng: random.Random, valid_fraction: float):
    items = list(items)
    rng.shuffle(items)
    n_valid = max(1, round(len(items) * valid_fraction))
    return items[n_valid:], items[:n_valid]


def _unique_paragraphs(docs):
    """Paragraph text -> how many times it occurs in the whole corpus."""
    return collections.Counter(p for _, paragraphs in docs for p in paragraphs)


def topic_task(seed: int = 0, n_topics: int = 4, min_words: int = 8, valid_fraction: float = 0.2,
               docs=None) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """``(train, valid)``: lists of ``(paragraph, topic key)``, classes exactly balanced."""
    docs = default_documents() if docs is None else docs
    counts = _unique_paragraphs(docs)
    per_topic = {
        key: [p for p in paragraphs if counts[p] == 1 and len(p.split()) >= min_words]
        for key, paragraphs in docs
    }
    ranked = sorted(per_topic, key=lambda k: (-len(per_topic[k]), k))[:n_topics]
    if len(ranked) < n_topics:
        raise ValueError(f"the corpus has only {len(ranked)} topics, asked for {n_topics}")
    size = min(len(per_topic[k]) for k in ranked)
    rng = random.Random(seed)
    train, valid = [], []
    for key in ranked:  # the same number from each topic: drawn, then split
        chosen = rng.sample(per_topic[key], size)
        tr, va = _split(chosen, rng, valid_fraction)
        train += [(p, key) for p in tr]
        valid += [(p, key) for p in va]
    rng.shuffle(train)
    rng.shuffle(valid)
    return train, valid


def sentences(paragraph: str) -> List[str]:
    """The sentences of a paragraph (split after . ! ? before an upper-case letter)."""
    return [s for s in _SENTENCE_END.split(paragraph) if s]


def _pairs(paragraphs, rng, min_words):
    """One positive and one negative pair per consecutive sentence pair of ``paragraphs``."""
    out = []
    pool = [s for p in paragraphs for s in sentences(p) if len(s.split()) >= min_words]
    for p in paragraphs:
        sents = sentences(p)
        for a, b in zip(sents, sents[1:]):
            if len(a.split()) < min_words or len(b.split()) < min_words:
                continue
            others = [s for s in pool if s != b and s != a]
            if not others:
                continue
            out.append(((a, b), "1"))
            out.append(((a, rng.choice(others)), "0"))
    return out


def next_sentence_task(seed: int = 0, min_words: int = 4, valid_fraction: float = 0.2,
                       docs=None) -> Tuple[list, list]:
    """``(train, valid)``: lists of ``((sentence_a, sentence_b), "1" | "0")``.

    ``"1"``: B is the sentence right after A in the same paragraph; ``"0"``: B is another
    sentence of the same topic (from the same split) that is not the one after A.
    """
    docs = default_documents() if docs is None else docs
    counts = _unique_paragraphs(docs)
    rng = random.Random(seed)
    train, valid = [], []
    for _, paragraphs in docs:
        paragraphs = [p for p in paragraphs if counts[p] == 1 and len(sentences(p)) >= 2]
        if len(paragraphs) < 2:
            continue
        tr, va = _split(paragraphs, rng, valid_fraction)
        train += _pairs(tr, rng, min_words)
        valid += _pairs(va, rng, min_words)
    # a sentence repeated in another paragraph must not put train text into valid
    seen = {s for (a, b), _ in train for s in (a, b)}
    valid = [ex for ex in valid if ex[0][0] not in seen and ex[0][1] not in seen]
    valid = _rebalance(valid, rng)
    rng.shuffle(train)
    rng.shuffle(valid)
    return train, valid


def _rebalance(examples, rng):
    """Drop examples of the larger classes until every class has the smallest's count."""
    by_label: Dict[str, list] = collections.defaultdict(list)
    for ex in examples:
        by_label[ex[1]].append(ex)
    size = min(len(v) for v in by_label.values())
    return [ex for v in by_label.values() for ex in rng.sample(v, size)]


TASKS = {"topic": topic_task, "next_sentence": next_sentence_task}


def describe(seed: int = 0) -> str:
    """A line per task: sizes, class counts and chance level."""
    lines = []
    for name, fn in TASKS.items():
        train, valid = fn(seed)
        classes = collections.Counter(label for _, label in train)
        chance = max(collections.Counter(label for _, label in valid).values()) / len(valid)
        lines.append(f"{name}: train {len(train)}, valid {len(valid)}, classes "
                     + ", ".join(f"{k}={v}" for k, v in sorted(classes.items()))
                     + f" (train); chance (majority class of valid) {100 * chance:.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
