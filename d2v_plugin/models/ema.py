"""The EMA teacher: a frozen copy of (part of) the student, updated as a moving average."""

import copy
from collections import OrderedDict

import torch
import torch.nn as nn


def annealed_decay(start: float, end: float, step: int, total_steps: int) -> float:
    """Linear schedule from ``start`` at step 0 to ``end`` at ``total_steps`` (held after)."""
    if step >= total_steps or total_steps <= 0:
        return end
    return end - (end - start) * (1 - step / total_steps)


class EMATeacher:
    """Holds the teacher module and its fp32 master weights.

    Not an ``nn.Module`` on purpose: its weights are not the student's parameters. The
    student stores :meth:`state_dict` under the key ``_ema`` of its own state dict, the
    format of Meta's checkpoints (parameter names relative to the teacher module).
    """

    def __init__(self, student_part: nn.Module, decay: float):
        self.model = copy.deepcopy(student_part)
        self.model.requires_grad_(False)
        self.model.eval()
        self.decay = decay
        self.logs = {}

    @property
    def device(self):
        return next(self.model.parameters()).device

    def to(self, device) -> None:
        self.model.to(device=device)

    @torch.no_grad()
    def step(self, student_part: nn.Module) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter."""
        teacher = dict(self.model.named_parameters())
        params_t, params_s = [], []
        for name, p in student_part.named_parameters():
            if name in teacher:
                params_t.append(teacher[name])
                params_s.append(p.detach().to(device=teacher[name].device, dtype=teacher[name].dtype))
        if params_t:
            torch._foreach_lerp_(params_t, params_s, 1.0 - self.decay)
            self.logs = {"model_norm": _norm_of(params_s), "ema_norm": _norm_of(params_t)}
        student_buffers = dict(student_part.named_buffers())
        for name, b in self.model.named_buffers():
            if name in student_buffers:
                b.copy_(student_buffers[name])

    def state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v.detach().clone()) for k, v in self.model.state_dict().items())

    def load_state_dict(self, state) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(
                f"EMA teacher state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


def _norm_of(tensors) -> torch.Tensor:
    """L2 norm of a list of tensors taken together."""
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(tensors)]))
