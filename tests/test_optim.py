"""``d2v_adamw`` takes the same steps as fairseq's ``adam``: alone, inside fairseq's composite
optimizer and under fairseq's bf16 wrapper (built by the same fairseq functions the trainer
calls), and across a checkpoint in either direction."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

import d2v_plugin  # noqa: F401  (registers d2v_adamw)
from fairseq import optim
from fairseq.dataclass.configs import FairseqConfig

ADAM = {"adam_betas": [0.9, 0.98], "adam_eps": 1e-6, "weight_decay": 0.01}


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def optimizer_cfg(name, **extra):
    return OmegaConf.create({"_name": name, **ADAM, "lr": [1e-2], "tpu": False, **extra})


def composite_cfg(name):
    """Meta's 2.0 recipes: a composite optimizer with parameter groups, here with their own lr / decay
    (inside a root config: the groups' optimizers read common.tpu and optimization.lr from it)."""
    group = lambda lr, wd: {"lr_float": lr, "optimizer": {"_name": name, **ADAM, "weight_decay": wd}, "lr_scheduler": {"_name": "fixed"}}
    composite = {"_name": "composite", "groups": {"default": group(1e-2, 0.01), "decoder": group(3e-2, 0.0)}, "dynamic_groups": False}
    return OmegaConf.create({"common": {"tpu": False}, "optimization": {"lr": [1e-2]}, "optimizer": composite}).optimizer


def train(model, opt, steps, seed=0, skip_first_layer_every=3):
    """``steps`` updates on random data; every few updates the first layer gets no gradient
    (as a block skipped by layerdrop), so parameters' step counts differ."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        opt.zero_grad()
        dtype = next(model.parameters()).dtype
        loss = model(torch.randn(5, 8, generator=g).to(dtype)).float().pow(2).mean()
        opt.backward(loss) if hasattr(opt, "backward") else loss.backward()
        if skip_first_layer_every and step % skip_first_layer_every == 1:
            for p in model[0].parameters():
                p.grad = None
        opt.step()


def assert_same_params(a, b, atol=1e-6):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.float(), pb.float(), rtol=0, atol=atol), f"{name}: max diff {(pa - pb).abs().max():.3g}"


def test_same_update_as_fairseq_adam_and_checkpoints_interchange():
    ref, ours = tiny_model(), tiny_model()
    opt_ref = optim.build_optimizer(optimizer_cfg("adam"), list(ref.parameters()))
    opt_ours = optim.build_optimizer(optimizer_cfg("d2v_adamw"), list(ours.parameters()))
    assert opt_ours.impl == "foreach"  # CPU
    train(ref, opt_ref, 12)
    train(ours, opt_ours, 12)
    assert_same_params(ref, ours)
    moved = [float((p - q).detach().abs().max()) for p, q in zip(ref.parameters(), tiny_model().parameters())]
    assert min(moved) > 1e-3  # the comparison is not vacuous: every tensor has moved

    # fairseq adam's optimizer state continues under d2v_adamw (and back), step for step
    resumed = copy.deepcopy(ref)
    opt_resumed = optim.build_optimizer(optimizer_cfg("d2v_adamw"), list(resumed.parameters()))
    opt_resumed.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # as read from a checkpoint
    back = copy.deepcopy(ours)
    opt_back = optim.build_optimizer(optimizer_cfg("adam"), list(back.parameters()))
    opt_back.load_state_dict(copy.deepcopy(opt_ours.state_dict()))
    for m, o in ((ref, opt_ref), (resumed, opt_resumed), (back, opt_back)):
        train(m, o, 6, seed=1)
    assert_same_params(ref, resumed)
    assert_same_params(ref, back)


def test_same_update_inside_fairseq_composite_optimizer():
    models = []
    for name in ("adam", "d2v_adamw"):  # one at a time: fairseq's composite keeps its optimizers in a class attribute
        m = tiny_model()
        for p in m[3].parameters():
            p.param_group = "decoder"
        opt = optim.build_optimizer(composite_cfg(name), list(m.parameters()))
        assert type(opt.optimizers["decoder"]).__name__ == {"adam": "FairseqAdam", "d2v_adamw": "D2vAdamW"}[name]
        train(m, opt, 10)
        models.append(m)
    assert_same_params(*models)


def test_same_update_under_fairseqs_bf16_wrapper():
    """fairseq's FP16Optimizer (what ``common.bf16=true`` builds): fp32 master weights stepped
    by the inner optimizer, copied back to the bf16 model."""
    models, opts = [], []
    for name in ("adam", "d2v_adamw"):
        cfg = OmegaConf.structured(FairseqConfig)
        cfg.common.bf16, cfg.common.cpu = True, True
        cfg.optimization.lr = [1e-2]
        cfg.optimizer = optimizer_cfg(name)
        m = tiny_model().to(torch.bfloat16)
        models.append(m)
        opts.append(optim.FP16Optimizer.build_optimizer(cfg, list(m.parameters())))
    for m, o in zip(models, opts):
        train(m, o, 8)
    assert_same_params(*models, atol=0)  # the same fp32 steps rounded to the same bf16 values


def test_fused_kernels_are_refused_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error; on a GPU torch_fused runs")
    with pytest.raises(ValueError, match="impl=torch_fused needs every parameter on a CUDA device"):
        optim.build_optimizer(optimizer_cfg("d2v_adamw", impl="torch_fused"), list(tiny_model().parameters()))
    with pytest.raises(ValueError, match="impl=apex needs NVIDIA apex"):
        optim.build_optimizer(optimizer_cfg("d2v_adamw", impl="apex"), list(tiny_model().parameters()))
