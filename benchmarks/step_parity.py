"""Print how far one training step of ours is from Meta's, per quantity (the step fixtures).

    python benchmarks/step_parity.py [--compat ../shared/compat]

For data2vec 2.0 (v2_text, v2_audio, v2_image) and 1.0 (v1_text, v1_audio, v1_image): load
the checkpoint with ``load_pretraining_model`` (the fixture's config overrides), replay the
fixture's batch and mask, backprop, make one EMA step, and print the largest difference to
Meta's numbers as two markdown tables. Padded steps are compared as the tests do (ours never
predicts them: the 2.0 fixtures' non-padded variant; 1.0 masks never cover padding).
v1_text is the fixture's ``full_targets`` case (the teacher sees the clean sentence). The
tests (``tests/test_step_fixtures.py``, ``tests/test_v1_*.py``) assert the tolerances; this
prints the margins.
"""

import argparse
from pathlib import Path

import torch

import d2v_plugin
from d2v_plugin.checkpoints import read_checkpoint
from d2v_plugin.models.architectures import architecture
from d2v_plugin.models.blocks import Block

NAMES = ["v2_text", "v2_audio", "v2_image"]
V1_NAMES = ["v1_text", "v1_audio", "v1_image"]


def measure(compat: Path, name: str):
    step = torch.load(compat / f"{name}.step.pt", weights_only=True)
    overrides = {k: v[1] for k, v in step["config_overrides"].items()}
    model = d2v_plugin.load_pretraining_model(str(compat / f"{name}.checkpoint.pt"), overrides)
    blocks = model.ema.model if model.cfg.ema_encoder_only else model.ema.model.blocks
    captured = []
    hooks = [b.register_forward_hook(lambda m, a, o: captured.append(o)) for b in blocks]
    inp = step["inputs"]
    out = model(source=inp["source"], padding_mask=inp["padding_mask"], precomputed_mask=inp["precomputed_mask"])
    for h in hooks:
        h.remove()
    pad = step["regression"]["masked_is_padding"]
    variant = step.get("variant_regression_on_nonpadded_only")
    loss = sum(v.float().sum() for v in out["losses"].values())
    meta_loss = variant["loss_total"] if variant else step["loss_total"]
    loss.backward()
    meta_grads = variant["grad_norms"] if variant else step["grad_norms"]
    grads = {n: p.grad.double().norm().item() for n, p in model.named_parameters() if p.grad is not None}
    grad_rel = max(abs(grads[n] - v) / max(abs(v), 1e-12) for n, v in meta_grads.items())
    n = 1 if model.modality_encoders[model.mode].modality_cfg.num_extra_tokens else 0
    block = max(
        max((t[:, n:] - step["teacher"]["layer_ffn_outputs"][i]).abs().max().item(),
            (x[:, n:] - step["teacher"]["layer_outputs"][i]).abs().max().item())
        for i, (x, t) in enumerate(captured)
    )
    ema = step["ema_step"]
    prefix = "blocks." if model.cfg.ema_encoder_only else ""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with torch.no_grad():
        for k, v in ema["student_used"].items():
            (params[prefix + k] if prefix + k in params else buffers[prefix + k]).copy_(v)
    model.set_num_updates(ema["num_updates_from_to"][1])
    after = model.ema.model.state_dict()
    ema_diff = max((after[k] - v).abs().max().item() for k, v in ema["teacher_after"].items())
    return {
        "loss (relative)": abs(loss.item() - meta_loss) / abs(meta_loss),
        "sample_size (ours / Meta's)": f"{int(out['sample_size'])} / {step['sample_size']} ({int(pad.sum())} padded)",
        "targets (absolute)": (out["targets"] - step["regression"]["targets"][~pad]).abs().max().item(),
        "predictions (absolute)": (out["predictions"] - step["regression"]["predictions"][~pad]).abs().max().item(),
        "teacher block outputs (absolute)": block,
        "gradient norms (largest relative)": grad_rel,
        "EMA update (absolute)": ema_diff,
    }


def meta_view(arch, template, ours):
    """Our tensors (``ours``, by our names) under Meta's names, found by pushing a marked copy of
    each of Meta's tensors through the architecture's own name table (renames, q/k/v concatenation)."""
    out = {}
    zeros = {k: torch.zeros_like(v, dtype=torch.float64) if torch.is_tensor(v) else v for k, v in template.items()}
    for name, value in template.items():
        if not torch.is_tensor(value) or not value.is_floating_point():
            continue
        probe = dict(zeros, **{name: torch.arange(1, value.numel() + 1, dtype=torch.float64).view(value.shape)})
        for our_name, t in arch.from_meta_state(probe).items():
            if torch.is_tensor(t) and t.max() > 0 and our_name in ours:
                picked = ours[our_name].double().flatten()[(t.flatten() > 0).nonzero().squeeze(1)]
                out[name] = picked[t.flatten()[t.flatten() > 0].long() - 1]
    return out


def measure_v1(compat: Path, name: str):
    step = torch.load(compat / f"{name}.step.pt", weights_only=True)
    case = step["cases"]["full_targets"] if "cases" in step else step
    # Meta's nested text names (transformer.dropout) are our flat fields (dropout)
    overrides = {k.split(".")[-1]: v[1] for k, v in step["config_overrides"].items()}
    path = compat / f"{name}.checkpoint.pt"
    model = d2v_plugin.load_pretraining_model(str(path), overrides)
    ckpt = read_checkpoint(str(path))
    arch = architecture(ckpt["cfg"]["model"]["_name"])
    meta_state = ckpt["model"]
    ema_key = next(k for k in meta_state if k.endswith("_ema"))
    inp = step["inputs"]
    if "unmasked_tokens" in inp:
        kwargs, real = {"source": inp["unmasked_tokens"], "precomputed_mask": inp["target_positions"]}, ~inp["padding_mask"]
    elif "img" in inp:
        kwargs, real = {"source": inp["img"], "precomputed_mask": inp["mask_indices"].flatten(1).bool()}, None
    else:
        kwargs = {"source": inp["source"], "padding_mask": inp["padding_mask"], "precomputed_mask": inp["mask_indices"]}
        real = ~step["mask_info"]["frame_padding_mask"]
    blocks = [m for m in model.ema.model.modules() if isinstance(m, Block)]
    captured = []
    hooks = [b.register_forward_hook(lambda m, a, o: captured.append(o)) for b in blocks]
    out = model(**kwargs)
    for h in hooks:
        h.remove()
    loss = sum(v.float().sum() for v in out["losses"].values())
    loss.backward()
    student = {k: v for k, v in meta_state.items() if k != ema_key}
    grads = meta_view(arch, student, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    grad_rel = max(abs(grads[n].norm().item() - v) / max(abs(v), 1e-12) for n, v in case["grad_norms"].items() if v > 1e-6)
    n_extra = model.num_extra_tokens
    block = 0.0
    for i, (x, t) in enumerate(captured):
        x = x[:, n_extra:]
        keep = real if real is not None else torch.ones(x.shape[:2], dtype=torch.bool)
        block = max(block, (x - case["teacher"]["layer_outputs"][i])[keep].abs().max().item())
        if blocks[i].ffn_targets:  # Meta's FFN output of a layer-scaled block includes gamma_2
            ffn = t[:, n_extra:] if blocks[i].gamma_2 is None else t[:, n_extra:] * blocks[i].gamma_2
            block = max(block, (ffn - case["teacher"]["layer_ffn_outputs"][i])[keep].abs().max().item())
    ema = step["ema_step"]

    def ours_teacher(tensors):  # Meta's teacher names -> ours, through the architecture's table
        return arch.from_meta_state(dict(meta_state, **{ema_key: tensors}))["_ema"]

    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with torch.no_grad():
        for k, v in ours_teacher(ema["student_used"]).items():
            (params["encoder." + k] if "encoder." + k in params else buffers["encoder." + k]).copy_(v)
    model.set_num_updates(ema["num_updates_from_to"][1])
    after = model.ema.model.state_dict()
    ema_diff = max((after[k] - v).abs().max().item() for k, v in ours_teacher(ema["teacher_after"]).items())
    return {
        "loss (relative)": abs(loss.item() - case["loss_total"]) / abs(case["loss_total"]),
        "sample_size (ours / Meta's)": f"{int(out['sample_size'])} / {case['sample_size']}",
        "targets (absolute)": (out["targets"] - case["regression"]["targets"]).abs().max().item(),
        "predictions (absolute)": (out["predictions"] - case["regression"]["predictions"]).abs().max().item(),
        "teacher block outputs (absolute)": block,
        "gradient norms (largest relative)": grad_rel,
        "EMA update (absolute)": ema_diff,
    }


def print_table(rows, names):
    print("| quantity | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for key in rows[names[0]]:
        cells = [rows[n][key] if isinstance(rows[n][key], str) else f"{rows[n][key]:.1e}" for n in names]
        print(f"| {key} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compat", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "compat",
                    help="folder with NAME.checkpoint.pt and NAME.step.pt (default: ../shared/compat beside the repo)")
    args = ap.parse_args()
    torch.manual_seed(0)
    print_table({name: measure(args.compat, name) for name in NAMES}, NAMES)
    print()
    print_table({name: measure_v1(args.compat, name) for name in V1_NAMES}, V1_NAMES)


if __name__ == "__main__":
    main()
