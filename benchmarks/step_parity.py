"""Print how far one training step of ours is from Meta's, per quantity (the step fixtures).

    python benchmarks/step_parity.py [--compat ../shared/compat]

For v2_text, v2_audio and v2_image: load the checkpoint with ``load_pretraining_model``
(the fixture's config overrides), replay the fixture's batch and mask, backprop, make one
EMA step, and print the largest difference to Meta's numbers as a markdown table. Padded
steps are compared as ``tests/test_step_fixtures.py`` does (ours never predicts them: the
fixture's non-padded variant). The test asserts the tolerances; this prints the margins.
"""

import argparse
from pathlib import Path

import torch

import d2v_plugin

NAMES = ["v2_text", "v2_audio", "v2_image"]


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compat", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "compat",
                    help="folder with NAME.checkpoint.pt and NAME.step.pt (default: ../shared/compat beside the repo)")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = {name: measure(args.compat, name) for name in NAMES}
    print("| quantity | " + " | ".join(NAMES) + " |")
    print("| --- |" + " --- |" * len(NAMES))
    for key in rows[NAMES[0]]:
        cells = [rows[n][key] if isinstance(rows[n][key], str) else f"{rows[n][key]:.1e}" for n in NAMES]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
