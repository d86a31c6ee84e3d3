"""``d2v_sentence_prediction``: cross-entropy (classes) or MSE (regression) on one output per
example, with GLUE's metrics computed on the whole validation set.

During validation every batch's predictions and labels are collected in the validation
aggregator (hidden meters ``_pred`` / ``_targ``); the metrics are derived from all of them
when fairseq prints the validation line, so MCC, F1 and correlations are those of the full
dev set, not averages over batches. Values are logged in percent, like ``accuracy``.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics

from .. import metrics as glue_metrics

REPORT_CHOICES = ChoiceEnum(list(glue_metrics.METRICS))
PRED, TARG = "_pred", "_targ"


@dataclass
class D2VSentencePredictionConfig(FairseqDataclass):
    report: REPORT_CHOICES = field(
        default="accuracy",
        metadata={
            "help": "metrics logged at validation, on the whole valid set: accuracy; mcc (CoLA); acc_and_f1 "
            "(MRPC, QQP); macro_f1 (generic classification sets); pearson_and_spearman (STS-B, regression)"
        },
    )
    positive_label: str = field(
        default="1",
        metadata={"help": "label (as written in label/dict.txt) whose F1 acc_and_f1 reports; GLUE: '1' (paraphrase / duplicate)"},
    )
    classification_head_name: str = field(
        default="sentence_classification_head",
        metadata={"help": "fairseq's own roberta models (fairseq's sentence_prediction task, e.g. the RoBERTa arm of "
                  "scripts/compare_text.sh): the classification head to call; d2v_text_classification ignores it"},
    )


@register_criterion("d2v_sentence_prediction", dataclass=D2VSentencePredictionConfig)
class D2VSentencePredictionCriterion(FairseqCriterion):
    def __init__(self, cfg: D2VSentencePredictionConfig, task):
        super().__init__(task)
        self.report = str(cfg.report)
        self.regression = bool(getattr(task.cfg, "regression_target", False))
        if self.regression != (self.report == "pearson_and_spearman"):
            kind = "a regression task (task.regression_target=true)" if self.regression else "a classification task"
            raise ValueError(
                f"criterion.report={self.report} does not fit {kind}: use pearson_and_spearman for regression "
                "and accuracy / mcc / acc_and_f1 / macro_f1 for classification"
            )
        self.head_name = cfg.classification_head_name
        self.pos_index = 1
        if self.report == "acc_and_f1":
            labels = task.label_dictionary
            idx = labels.index(cfg.positive_label)
            if idx == labels.unk() or idx < labels.nspecial:
                names = ", ".join(labels.symbols[labels.nspecial :])
                raise ValueError(f"criterion.positive_label={cfg.positive_label!r} is not a label of this task (labels: {names})")
            self.pos_index = idx - labels.nspecial

    def forward(self, model, sample, reduce=True):
        if hasattr(model, "classification_heads"):  # fairseq's roberta: named heads on the features
            logits, _ = model(**sample["net_input"], features_only=True, classification_head_name=self.head_name)
        else:
            logits = model(**sample["net_input"])
        targets = model.get_targets(sample, [logits])
        nsentences = logits.size(0)
        if self.regression:
            preds = logits.float().view(nsentences, -1)
            targets = targets.float().view(nsentences, -1)
            loss = F.mse_loss(preds, targets, reduction="sum")
        else:
            targets = targets.view(-1)
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            preds = logits.argmax(dim=-1)
        log = {
            "loss": loss.detach().item(),
            "ntokens": sample["ntokens"],
            "nsentences": nsentences,
            "sample_size": nsentences,
        }
        if not self.regression:
            log["ncorrect"] = (preds == targets).sum().item()
        if not model.training:
            # one value per example (the first regression output): the metrics need all of them
            log[PRED] = (preds[:, 0] if self.regression else preds).detach().cpu().tolist()
            log[TARG] = (targets[:, 0] if self.regression else targets).detach().cpu().tolist()
            log["_report"] = self.report
            log["_pos"] = self.pos_index
        return loss, nsentences, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size = max(total("sample_size"), 1)
        metrics.log_scalar("loss", total("loss") / sample_size, sample_size, round=4)
        nsentences = total("nsentences")
        if any("ncorrect" in log for log in logging_outputs) and nsentences:
            metrics.log_scalar("accuracy", 100.0 * total("ncorrect") / nsentences, nsentences, round=2)

        report = next((log["_report"] for log in logging_outputs if "_report" in log), None)
        if report is None:
            return
        pos = next(log["_pos"] for log in logging_outputs if "_pos" in log)
        preds = [p for log in logging_outputs for p in log.get(PRED, [])]
        targs = [t for log in logging_outputs for t in log.get(TARG, [])]
        if not preds:
            return
        dtype = torch.float64 if report == "pearson_and_spearman" else torch.long
        metrics.log_concat_tensor(PRED, torch.tensor(preds, dtype=dtype))
        metrics.log_concat_tensor(TARG, torch.tensor(targs, dtype=dtype))
        for key in glue_metrics.METRICS[report]:
            if key == "accuracy":
                continue  # logged above from the counts
            metrics.log_derived(key, _derived(report, key, pos))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        # validation outputs carry lists of predictions: gather them, do not sum them
        return False


def _derived(report: str, key: str, pos: int):
    def fn(meters):
        pred, targ = meters.get(PRED), meters.get(TARG)
        if pred is None or targ is None or pred.tensor is None or targ.tensor is None:
            return 0.0
        values = glue_metrics.compute(report, pred.tensor.numpy(), targ.tensor.numpy(), pos_label=pos)
        return round(100.0 * values[key], 2)

    return fn


def forget_predictions(meters) -> None:
    """Empty the collected predictions of an aggregator (they would be saved in checkpoints)."""
    if meters is None:
        return
    for key in (PRED, TARG):
        if key in meters and meters[key] is not None:
            meters[key].reset()
