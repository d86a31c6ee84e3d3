"""Crash-safe checkpoint files for fairseq training (installed when the plugin is imported).

fairseq's ``checkpoint_utils.save_checkpoint`` writes the first checkpoint file through
``torch_persistent_save`` (a ``.tmp`` file renamed into place, never fsynced) and then
``PathManager.copy``s it to ``checkpoint_last.pt`` and the other names, in place: a kill or
power loss during that copy leaves a truncated ``checkpoint_last.pt``, and the next start
crashes on it. :func:`install` patches four functions of ``fairseq.checkpoint_utils``:

- ``torch_persistent_save`` and the copies ``save_checkpoint`` makes (a ``PathManager``
  seen only by ``checkpoint_utils``): the data goes to a temporary file in the same
  directory (``.NAME.d2v-tmp-XXXX``), is flushed and fsynced, replaces the target with
  ``os.replace`` (atomic), and the directory is fsynced. A failed write (full disk,
  read-only or unwritable directory) removes the temporary file and raises
  :class:`CheckpointWriteError` naming the file, the reason and the free space; the
  checkpoints already there are untouched. Remote ``PathManager`` paths (``scheme://``) and
  asynchronous writes keep fairseq's own code.
- ``save_checkpoint`` also records the last checkpoint written (:func:`last_good`).
- ``load_checkpoint``: if ``checkpoint_last.pt`` cannot be read, it says so and resumes
  from the newest readable ``checkpoint*.pt`` in the save directory (the update it holds
  is logged), instead of crashing; with none readable, it stops with a message. Stale
  temporary files of interrupted writes are removed first.
- ``verify_checkpoint_directory``: an unusable save directory is an error naming it.

The environment variable ``D2V_TEST_PAUSE_BEFORE_RENAME`` (seconds; tests only) pauses
every write between the fsync and the rename, so a test can kill the process there.
"""

import functools
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Optional, Tuple

import torch

logger = logging.getLogger(__name__)

TMP_MARK = ".d2v-tmp-"
PAUSE_ENV = "D2V_TEST_PAUSE_BEFORE_RENAME"
# what a resumed run may fall back to (crash.pt, written when a NaN stops training, is not one)
FALLBACK_NAMES = re.compile(r"^checkpoint(\d+|_\d+_\d+|_best|\.best_.+)\.pt$")

_last_good: Optional[Tuple[str, Optional[int]]] = None


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the files already in the directory are intact."""


class UnreadableCheckpointError(RuntimeError):
    """No checkpoint in the save directory can be read."""


def last_good() -> Optional[Tuple[str, Optional[int]]]:
    """``(path, update)`` of the checkpoint this process last wrote or resumed from, or None."""
    return _last_good


def _is_local(path: str) -> bool:
    return "://" not in str(path)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(target: str, err: OSError) -> CheckpointWriteError:
    directory = os.path.dirname(os.path.abspath(target))
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free on {directory}"
    except OSError:
        free = f"{directory} is not accessible"
    reason = err.strerror or str(err)
    return CheckpointWriteError(
        err.errno,
        f"cannot write checkpoint {target}: {reason} ({free}). Nothing was replaced: the "
        f"checkpoints already in {directory} are intact. Free disk space or make the directory "
        "writable (checkpoint.save_dir), then rerun the same command to resume from the last of them",
    )


class _RecordingFile:
    """A file whose failed writes are remembered: torch's zip writer turns them into a
    RuntimeError without the OSError (errno, "No space left on device", ...)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _atomic_write(target: str, write) -> None:
    """``write(file)`` into a temporary file beside ``target``, fsync, rename over ``target``."""
    target = os.path.abspath(target)
    directory, name = os.path.split(target)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}{TMP_MARK}", dir=directory)
        with os.fdopen(fd, "wb") as f:
            recording = _RecordingFile(f)
            try:
                write(recording)
            except Exception:
                if recording.error is not None:
                    raise recording.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        pause = float(os.environ.get(PAUSE_ENV, 0) or 0)
        if pause > 0:
            logger.warning(f"{PAUSE_ENV}: {tmp} written, pausing {pause} s before it replaces {target}")
            time.sleep(pause)
        os.replace(tmp, target)
        tmp = None
        _fsync_dir(directory)
    except OSError as e:
        failure = e
    else:
        return
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:  # a read-only directory: the next start removes it
                logger.warning(f"could not remove {tmp}")
    raise _write_error(target, failure) from failure


def atomic_torch_save(obj, filename: str) -> None:
    """``torch.save(obj)`` to ``filename``, all or nothing (see the module docstring)."""
    _atomic_write(filename, lambda f: torch.save(obj, f))


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst``, all or nothing."""

    def write(f):
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 16 * 2**20)

    _atomic_write(dst, write)


def _updates(state) -> Optional[int]:
    history = state.get("optimizer_history") if isinstance(state, dict) else None
    return history[-1].get("num_updates") if history else None


def _load_lazily(path: str):
    """The checkpoint's structure (zip directory, pickle), its tensors memory-mapped, not read."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as a checkpoint (truncated, not a zip, bad pickle), or None.
    Cheap: the tensor data is memory-mapped, not read."""
    try:
        state = _load_lazily(path)
    except Exception as e:  # truncated zip, bad pickle, ...: torch raises many types
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not isinstance(state, dict) or "model" not in state:
        return "not a fairseq checkpoint (no 'model' entry)"
    return None


def newest_readable(save_dir: str, exclude: str) -> Optional[Tuple[str, int]]:
    """The most recently written readable checkpoint of ``save_dir`` other than ``exclude``,
    with its update count; unreadable ones are logged and passed over."""
    names = [n for n in os.listdir(save_dir) if FALLBACK_NAMES.match(n)]
    paths = [os.path.join(save_dir, n) for n in names if os.path.join(save_dir, n) != os.path.abspath(exclude)]
    for path in sorted(paths, key=os.path.getmtime, reverse=True):
        problem = read_problem(path)
        if problem is None:
            return path, _updates(_load_lazily(path))
        logger.warning(f"{path} is unreadable too ({problem})")
    return None


def remove_stale_temporaries(save_dir: str) -> None:
    if not os.path.isdir(save_dir):
        return
    for name in os.listdir(save_dir):
        if TMP_MARK in name and name.startswith("."):
            try:
                os.remove(os.path.join(save_dir, name))
            except FileNotFoundError:  # another rank removed it first
                continue
            logger.info(f"removed {name} in {save_dir}: the temporary file of an interrupted checkpoint write")


def install() -> None:
    """Patch ``fairseq.checkpoint_utils`` (once); see the module docstring."""
    from fairseq import checkpoint_utils as cu
    from fairseq.file_io import PathManager

    if getattr(cu, "_d2v_checkpoint_io", False):
        return
    cu._d2v_checkpoint_io = True
    original_save = cu.torch_persistent_save
    original_save_checkpoint = cu.save_checkpoint
    original_load_checkpoint = cu.load_checkpoint
    original_verify = cu.verify_checkpoint_directory

    def torch_persistent_save(obj, filename, async_write: bool = False):
        if async_write or not _is_local(filename):
            return original_save(obj, filename, async_write=async_write)
        atomic_torch_save(obj, filename)

    class CheckpointPathManager(PathManager):
        """fairseq's PathManager with atomic local copies (used by checkpoint_utils only)."""

        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if not (_is_local(src_path) and _is_local(dst_path)):
                return PathManager.copy(src_path, dst_path, overwrite)
            if os.path.exists(dst_path) and not overwrite:
                return False
            atomic_copy(src_path, dst_path)
            return True

    @functools.wraps(original_save_checkpoint)
    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        global _last_good
        saved = original_save_checkpoint(cfg, trainer, epoch_itr, val_loss)
        if saved is not None:
            last = os.path.join(cfg.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt")
            _last_good = (os.path.abspath(last) if os.path.exists(last) else saved, trainer.get_num_updates())
        return saved

    @functools.wraps(original_load_checkpoint)
    def load_checkpoint(cfg, trainer, **passthrough_args):
        global _last_good
        remove_stale_temporaries(cfg.save_dir)
        last = os.path.join(cfg.save_dir, f"checkpoint_last{trainer.checkpoint_suffix}.pt")
        fallback = None
        if cfg.restore_file == "checkpoint_last.pt" and os.path.exists(last):
            problem = read_problem(last)
            if problem is not None:
                found = newest_readable(cfg.save_dir, exclude=last)
                if found is None:
                    raise UnreadableCheckpointError(
                        f"{last} cannot be read ({problem}) and no other checkpoint in {cfg.save_dir} can. "
                        "Move the directory away to start over, or set checkpoint.restore_file"
                    )
                fallback = found[0]
                logger.warning(
                    f"{last} cannot be read ({problem}); resuming from the newest readable checkpoint "
                    f"{fallback} (update {found[1]})"
                )
        if fallback is None:
            result = original_load_checkpoint(cfg, trainer, **passthrough_args)
        else:
            saved = cfg.restore_file, cfg.finetune_from_model
            cfg.restore_file, cfg.finetune_from_model = fallback, None  # a last checkpoint existed
            try:
                result = original_load_checkpoint(cfg, trainer, **passthrough_args)
            finally:
                cfg.restore_file, cfg.finetune_from_model = saved
        loaded = fallback or (last if cfg.restore_file == "checkpoint_last.pt" else cfg.restore_file)
        if result[0] is not None and os.path.exists(loaded):  # extra_state: a checkpoint was loaded
            _last_good = (os.path.abspath(loaded), trainer.get_num_updates())
        return result

    @functools.wraps(original_verify)
    def verify_checkpoint_directory(save_dir: str) -> None:
        try:
            original_verify(save_dir)
        except OSError as e:
            raise CheckpointWriteError(
                e.errno, f"checkpoint.save_dir={save_dir} cannot hold checkpoints: {e.strerror or e}"
            ) from e

    cu.torch_persistent_save = torch_persistent_save
    cu.PathManager = CheckpointPathManager
    cu.save_checkpoint = save_checkpoint
    cu.load_checkpoint = load_checkpoint
    cu.verify_checkpoint_directory = verify_checkpoint_directory
