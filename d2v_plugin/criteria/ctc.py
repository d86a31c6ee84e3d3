"""``d2v_ctc``: CTC loss on letters, with word and character error rates at every validation.

The loss is PyTorch's ``ctc_loss`` (blank = the dictionary's ``<s>``, index 0, as fairseq's
wav2vec 2.0 recipe; ``zero_infinity`` drops utterances too short for their transcript).
During validation every utterance is decoded greedily (best path) and compared with its
reference by jiwer: the edit counts are summed over the whole validation set, and ``wer``
(words) and ``uer`` (characters, spaces included) are logged in percent.
"""

from dataclasses import dataclass, field

import jiwer
import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from ..asr.decoding import greedy_decode, letters_to_text

COUNTS = ("w_errors", "w_total", "c_errors", "c_total")


@dataclass
class D2vCtcCriterionConfig(FairseqDataclass):
    zero_infinity: bool = field(default=True, metadata={"help": "zero the loss (and gradient) of utterances with fewer frames than letters"})
    sentence_avg: bool = field(default=II("optimization.sentence_avg"), metadata={"help": "normalise the loss per utterance (Meta's recipe) instead of per letter"})


def error_counts(refs, hyps):
    """(word errors, reference words, character errors, reference characters), by jiwer."""
    pairs = [(r, h) for r, h in zip(refs, hyps) if r.strip()]
    if not pairs:
        return 0, 0, 0, 0
    refs, hyps = [p[0] for p in pairs], [p[1] for p in pairs]
    w = jiwer.process_words(refs, hyps)
    c = jiwer.process_characters(refs, hyps)
    w_err = w.substitutions + w.deletions + w.insertions
    c_err = c.substitutions + c.deletions + c.insertions
    return w_err, w.hits + w.substitutions + w.deletions, c_err, c.hits + c.substitutions + c.deletions


@register_criterion("d2v_ctc", dataclass=D2vCtcCriterionConfig)
class D2vCtcCriterion(FairseqCriterion):
    def __init__(self, cfg: D2vCtcCriterionConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.dictionary = task.target_dictionary
        self.blank = self.dictionary.bos()
        self.pad = self.dictionary.pad()

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        log_probs = model.get_normalized_probs(net_output, log_probs=True)  # (B, T, V)
        input_lengths = model.output_lengths(net_output)
        target = sample["target"]
        target_lengths = sample["target_lengths"]
        flat = target[target != self.pad]
        with torch.backends.cudnn.flags(enabled=False):
            loss = F.ctc_loss(
                log_probs.transpose(0, 1), flat, input_lengths, target_lengths,
                blank=self.blank, reduction="sum", zero_infinity=self.cfg.zero_infinity,
            )
        ntokens = int(target_lengths.sum())
        sample_size = sample["nsentences"] if self.cfg.sentence_avg else ntokens
        out = {"loss": loss.detach(), "ntokens": ntokens, "nsentences": sample["nsentences"], "sample_size": sample_size}
        if not model.training:
            symbols = self.dictionary.symbols
            hyps = greedy_decode(log_probs.detach(), input_lengths, symbols, self.blank)
            refs = [letters_to_text([symbols[i] for i in row[row != self.pad].tolist()]) for row in target.cpu()]
            out.update(zip(COUNTS, error_counts(refs, hyps)))
        return loss, sample_size, out

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1), sample_size, round=3)
        metrics.log_scalar("ntokens", total("ntokens"))
        metrics.log_scalar("nsentences", total("nsentences"))
        if any("w_total" in log for log in logging_outputs):
            for key in COUNTS:
                metrics.log_scalar(f"_{key}", total(key))
            metrics.log_derived("wer", lambda m: _percent(m, "_w_errors", "_w_total"))
            metrics.log_derived("uer", lambda m: _percent(m, "_c_errors", "_c_total"))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def _percent(meters, errors, total):
    n = meters[total].sum
    return round(100.0 * meters[errors].sum / n, 3) if n > 0 else float("nan")
