"""Run under ``torchrun --nproc-per-node 2``: tiny speech models (data2vec 2.0 ``layerdrop``, 1.0
``encoder_layerdrop``) train a few steps wrapped in PyTorch's DistributedDataParallel, as
``distributed_training.ddp_backend=c10d`` wraps them (without find_unused_parameters), on the
CPU with gloo. Prints ``skipped blocks: N`` per model and exits 0 when every step ran; a
parameter left out of a step's graph makes DDP fail on the next step instead."""

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from d2v_plugin.checkpoints import model_config
from d2v_plugin.models.blocks import Block
from d2v_plugin.models.data2vec2 import Data2VecMultiConfig, Data2VecMultiModel
from d2v_plugin.models.v1.audio import Data2VecAudioConfig, Data2VecAudioModel

SPEC = "[(16, 10, 5)] + [(16, 3, 2)] * 2"


def v2():
    cfg = model_config({"supported_modality": "AUDIO", "depth": 3, "embed_dim": 32, "num_heads": 2, "layerdrop": 0.5,
                        "average_top_k_layers": 3, "max_update": 10, "clone_batch": 1,
                        "modalities": {"audio": {"feature_encoder_spec": SPEC, "conv_pos_depth": 1, "conv_pos_width": 4,
                                                 "conv_pos_groups": 2, "prenet_depth": 0, "mask_prob": 0.5, "mask_length": 2,
                                                 "decoder": {"decoder_dim": 16, "decoder_groups": 2, "decoder_layers": 1}}}},
                       Data2VecMultiConfig)
    return Data2VecMultiModel(cfg)


def v1():
    cfg = Data2VecAudioConfig(encoder_layers=3, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
                              conv_feature_layers=SPEC, conv_pos=4, conv_pos_groups=2, encoder_layerdrop=0.5,
                              average_top_k_layers=3, mask_prob=0.5, mask_length=2, ema_anneal_end_step=10, seed=1)
    return Data2VecAudioModel(cfg)


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for build in (v2, v1):
        torch.manual_seed(0)
        np.random.seed(rank)  # ranks drop different blocks, as they may in a real run
        model = build()
        model.train()
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        runs = []
        blocks = [m for n, m in model.named_modules() if isinstance(m, Block) and not n.startswith("ema.")]
        for blk in blocks:
            blk.register_forward_hook(lambda *_: runs.append(1))
        for step in range(6):
            torch.manual_seed(100 * rank + step)
            out = ddp(torch.randn(2, 4000), id=torch.arange(2) + 2 * rank)
            sum(v.sum() for v in out["losses"].values()).backward()
            opt.step()
            opt.zero_grad()
            model.set_num_updates(step + 1)
        print(f"rank {rank} {build.__name__}: skipped blocks: {6 * len(blocks) - len(runs)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
