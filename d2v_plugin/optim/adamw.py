"""``d2v_adamw``: fairseq's ``adam`` update computed with multi-tensor (``torch._foreach_*``) kernels.

fairseq's ``adam`` (``fairseq.optim.adam.Adam``) steps every parameter with a Python loop of
about ten tensor operations each: on a small model that loop is a sizeable share of an update
(~11-13% of a tiny text update on the CPU). This optimizer does the same arithmetic, in the same
order, for all parameters at once:

- decoupled weight decay (AdamW): ``p <- p - lr * weight_decay * p``, before the Adam step;
- ``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2``;
- ``p <- p - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)``: fairseq's epsilon,
  added to ``sqrt(v)`` *before* the bias correction (torch.optim.AdamW adds it after, so its
  updates differ from fairseq's while ``sqrt(v)`` is small against ``eps``).

The optimizer state (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) is laid out as
fairseq's, so checkpoints move between ``adam`` and ``d2v_adamw`` both ways. Parameters in
fp16/bf16 are stepped in fp32 and copied back, as fairseq's ``adam`` does.

``impl`` chooses the kernels: ``foreach`` (the above, CPU and CUDA), ``torch_fused``
(``torch.optim.AdamW(fused=True)`` on CUDA, epsilon rescaled every step to fairseq's
convention), ``apex`` (the NVIDIA apex FusedAdam that fairseq's ``adam`` uses when apex is
installed; never required) or ``auto`` (``torch_fused`` on CUDA where torch supports it, else
``foreach``).
"""

import logging
import math
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.optim import FairseqOptimizer, register_optimizer
from fairseq.optim.adam import FairseqAdamConfig
from omegaconf import OmegaConf

logger = logging.getLogger(__name__)

IMPLS = ChoiceEnum(["auto", "foreach", "torch_fused", "apex"])


@dataclass
class D2vAdamWConfig(FairseqAdamConfig):
    """fairseq's ``adam`` fields (so ``_name: adam`` -> ``_name: d2v_adamw`` is the only change) and ``impl``."""

    impl: IMPLS = field(
        default="auto",
        metadata={"help": "kernels: foreach (multi-tensor, CPU and CUDA), torch_fused (torch.optim.AdamW fused=True, CUDA), "
                  "apex (NVIDIA apex FusedAdam, as fairseq's adam uses when apex is installed), auto (torch_fused on CUDA "
                  "where supported, else foreach)"},
    )


def _betas(value):
    if isinstance(value, str):
        value = eval(value)  # fairseq's adam accepts '(0.9, 0.98)' the same way
    return tuple(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


class ForeachAdamW(torch.optim.Optimizer):
    """fairseq's ``Adam`` (AdamW-style weight decay, fairseq's epsilon) with ``torch._foreach_*`` kernels.

    Parameters are stepped in buckets of equal device, dtype and step count (a parameter that
    had no gradient in some updates, e.g. skipped by layerdrop, keeps its own count as in fairseq).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @property
    def supports_memory_efficient_fp16(self):
        return True

    @property
    def supports_flat_params(self):
        return True

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            buckets = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("d2v_adamw does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                buckets[(p.device, p.dtype, state["step"])].append(p)
            for (_, dtype, step), params in buckets.items():
                self._step_bucket(group, params, dtype, step)
        return loss

    def _step_bucket(self, group, params, dtype, step):
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        low_precision = dtype in (torch.float16, torch.bfloat16)
        data = [p.float() for p in params] if low_precision else list(params)
        grads = [p.grad.float() if p.grad.dtype != torch.float32 else p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        if exp_avgs[0].device != data[0].device or exp_avgs[0].dtype != torch.float32:  # state loaded elsewhere
            for p in params:
                for key in ("exp_avg", "exp_avg_sq"):
                    self.state[p][key] = self.state[p][key].to(device=p.device, dtype=torch.float32)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]

        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps)
        step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        if wd != 0:
            torch._foreach_add_(data, data, alpha=-wd * lr)  # p + (-wd lr) p, as fairseq's p.add_(p, alpha=...)
        torch._foreach_addcdiv_(data, exp_avgs, denom, value=-step_size)
        if low_precision:
            for p, d in zip(params, data):
                p.copy_(d)


class TorchFusedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` with fairseq's epsilon convention.

    torch adds ``eps`` to ``sqrt(v / (1 - beta2^t))``; fairseq adds it to ``sqrt(v)``. Both agree
    when each group's ``eps`` is ``adam_eps / sqrt(1 - beta2^t)``, which is set before every step
    (``t`` = the group's update count; a parameter skipped in some updates, e.g. by layerdrop,
    then gets a slightly different epsilon than under fairseq's ``adam``).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        for group in self.param_groups:
            group.setdefault("fairseq_eps", eps)
            group.setdefault("group_step", 0)

    @property
    def supports_flat_params(self):
        return True

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if any(p.grad is not None for p in group["params"]):
                group["group_step"] += 1
                group["eps"] = group["fairseq_eps"] / math.sqrt(1 - group["betas"][1] ** group["group_step"])
        return super().step(closure)


def _torch_fused_supported(params) -> bool:
    return all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


@register_optimizer("d2v_adamw", dataclass=D2vAdamWConfig)
class D2vAdamW(FairseqOptimizer):
    """fairseq's ``adam`` (AdamW-style weight decay) with multi-tensor or fused kernels; a drop-in
    for ``optimizer._name=adam`` (same fields, same update, same checkpoint state)."""

    def __init__(self, cfg: D2vAdamWConfig, params):
        super().__init__(cfg)
        params = list(params)
        flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
        for flag in ("use_old_adam", "fp16_adam_stats", "tpu"):
            if getattr(cfg, flag, False):
                raise ValueError(f"optimizer.{flag}=true is not supported by d2v_adamw; use optimizer._name=adam for it")
        impl = cfg.impl
        if impl == "auto":
            impl = "torch_fused" if flat and _torch_fused_supported(flat) else "foreach"
        if impl == "torch_fused" and not _torch_fused_supported(flat):
            raise ValueError("optimizer.impl=torch_fused needs every parameter on a CUDA device (use foreach on the CPU)")
        if impl == "apex":
            from fairseq.optim.fused_adam import get_fused_adam_class

            apex_cls = get_fused_adam_class()
            if apex_cls is None or not torch.cuda.is_available():
                raise ValueError("optimizer.impl=apex needs NVIDIA apex (built with its CUDA extensions) and a GPU; "
                                 "use impl=auto to fall back to torch's kernels")
            self._optimizer = apex_cls(params, **self.optimizer_config)
        elif impl == "torch_fused":
            self._optimizer = TorchFusedAdamW(params, **self.optimizer_config)
        else:
            self._optimizer = ForeachAdamW(params, **self.optimizer_config)
        self.impl = impl
        logger.info(f"d2v_adamw: {impl} kernels")

    @property
    def optimizer_config(self):
        lr = self.cfg.lr[0] if isinstance(self.cfg.lr, Collection) else self.cfg.lr
        return {"lr": lr, "betas": _betas(self.cfg.adam_betas), "eps": self.cfg.adam_eps, "weight_decay": self.cfg.weight_decay}

    @property
    def supports_flat_params(self):
        return True

    @property
    def supports_memory_efficient_fp16(self):
        return self.impl == "foreach"
