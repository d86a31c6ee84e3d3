"""The EMA-teacher life cycle shared by every data2vec model (1.0 and 2.0).

A model mixes in :class:`TeacherMixin` and defines ``_teacher_source()`` (the part of the
student the teacher averages); it may override ``_make_teacher`` and ``ema_copied``.
The mixin owns when the teacher steps, how it is saved (``_ema`` in the state dict, the
format of Meta's checkpoints) and how it is restored.
"""

import logging

import torch
import torch.nn as nn

from .ema import EMATeacher, annealed_decay
from .loss import check_collapse, feature_std

logger = logging.getLogger(__name__)


class TeacherMixin:
    """Needs ``self.cfg.ema_decay``, ``ema_end_decay`` and ``ema_anneal_end_step``."""

    def _init_teacher(self, skip_ema: bool) -> None:
        self.num_updates = 0
        self.ema_updates = 0  # the last update whose student the teacher has folded in
        self.ema = None
        self._teacher_from_loaded_student = False
        if not skip_ema:
            self.ema = self._make_teacher(self.cfg.ema_decay)

    def _teacher_source(self) -> nn.Module:
        raise NotImplementedError

    def ema_copied(self, name: str) -> bool:
        """Teacher parameters (names relative to the teacher) copied from the student at every
        step instead of averaged. Parameters the student does not train are always copied."""
        return False

    def _make_teacher(self, decay: float) -> EMATeacher:
        """A teacher copied from the student's current weights."""
        self.ema = None  # the copy of the student must not include an old teacher
        return EMATeacher(self._teacher_source(), decay, copied=self.ema_copied)

    def set_num_updates(self, num_updates):
        """fairseq calls this before each training step with the number of finished updates.

        The teacher folds in the student of update ``num_updates`` at this point, once per
        update. A checkpoint saved after update n therefore holds a teacher that has seen
        the students up to n - 1; :meth:`_load_from_state_dict` restores that count so a
        resumed run makes exactly the EMA steps an uninterrupted run makes.
        """
        super().set_num_updates(num_updates)
        if self.ema is not None:
            cfg = self.cfg
            self.ema.decay = annealed_decay(cfg.ema_decay, cfg.ema_end_decay, num_updates, cfg.ema_anneal_end_step)
            if self.training and num_updates > self.ema_updates:
                if self.ema.decay < 1:
                    self.ema.step(self._teacher_source())
                self.ema_updates = num_updates
        self.num_updates = num_updates

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        state = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.ema is not None:
            state[prefix + "_ema"] = self.ema.state_dict()
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        ema_state = state_dict.pop(prefix + "_ema", None)
        if self.ema is not None:
            if ema_state is None:
                # the children load after this hook: the teacher is rebuilt in load_state_dict
                self._teacher_from_loaded_student = True
            else:
                self.ema.load_state_dict(ema_state)
            # fairseq sets num_updates before loading: the saved teacher has seen students < n
            self.ema_updates = max(self.num_updates - 1, 0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        result = super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
        if self._teacher_from_loaded_student:
            self._teacher_from_loaded_student = False
            logger.warning("checkpoint has no EMA teacher (_ema); the teacher starts from the loaded student")
            self.ema = self._make_teacher(self.ema.decay)
        return result

    def teacher_dtype(self, student_dtype: torch.dtype) -> torch.dtype:
        """The dtype the teacher runs in: the student's (``ema_same_dtype``), else fp32."""
        return student_dtype if self.cfg.ema_same_dtype and student_dtype.is_floating_point else torch.float32

    @torch.no_grad()
    def add_step_statistics(self, result, local_features=None) -> None:
        """Add what every data2vec step logs to ``result`` (which holds ``predictions`` and
        ``targets``): ``pred_var``, ``target_var``, ``local_var`` (of ``local_features``, the
        modality encoder's output at the real steps, (N, C); fairseq #5239), ``ema_decay``,
        the EMA norms; then stop on a representation collapse (``min_target_var`` /
        ``min_pred_var`` / ``min_local_var``)."""
        result["pred_var"] = feature_std(result["predictions"])
        result["target_var"] = feature_std(result["targets"])
        if local_features is not None:
            result["local_var"] = feature_std(local_features)
        result["ema_decay"] = self.ema.decay
        if self.cfg.log_norms:
            result.update(self.ema.logs)
        check_collapse(result, self.cfg, self.num_updates)
