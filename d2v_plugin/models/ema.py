"""The EMA teacher: a frozen copy of (part of) the student, updated as a moving average."""

import copy
from collections import OrderedDict
from typing import Callable, Dict, Optional

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

    def __init__(self, student_part: nn.Module, decay: float, copied: Optional[Callable[[str], bool]] = None):
        self.model = copy.deepcopy(student_part)
        # copied(name) -> True: that parameter is copied from the student at every step
        # instead of averaged (data2vec 1.0 text copies its embeddings, speech its pos_conv)
        self.copied = copied
        self.model.requires_grad_(False)
        self.model.eval()
        self.model.float()
        self.decay = decay
        self.logs = {}
        # fp32 master weights while the teacher module runs in a lower precision (set_dtype)
        self.master: Optional[Dict[str, torch.Tensor]] = None

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def to(self, device) -> None:
        self.model.to(device=device)
        if self.master is not None:
            self.master = {k: v.to(device) for k, v in self.master.items()}

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Run the teacher in ``dtype`` (``ema_same_dtype``); averaging stays in fp32 master weights."""
        if dtype == self.dtype:
            return
        if dtype != torch.float32 and self.master is None:
            self.master = {k: p.detach().float().clone() for k, p in self.model.named_parameters()}
        if dtype == torch.float32 and self.master is not None:
            self._write_master()
            self.master = None
        self.model.to(dtype=dtype)

    def _write_master(self) -> None:
        for name, p in self.model.named_parameters():
            p.copy_(self.master[name])

    @torch.no_grad()
    def step(self, student_part: nn.Module) -> None:
        """teacher <- decay * teacher + (1 - decay) * student, parameter by parameter.

        Parameters the student does not train (``requires_grad=False``), those ``copied``
        names, and buffers are copied, not averaged (Meta's ``EMAModule`` and its ``skip_keys``). Every teacher tensor must have a
        student tensor of the same name and shape: a silent partial update (names changed
        by FSDP flattening or a ``torch.compile`` wrapper) would freeze the teacher.
        """
        student = dict(student_part.named_parameters())
        student_buffers = dict(student_part.named_buffers())
        averaged_t, averaged_s = [], []
        for kind, own, other in (("parameter", self.model.named_parameters(), student), ("buffer", self.model.named_buffers(), student_buffers)):
            for name, t in own:
                s = other.get(name)
                if s is None or s.shape != t.shape:
                    found = "missing" if s is None else f"shape {tuple(s.shape)} vs {tuple(t.shape)}"
                    raise RuntimeError(
                        f"EMA teacher {kind} {name!r} has no matching student {kind} ({found}); the student's names "
                        f"start with {list(other)[:3]}. Wrapping or flattening the student (FSDP, torch.compile) "
                        "changes its names: give the teacher the unwrapped module."
                    )
                if kind == "parameter" and self.master is not None:
                    t = self.master[name]
                if kind == "parameter" and s.requires_grad and not (self.copied is not None and self.copied(name)):
                    averaged_t.append(t)
                    averaged_s.append(s.detach().to(device=t.device, dtype=t.dtype))
                else:
                    t.copy_(s)
        if averaged_t:
            # decay * t + (1 - decay) * s, in this order of operations (Meta's EMAModule: bit-identical)
            torch._foreach_mul_(averaged_t, self.decay)
            torch._foreach_add_(averaged_t, averaged_s, alpha=1.0 - self.decay)
            self.logs = {"model_norm": _norm_of(averaged_s), "ema_norm": _norm_of(averaged_t)}
        if self.master is not None:
            self._write_master()

    def state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The teacher's weights (fp32 masters when it runs in lower precision)."""
        state = OrderedDict((k, v.detach().clone()) for k, v in self.model.state_dict().items())
        if self.master is not None:
            state.update((k, v.clone()) for k, v in self.master.items())
        return state

    def load_state_dict(self, state) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise KeyError(
                f"EMA teacher state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        if self.master is not None:
            self.master = {k: state[k].detach().float().clone().to(v.device) for k, v in self.master.items()}


def _norm_of(tensors) -> torch.Tensor:
    """L2 norm of a list of tensors taken together."""
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(tensors)]))
