"""A training run that must stop (NaN / inf, representation collapse) says where it stands.

fairseq stops a run when the gradients are NaN or inf in fp32 and bf16 (``FloatingPointError:
gradients are Nan/Inf`` from ``Trainer.train_step``, after writing ``crash.pt`` and rerunning
the step under its ``NanDetector``), and in fp16 when its loss scaler reaches
``common.min_loss_scale`` (an overflow that persists; single overflows only lower the scale and
skip the update, as usual). Our models stop on a representation collapse
(:class:`d2v_plugin.models.loss.RepresentationCollapse`). In each case the exception leaves
``Trainer.train_step`` before any checkpoint of the bad model is written, so the last
checkpoint stays good.

:func:`install` wraps ``Trainer.train_step`` so that the message of these exceptions
names the update that failed, the loss terms and statistics of that update (recorded by the
``data2vec`` criterion as ``last_log``) and the last good checkpoint
(:func:`d2v_plugin.checkpoint_io.last_good`), which the same command resumes from.
"""

import functools
import logging

from .checkpoint_io import last_good
from .models.loss import RepresentationCollapse

logger = logging.getLogger(__name__)

STOPS = (FloatingPointError, RepresentationCollapse)


def stop_message(err: Exception, update: int, log, checkpoint, save_dir: str) -> str:
    """The full message of a stopped run (see the module docstring)."""
    what = "representation collapse" if isinstance(err, RepresentationCollapse) else "NaN or inf"
    lines = [f"training stopped at update {update} ({what}): {err}"]
    if log:
        values = ", ".join(f"{k}={v:.6g}" for k, v in log.items())
        lines.append(f"  loss terms and statistics of update {update}: {values}")
    if checkpoint is not None:
        path, ckpt_update = checkpoint
        lines.append(
            f"  last good checkpoint: {path} (update {ckpt_update}); it is kept (the model of update "
            f"{update} was not saved) and rerunning the same command resumes from it"
        )
    else:
        lines.append(f"  no checkpoint has been written by this run yet (checkpoint.save_dir={save_dir})")
    return "\n".join(lines)


def install() -> None:
    """Wrap ``fairseq.trainer.Trainer.train_step`` (once)."""
    from fairseq.trainer import Trainer

    original = Trainer.train_step
    if getattr(original, "_d2v_stop_message", False):
        return

    @functools.wraps(original)
    def train_step(self, samples, raise_oom=False):
        try:
            return original(self, samples, raise_oom)
        except STOPS as err:
            if getattr(err, "_d2v_stop_message", False):  # already completed (AMP's retry recursion)
                raise
            update = self.get_num_updates() + 1
            log = getattr(self.criterion, "last_log", None)
            message = stop_message(err, update, log, last_good(), self.cfg.checkpoint.save_dir)
            logger.error(message)
            completed = type(err)(message)
            completed._d2v_stop_message = True
            raise completed from err

    train_step._d2v_stop_message = True
    Trainer.train_step = train_step
