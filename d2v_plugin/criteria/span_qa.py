"""``d2v_span_qa``: cross-entropy of the answer's start and end tokens (SQuAD)."""

import math
from dataclasses import dataclass

import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass


@dataclass
class SpanQACriterionConfig(FairseqDataclass):
    pass


@register_criterion("d2v_span_qa", dataclass=SpanQACriterionConfig)
class SpanQACriterion(FairseqCriterion):
    """loss = (CE(start logits, start) + CE(end logits, end)) / 2, summed over windows.

    ``sample_size`` is the number of windows; logged: ``loss`` (base 2, per window),
    ``start_acc`` and ``end_acc`` (share of windows whose arg-max is the labelled token).
    """

    def forward(self, model, sample, reduce=True):
        net_output = model(**sample["net_input"])
        return self.loss_from_output(net_output, sample, reduce=reduce)

    def loss_from_output(self, net_output, sample, reduce=True):
        start_logits, end_logits = net_output["start_logits"], net_output["end_logits"]
        start, end = sample["start_positions"], sample["end_positions"]
        reduction = "sum" if reduce else "none"
        loss = (
            F.cross_entropy(start_logits, start, reduction=reduction)
            + F.cross_entropy(end_logits, end, reduction=reduction)
        ) / 2
        n = start.numel()
        logging_output = {
            "loss": loss.data if reduce else loss.data.sum(),
            "ntokens": sample["ntokens"],
            "nsentences": n,
            "sample_size": n,
            "start_correct": (start_logits.argmax(-1) == start).sum().item(),
            "end_correct": (end_logits.argmax(-1) == end).sum().item(),
        }
        return loss, n, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss = sum(float(log.get("loss", 0)) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss / max(sample_size, 1) / math.log(2), sample_size, round=3)
        if sample_size > 0:
            for key in ("start", "end"):
                correct = sum(log.get(f"{key}_correct", 0) for log in logging_outputs)
                metrics.log_scalar(f"{key}_acc", 100.0 * correct / sample_size, sample_size, round=1)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
