"""``d2v_image_classification``: cross-entropy with mixup / cutmix and label smoothing; top-1 and top-5.

Training (Meta's data2vec 2.0 recipe): timm's ``Mixup`` mixes the batch (mixup with
probability ``1 - mixup_switch_prob``, else cutmix; applied to a batch with probability
``mixup_prob``) and gives label-smoothed soft targets; the loss is the soft-target
cross-entropy. Without mixup and cutmix it is the cross-entropy with ``label_smoothing``.
timm mixes pairs of images, so an odd batch's last image is not mixed (its target is only
smoothed). Validation: plain cross-entropy; ``accuracy`` (top-1) and ``top5`` in percent.
The loss is logged per image, in bits (fairseq's convention).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics


@dataclass
class ImageClassificationCriterionConfig(FairseqDataclass):
    mixup: float = field(default=0.8, metadata={"help": "mixup alpha (0 = off; Meta's data2vec 2.0 recipe: 0.7)"})
    cutmix: float = field(default=1.0, metadata={"help": "cutmix alpha (0 = off)"})
    mixup_prob: float = field(default=1.0, metadata={"help": "probability of mixing a batch (Meta's recipe: 0.9)"})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "probability of cutmix instead of mixup when both are on"})
    mixup_mode: ChoiceEnum(["batch", "pair", "elem"]) = field(default="batch", metadata={"help": "timm Mixup mode: one mixing per batch, pair or element"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the training targets"})


def soft_target_loss(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``logits`` against probability vectors."""
    return -(soft_targets * F.log_softmax(logits.float(), dim=-1)).sum()


@register_criterion("d2v_image_classification", dataclass=ImageClassificationCriterionConfig)
class ImageClassificationCriterion(FairseqCriterion):
    def __init__(self, cfg: ImageClassificationCriterionConfig, task):
        super().__init__(task)
        self.cfg = cfg
        self.num_classes = task.num_classes
        self.mixup_fn = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            self.mixup_fn = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                mode=str(cfg.mixup_mode), label_smoothing=cfg.label_smoothing, num_classes=self.num_classes,
            )

    def training_targets(self, source, target):
        """(images, soft targets or None): the batch after mixup / cutmix, when on."""
        if self.mixup_fn is None or source.size(0) < 2:
            return source, None
        from timm.data.mixup import mixup_target

        n = source.size(0) - source.size(0) % 2
        mixed, soft = self.mixup_fn(source[:n].clone(), target[:n])
        if n < source.size(0):
            rest = mixup_target(target[n:], self.num_classes, 1.0, self.cfg.label_smoothing)
            mixed, soft = torch.cat([mixed, source[n:]]), torch.cat([soft, rest.to(soft)])
        return mixed, soft

    def forward(self, model, sample, reduce=True):
        source, target = sample["net_input"]["source"], sample["target"]
        soft = None
        if model.training:
            source, soft = self.training_targets(source, target)
        logits = model(source)
        if soft is not None:
            loss = soft_target_loss(logits, soft)
        else:
            smoothing = self.cfg.label_smoothing if model.training else 0.0
            loss = F.cross_entropy(logits.float(), target, label_smoothing=smoothing, reduction="sum")
        n = logits.size(0)
        log = {"loss": loss.detach().item(), "ntokens": n, "nsentences": n, "sample_size": n}
        if not model.training:
            with torch.no_grad():
                k = min(5, logits.size(1))
                top = logits.topk(k, dim=-1).indices
                hit = top == target.unsqueeze(1)
                log["ncorrect"] = hit[:, 0].sum().item()
                log["ncorrect5"] = hit.any(dim=1).sum().item()
        return loss, n, log

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        n = total("sample_size")
        if n:
            metrics.log_scalar("loss", total("loss") / n / math.log(2), n, round=4)
        if n and any("ncorrect" in log for log in logging_outputs):
            metrics.log_scalar("accuracy", 100.0 * total("ncorrect") / n, n, round=3)
            metrics.log_scalar("top5", 100.0 * total("ncorrect5") / n, n, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
