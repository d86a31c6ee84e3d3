"""``data2vec`` criterion: sums the model's losses and logs its training statistics."""

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics

DEFAULT_LOG_KEYS = ["ema_decay", "target_var", "pred_var", "local_var", "masked_pct", "model_norm", "ema_norm"]
# decimals shown in the progress log; the EMA decay needs more than the default 3
ROUNDING = {"ema_decay": 6}


@dataclass
class Data2VecCriterionConfig(FairseqDataclass):
    log_keys: Optional[List[str]] = field(
        default=None,
        metadata={"help": "scalar outputs of the model to log, averaged over workers (default: " + ", ".join(DEFAULT_LOG_KEYS) + ")"},
    )


@register_criterion("data2vec", dataclass=Data2VecCriterionConfig)
class Data2VecCriterion(FairseqCriterion):
    """The model returns ``{"losses": {name: tensor}, "sample_size": n, <stats>}``.

    The loss is the sum of all loss tensors; fairseq divides gradients by
    ``sample_size`` (the number of predicted steps). Logged ``loss`` is per predicted step.
    """

    def __init__(self, task, log_keys=None):
        super().__init__(task)
        self.log_keys = list(log_keys) if log_keys is not None else list(DEFAULT_LOG_KEYS)

    def forward(self, model, sample, reduce=True):
        self.last_log = None  # set below once this update's forward succeeded
        out = model(**sample["net_input"])
        losses = {k: v.float().sum() for k, v in out["losses"].items()}
        loss = sum(losses.values())
        sample_size = int(out["sample_size"])
        log = {
            "loss": loss.item(),
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
            "_world_size": 1,
        }
        if len(losses) > 1:
            for k, v in losses.items():
                log[f"loss_{k}"] = v.item()
        for k in self.log_keys:
            if k in out:
                v = out[k]
                log[k] = float(v.item() if torch.is_tensor(v) else v)
        # this update's loss terms and statistics, for the message of a stopped run (training_stop.py)
        self.last_log = {"loss": log["loss"], **{f"loss_{k}": log.get(f"loss_{k}", log["loss"]) for k in losses},
                         **{k: log[k] for k in self.log_keys if k in log}}
        return loss, sample_size, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size = max(total("sample_size"), 1)
        world = max(total("_world_size"), 1)
        metrics.log_scalar("loss", total("loss") / sample_size, sample_size, round=4)
        metrics.log_scalar("ntokens", total("ntokens"))
        metrics.log_scalar("nsentences", total("nsentences"))
        metrics.log_scalar("sample_size", sample_size)
        keys = {k for log in logging_outputs for k in log}
        for k in sorted(keys - {"loss", "ntokens", "nsentences", "sample_size", "_world_size"}):
            if k.startswith("loss_"):
                metrics.log_scalar(k, total(k) / sample_size, sample_size, round=4)
            else:
                metrics.log_scalar(k, total(k) / world, round=ROUNDING.get(k, 4))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
