"""``model.activation_checkpointing``: the blocks recompute their activations in the backward
pass (so each block's attention runs twice per training step) and the gradients are those of
the plain run, dropout included (data2vec 2.0 and 1.0)."""

import pytest
import torch

from d2v_plugin.checkpoints import VocabularyInfo, model_config
from d2v_plugin.models.data2vec2 import Data2VecMultiConfig, Data2VecMultiModel
from d2v_plugin.models.v1.text import Data2VecTextConfig, Data2VecTextModel


def v2_image(checkpointing: bool):
    image = {"input_size": 16, "patch_size": 4, "embed_dim": 32, "prenet_depth": 1, "num_extra_tokens": 1,
             "mask_prob": 0.6, "mask_length": 2, "inverse_mask": True, "ema_local_encoder": True,
             "decoder": {"decoder_dim": 16, "decoder_groups": 1, "decoder_kernel": 3, "decoder_layers": 1}}
    cfg = model_config({"supported_modality": "IMAGE", "depth": 2, "embed_dim": 32, "num_heads": 2,
                        "average_top_k_layers": 2, "clone_batch": 2, "cls_loss": 0.01, "ema_encoder_only": False,
                        "encoder_dropout": 0.1, "attention_dropout": 0.1, "post_mlp_drop": 0.1,
                        "activation_checkpointing": checkpointing, "modalities": {"image": image}, "max_update": 10},
                       Data2VecMultiConfig)
    return Data2VecMultiModel(cfg), torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def v1_text(checkpointing: bool):
    cfg = Data2VecTextConfig(embed_dim=16, ffn_embed_dim=32, layers=2, attention_heads=2, max_positions=64, seed=1,
                             ema_anneal_end_step=10, dropout=0.1, attention_dropout=0.1,
                             activation_checkpointing=checkpointing)
    model = Data2VecTextModel(cfg, task=type("T", (), {"source_dictionary": VocabularyInfo(60)})())
    tokens = torch.randint(4, 59, (4, 20), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = 0
    return model, tokens


def step(build, checkpointing: bool):
    """Gradients of one training forward/backward, and how often the blocks' attention ran."""
    torch.manual_seed(0)
    model, source = build(checkpointing)
    model.train()
    calls = []
    for name, module in model.named_modules():
        if (name.endswith(".attn") or name.endswith(".self_attn")) and not name.startswith("ema."):
            module.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(1)  # dropout
    out = model(source, id=torch.arange(source.size(0)))
    loss = sum(v.sum() for v in out["losses"].values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(calls)


@pytest.mark.parametrize("build", [v2_image, v1_text], ids=["data2vec2_image", "data2vec1_text"])
def test_same_gradients_with_recomputation(build):
    loss0, grads0, calls0 = step(build, False)
    loss1, grads1, calls1 = step(build, True)
    assert calls0 > 0 and calls1 == 2 * calls0, "activation checkpointing did not recompute the blocks"
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads1.keys() == grads0.keys() and len(grads0) > 10
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-6, atol=1e-7, msg=f"gradient of {name}")
