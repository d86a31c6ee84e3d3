#!/usr/bin/env python
"""``fairseq-hydra-train`` for the distributed tests, with one addition: every rank also
writes its own model state (student and EMA teacher) next to each checkpoint, as
``SAVE_DIR/rank<R>_update<N>.pt``. fairseq itself saves on rank 0 only; the per-rank files
let a test check that every rank holds the same teacher.

Run it like fairseq-hydra-train: ``torchrun --nproc-per-node 2 distributed_child.py --config-dir ...``.
"""

import os
import sys

import torch
from fairseq import checkpoint_utils
from fairseq_cli import hydra_train

_save_checkpoint = checkpoint_utils.save_checkpoint


def save_checkpoint_and_rank_state(cfg, trainer, epoch_itr, val_loss):
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    os.makedirs(cfg.save_dir, exist_ok=True)
    state = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in trainer.get_model().state_dict().items()}
    torch.save(state, os.path.join(cfg.save_dir, f"rank{rank}_update{trainer.get_num_updates()}.pt"))
    return _save_checkpoint(cfg, trainer, epoch_itr, val_loss)


checkpoint_utils.save_checkpoint = save_checkpoint_and_rank_state

if __name__ == "__main__":
    sys.exit(hydra_train.cli_main())
