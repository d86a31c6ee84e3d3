"""The regression loss and the representation-variance statistics used to detect collapse."""

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def regression_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 0.0, scale: Optional[float] = None) -> torch.Tensor:
    """Per-element loss (N, C): L2 when ``beta`` is 0, else smooth L1 with that beta.

    ``scale`` multiplies the loss; None means 1/sqrt(C).
    """
    pred = pred.reshape(-1, pred.size(-1)).float()
    target = target.reshape(-1, pred.size(-1)).float()
    if beta == 0:
        loss = F.mse_loss(pred, target, reduction="none")
    else:
        loss = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    return loss * (scale if scale is not None else 1 / math.sqrt(pred.size(-1)))


@torch.no_grad()
def feature_std(y: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the standard deviation of each channel across all rows.

    Aggregated over all workers when training is distributed. A value near zero means
    the representations have collapsed to a constant.
    """
    y = y.reshape(-1, y.size(-1)).float()
    if dist.is_available() and dist.is_initialized():
        n = torch.tensor(float(y.size(0)), device=y.device)
        s = y.sum(dim=0)
        ss = (y**2).sum(dim=0)
        for t in (n, s, ss):
            dist.all_reduce(t)
        var = ss / (n - 1) - s**2 / (n * (n - 1))
    else:
        var = y.var(dim=0)
    return torch.sqrt(var + 1e-6).mean()


class RepresentationCollapse(RuntimeError):
    """Targets or predictions lost their variance: training would only produce constants."""


def check_collapse(result, cfg, num_updates: int) -> None:
    """Raise :class:`RepresentationCollapse` when ``result``'s target_var / pred_var / local_var
    fall below ``cfg.min_target_var`` / ``cfg.min_pred_var`` / ``cfg.min_local_var`` (from
    update ``cfg.collapse_check_start`` on; a limit of 0 is off). ``num_updates``: the updates
    finished before this one."""
    if num_updates < cfg.collapse_check_start:
        return
    values = ", ".join(f"{k}={float(result[k]):.4g}" for k in ("target_var", "pred_var", "local_var") if k in result)
    for key, limit, setting in (
        ("target_var", cfg.min_target_var, "model.min_target_var"),
        ("pred_var", cfg.min_pred_var, "model.min_pred_var"),
        ("local_var", getattr(cfg, "min_local_var", 0.0), "model.min_local_var"),
    ):
        if limit <= 0 or key not in result:
            continue
        value = float(result[key])
        if value < limit:
            raise RepresentationCollapse(
                f"{key} is {value:.4g} < {setting}={limit} at update {num_updates + 1} ({values}): the representations "
                "have collapsed. Lower the learning rate, raise ema_decay or change the masking, then restart "
                "from an earlier checkpoint."
            )
