"""``d2v_squad``: extractive question answering (SQuAD v1.1 / v2.0) on a pretrained data2vec text encoder.

Data: ``task.data`` is a directory holding the SQuAD json files (as written by
``datasets/squad/prepare.sh``); split ``train`` reads ``task.train_file``, split ``valid``
reads ``task.valid_file``, any other split ``S`` reads ``S.json``. Text is tokenized with
the pretrained model's tokenizer and dictionary (see :mod:`d2v_plugin.data.squad_features`).

Training items are windows (question + a stretch of the context). Validation items are
questions with all their windows, so that each validation step decodes whole questions:
the n-best search over spans gives one answer text per question. When every question of
a validation split has been decoded (across all workers), the task

* logs ``exact`` and ``f1``, computed by :mod:`d2v_plugin.squad_eval` (the official SQuAD
  rules of the configured version; for v2.0 the predictions already decide "no answer"
  with ``null_score_diff_threshold``);
* writes ``predictions.json`` (question id -> answer text), ``null_odds.json`` (question id ->
  null score minus best span score, the official script's ``--na-prob-file``) and
  ``eval.json`` (the full official evaluation, v2.0 with ``best_*`` from the null odds) into
  ``task.predictions_dir`` (default: the checkpoint directory); another validation split
  ``S`` writes ``S_predictions.json`` etc.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from fairseq import metrics
from fairseq.data import Dictionary, FairseqDataset
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks import FairseqTask, register_task
from omegaconf import II, MISSING

from ..data.squad_features import SquadData, build_features, build_tokenizer, decode_example, read_squad
from ._common import TextDictionaryMixin, check_data_dir, load_text_dictionary

logger = logging.getLogger(__name__)


@dataclass
class SquadConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with the SQuAD json files (datasets/squad/prepare.sh --out DIR)"})
    train_file: str = field(default="train-v1.1.json", metadata={"help": "training file in task.data (split 'train')"})
    valid_file: str = field(default="dev-v1.1.json", metadata={"help": "validation file in task.data (split 'valid')"})
    version_2_with_negative: bool = field(
        default=False, metadata={"help": "SQuAD 2.0: questions may have no answer (predicted through the first token)"}
    )
    dict_path: str = field(default=MISSING, metadata={"help": "fairseq dictionary (dict.txt) the checkpoint was pretrained with; <mask> is added as in pretraining"})
    bpe: ChoiceEnum(["sentencepiece", "gpt2"]) = field(
        default="gpt2", metadata={"help": "tokenizer of the pretrained model: a sentencepiece model or fairseq's GPT-2 BPE (Meta's checkpoints)"}
    )
    sentencepiece_model: Optional[str] = field(
        default=None, metadata={"help": "sentencepiece .model file (bpe=sentencepiece; default: spm.model beside dict_path)"}
    )
    gpt2_encoder_json: Optional[str] = field(default=None, metadata={"help": "GPT-2 encoder.json (bpe=gpt2; default: beside dict_path)"})
    gpt2_vocab_bpe: Optional[str] = field(default=None, metadata={"help": "GPT-2 vocab.bpe (bpe=gpt2; default: beside dict_path)"})
    max_seq_length: int = field(default=384, metadata={"help": "tokens per window: <s> question </s></s> context </s>"})
    doc_stride: int = field(default=128, metadata={"help": "context tokens between the starts of consecutive windows of a long context"})
    max_query_length: int = field(default=64, metadata={"help": "questions are cut to this many tokens"})
    n_best_size: int = field(default=20, metadata={"help": "start and end candidates per window in the n-best span search"})
    max_answer_length: int = field(default=30, metadata={"help": "longest answer (in tokens) the decoder predicts"})
    null_score_diff_threshold: float = field(
        default=0.0, metadata={"help": "SQuAD 2.0: predict no answer when null score - best span score exceeds this"}
    )
    predictions_dir: Optional[str] = field(
        default=II("checkpoint.save_dir"), metadata={"help": "where validation writes predictions.json, null_odds.json and eval.json"}
    )
    seed: int = field(default=II("common.seed"), metadata={"help": "seed of the shuffling"})


def _collate_windows(windows, pad: int) -> Dict:
    """[(tokens, start, end)] -> padded (N, T) source, padding mask and labels."""
    n = len(windows)
    width = max(len(w[0]) for w in windows)
    source = torch.full((n, width), pad, dtype=torch.long)
    for i, (tokens, _, _) in enumerate(windows):
        source[i, : len(tokens)] = torch.from_numpy(tokens.astype(np.int64))
    return {
        "net_input": {"source": source, "padding_mask": source.eq(pad)},
        "start_positions": torch.tensor([w[1] for w in windows], dtype=torch.long),
        "end_positions": torch.tensor([w[2] for w in windows], dtype=torch.long),
        "nsentences": n,
        "ntokens": sum(len(w[0]) for w in windows),
    }


class SquadWindowDataset(FairseqDataset):
    """Training items: one window each."""

    def __init__(self, feats, pad: int):
        self.feats = feats
        self.pad = pad
        self._sizes = feats.sizes

    def __len__(self):
        return len(self.feats.tokens)

    def __getitem__(self, index):
        f = self.feats
        return {"id": index, "window": (f.tokens[index], int(f.start_positions[index]), int(f.end_positions[index]))}

    def collater(self, samples):
        if not samples:
            return {}
        batch = _collate_windows([s["window"] for s in samples], self.pad)
        batch["id"] = torch.tensor([s["id"] for s in samples], dtype=torch.long)
        return batch

    @property
    def sizes(self):
        return self._sizes

    def num_tokens(self, index):
        return int(self._sizes[index])

    def size(self, index):
        return int(self._sizes[index])

    def ordered_indices(self):
        order = np.random.permutation(len(self))
        return order[np.argsort(self._sizes[order], kind="mergesort")]


class SquadQuestionDataset(FairseqDataset):
    """Evaluation items: one question with all its windows, decoded together."""

    def __init__(self, data: SquadData, feats, pad: int, split: str):
        self.data = data
        self.feats = feats
        self.pad = pad
        self.split = split
        lengths = feats.sizes
        self._sizes = np.array([max(lengths[w] for w in ws) for ws in feats.example_windows], dtype=np.int64)
        self._tokens = np.array([len(ws) for ws in feats.example_windows], dtype=np.int64) * self._sizes

    def __len__(self):
        return len(self.data.examples)

    def __getitem__(self, index):
        f = self.feats
        windows = [(f.tokens[w], int(f.start_positions[w]), int(f.end_positions[w])) for w in f.example_windows[index]]
        return {"id": index, "windows": windows}

    def collater(self, samples):
        if not samples:
            return {}
        batch = _collate_windows([w for s in samples for w in s["windows"]], self.pad)
        batch["id"] = torch.tensor([s["id"] for s in samples], dtype=torch.long)
        batch["example_ids"] = [s["id"] for s in samples]
        batch["window_counts"] = [len(s["windows"]) for s in samples]
        batch["split"] = self.split
        return batch

    @property
    def sizes(self):
        return self._sizes

    def num_tokens(self, index):
        return int(self._tokens[index])

    def size(self, index):
        return int(self._sizes[index])

    def ordered_indices(self):
        return np.argsort(self._tokens, kind="mergesort")

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        # Every question must be decoded for the evaluation, but fairseq's batch_by_size drops
        # the last questions when required_batch_size_multiple > 1 (60 items, 16 per batch,
        # multiple 8 -> 56): batch without the multiple.
        return super().batch_by_size(indices, max_tokens, max_sentences, required_batch_size_multiple=1)

    def decode(self, sample, start_logits, end_logits, **kwargs) -> Dict[str, list]:
        """{question id: [answer text, null odds]} for the questions of ``sample``."""
        start = start_logits.float().cpu().numpy()
        end = end_logits.float().cpu().numpy()
        out, row = {}, 0
        for ex, count in zip(sample["example_ids"], sample["window_counts"]):
            pred = decode_example(self.data, self.feats, ex, start[row:row + count], end[row:row + count], **kwargs)
            out[self.data.examples[ex].qid] = [pred.text, pred.null_odds]
            row += count
        return out


@register_task("d2v_squad", dataclass=SquadConfig)
class SquadTask(TextDictionaryMixin, FairseqTask):
    cfg: SquadConfig

    def __init__(self, cfg: SquadConfig, dictionary: Dictionary, tokenizer):
        super().__init__(cfg)
        self.dictionary = dictionary
        self.tokenizer = tokenizer
        self._collected: Dict[str, Dict[str, list]] = {}

    @classmethod
    def setup_task(cls, cfg: SquadConfig, **kwargs):
        check_data_dir(cfg.data, "datasets/squad/prepare.sh --out DIR writes one")
        if not os.path.isfile(cfg.dict_path):
            raise FileNotFoundError(f"task.dict_path: {cfg.dict_path} does not exist (the dict.txt of pretraining)")
        if cfg.doc_stride < 1 or cfg.max_seq_length < 8 or cfg.max_answer_length < 1 or cfg.n_best_size < 1:
            raise ValueError("task.doc_stride, max_answer_length and n_best_size must be >= 1 and max_seq_length >= 8")
        dictionary = load_text_dictionary(cfg.dict_path)
        beside = os.path.dirname(os.path.abspath(cfg.dict_path))
        tokenizer = build_tokenizer(
            cfg.bpe,
            dictionary,
            sentencepiece_model=cfg.sentencepiece_model or os.path.join(beside, "spm.model"),
            gpt2_encoder_json=cfg.gpt2_encoder_json or os.path.join(beside, "encoder.json"),
            gpt2_vocab_bpe=cfg.gpt2_vocab_bpe or os.path.join(beside, "vocab.bpe"),
        )
        logger.info(f"dictionary {cfg.dict_path}: {len(dictionary)} types; tokenizer {tokenizer.name}")
        return cls(cfg, dictionary, tokenizer)

    def max_positions(self):
        return self.cfg.max_seq_length

    def split_file(self, split: str) -> str:
        name = {"train": self.cfg.train_file, "valid": self.cfg.valid_file}.get(split, f"{split}.json")
        return os.path.join(self.cfg.data, name)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        path = self.split_file(split)
        training = split.startswith("train")
        data = read_squad(path, allow_impossible=self.cfg.version_2_with_negative)
        feats, unlocated = build_features(
            data,
            self.tokenizer,
            self.cfg.max_seq_length,
            self.cfg.doc_stride,
            self.cfg.max_query_length,
            bos=self.dictionary.bos(),
            eos=self.dictionary.eos(),
            skip_unlocated=training,
        )
        n_answerable = sum(1 for e in data.examples if e.answers)
        with_label = int((feats.start_positions > 0).sum())
        logger.info(
            f"{split}: {path}: {len(data.examples)} questions ({n_answerable} answerable), {len(feats.tokens)} windows "
            f"({with_label} containing their answer), {unlocated} answers not found in their context"
            + (" (left out)" if training and unlocated else "")
        )
        if training:
            self.datasets[split] = SquadWindowDataset(feats, self.dictionary.pad())
        else:
            self.datasets[split] = SquadQuestionDataset(data, feats, self.dictionary.pad(), split)

    # ---- validation: decode whole questions, evaluate once a split is complete ----------------

    @staticmethod
    def logging_outputs_can_be_summed(criterion) -> bool:
        # validation outputs carry the decoded answers (strings): gather them instead of summing.
        # The trainer puts the criterion in eval mode for validation steps.
        return bool(criterion.training) and criterion.logging_outputs_can_be_summed()

    def begin_valid_epoch(self, epoch, model):
        super().begin_valid_epoch(epoch, model)
        self._collected = {}

    def valid_step(self, sample, model, criterion):
        if not hasattr(criterion, "loss_from_output"):
            raise TypeError("task d2v_squad needs criterion d2v_span_qa")
        model.eval()
        with torch.no_grad():
            net_output = model(**sample["net_input"])
            loss, sample_size, logging_output = criterion.loss_from_output(net_output, sample)
        split = sample.get("split")
        if split is not None and "example_ids" in sample:  # not a dummy (training) batch
            dataset = self.datasets[split]
            logging_output["squad_split"] = split
            logging_output["squad_predictions"] = dataset.decode(
                sample,
                net_output["start_logits"],
                net_output["end_logits"],
                n_best_size=self.cfg.n_best_size,
                max_answer_length=self.cfg.max_answer_length,
                version_2=self.cfg.version_2_with_negative,
                null_score_diff_threshold=self.cfg.null_score_diff_threshold,
            )
        return loss, sample_size, logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        for log in logging_outputs:
            if "squad_predictions" in log:
                self._collected.setdefault(log["squad_split"], {}).update(log["squad_predictions"])
        for split, found in list(self._collected.items()):
            dataset = self.datasets.get(split)
            if isinstance(dataset, SquadQuestionDataset) and len(found) >= len(dataset):
                del self._collected[split]
                self._evaluate(split, dataset, found)

    def _evaluate(self, split: str, dataset: SquadQuestionDataset, found: Dict[str, list]):
        from .. import squad_eval  # imported here: `python -m d2v_plugin.squad_eval` must not find it loaded

        predictions = {qid: text for qid, (text, _) in found.items()}
        null_odds = {qid: float(odds) for qid, (_, odds) in found.items()}
        version = "2.0" if self.cfg.version_2_with_negative else "1.1"
        result = squad_eval.evaluate(dataset.data.raw, predictions, version=version, warn=logger.warning)
        exact = result["exact_match"] if version == "1.1" else result["exact"]
        metrics.log_scalar("exact", exact, 1, priority=10, round=2)
        metrics.log_scalar("f1", result["f1"], 1, priority=11, round=2)
        if version == "2.0":
            for key in ("HasAns_f1", "NoAns_f1"):
                if key in result:
                    metrics.log_scalar(key, result[key], 1, priority=12, round=2)
            result = squad_eval.evaluate_v2(dataset.data.raw, predictions, null_odds, warn=logger.warning)
        logger.info(f"SQuAD {version} evaluation of {split} ({dataset.data.path}): {json.dumps(result)}")
        out_dir = self.cfg.predictions_dir
        if not out_dir or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
            return
        os.makedirs(out_dir, exist_ok=True)
        prefix = "" if split == "valid" else f"{split}_"
        for name, obj in (("predictions", predictions), ("null_odds", null_odds), ("eval", result)):
            path = os.path.join(out_dir, f"{prefix}{name}.json")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=1, ensure_ascii=False)
            os.replace(path + ".tmp", path)
        logger.info(f"wrote {os.path.join(out_dir, prefix + 'predictions.json')} and {prefix}null_odds.json, {prefix}eval.json")
