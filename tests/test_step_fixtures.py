"""One training step of ours against one training step of Meta's code (``../shared/compat/*.step.pt``).

Each fixture holds a checkpoint's student and teacher, a batch and a mask, and everything
Meta's data2vec_multi computed from them: losses, sample_size, logged values, targets,
predictions, the teacher's per-block outputs, every gradient norm and one EMA update
(``STEPS.md`` beside them). Tolerances are STEPS.md's for an independent implementation.

Padding: Meta's masks may cover padded steps and Meta's loss counts them; ours never
predicts a padded step, so the loss, sample_size, variances and gradients are compared
with the fixture's non-padded variant (``variant_regression_on_nonpadded_only``) and with
the fixture's tensors at the non-padded masked rows.
"""

import math

import pytest
import torch

import d2v_plugin
from helpers import compat_dir

V2 = ["v2_text", "v2_audio", "v2_image"]
EXTRA_TOKENS = {"v2_text": 0, "v2_audio": 0, "v2_image": 1}


def fixture(name):
    return torch.load(compat_dir() / f"{name}.step.pt", weights_only=True)


def load_model(name, step, overrides=None):
    if overrides is None:
        overrides = {k: v[1] for k, v in step["config_overrides"].items()}
    return d2v_plugin.load_pretraining_model(str(compat_dir() / f"{name}.checkpoint.pt"), overrides)


def teacher_blocks(model):
    return model.ema.model if model.cfg.ema_encoder_only else model.ema.model.blocks


def run_step(model, step):
    """Forward with the fixture's inputs; returns (output, teacher block outputs [(x, target)])."""
    captured = []
    hooks = [b.register_forward_hook(lambda mod, args, out: captured.append(out)) for b in teacher_blocks(model)]
    inp = step["inputs"]
    try:
        out = model(source=inp["source"], padding_mask=inp["padding_mask"], precomputed_mask=inp["precomputed_mask"])
    finally:
        for h in hooks:
            h.remove()
    return out, captured


def feature_std(y):
    """STEPS.md's target_var / pred_var formula."""
    return torch.sqrt(y.reshape(-1, y.size(-1)).var(dim=0) + 1e-6).mean().item()


def expected(step):
    """What our step must give: Meta's numbers, restricted to non-padded predicted steps."""
    pad = step["regression"]["masked_is_padding"]
    variant = step.get("variant_regression_on_nonpadded_only")
    return {
        "pad": pad,
        "loss_total": variant["loss_total"] if variant else step["loss_total"],
        "grad_norms": variant["grad_norms"] if variant else step["grad_norms"],
        "sample_size": step["sample_size"] - int(pad.sum()),
        "targets": step["regression"]["targets"][~pad],
        "predictions": step["regression"]["predictions"][~pad],
        "per_position_loss": step["regression"]["per_position_loss"][~pad],
    }


@pytest.fixture(scope="module", params=V2)
def step_run(request):
    name = request.param
    step = fixture(name)
    torch.manual_seed(0)
    model = load_model(name, step)
    out, captured = run_step(model, step)
    loss = sum(v.float().sum() for v in out["losses"].values())
    loss.backward()
    return name, step, model, out, captured


def test_losses_and_sample_size(step_run):
    name, step, model, out, _ = step_run
    exp = expected(step)
    assert int(out["sample_size"]) == exp["sample_size"]
    ours = {k: v.float().sum().item() for k, v in out["losses"].items()}
    meta = dict(step["losses"])
    if step.get("variant_regression_on_nonpadded_only"):
        meta[step["regression"]["loss_name"]] = step["variant_regression_on_nonpadded_only"]["regression_loss_nonpadded"]
    assert set(ours) == set(meta), "loss names are Meta's (TEXT_regression, cls, ...)"
    for k, v in meta.items():
        assert ours[k] == pytest.approx(v, rel=1e-5), k
    assert sum(ours.values()) == pytest.approx(exp["loss_total"], rel=1e-5)
    reg = out["losses"][step["regression"]["loss_name"]]
    torch.testing.assert_close(reg, exp["per_position_loss"], rtol=0, atol=1e-5)


def test_logged_values(step_run):
    name, step, model, out, _ = step_run
    exp = expected(step)
    assert out["masked_pct"] == step["logged"]["masked_pct"]
    assert out["target_var"].item() == pytest.approx(feature_std(exp["targets"]), rel=1e-5)
    assert out["pred_var"].item() == pytest.approx(feature_std(exp["predictions"]), rel=1e-5)
    if not exp["pad"].any():  # no padding: Meta's logged numbers themselves
        assert out["target_var"].item() == pytest.approx(step["logged"]["target_var"], rel=1e-5)
        assert out["pred_var"].item() == pytest.approx(step["logged"]["pred_var"], rel=1e-5)
    # Meta logs the initial decay right after a load (STEPS.md, Surprises 12), we the annealed one
    assert out["ema_decay"] * 1000 == pytest.approx(step["logged"]["ema_decay"], rel=1e-6)


def test_targets_predictions_and_teacher_blocks(step_run):
    name, step, model, out, captured = step_run
    exp = expected(step)
    torch.testing.assert_close(out["targets"], exp["targets"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["predictions"].detach(), exp["predictions"], rtol=0, atol=1e-5)
    n = EXTRA_TOKENS[name]
    assert len(captured) == len(step["teacher"]["layer_outputs"])
    for i, (x, t) in enumerate(captured):
        torch.testing.assert_close(t[:, n:], step["teacher"]["layer_ffn_outputs"][i], rtol=0, atol=1e-5, msg=f"block {i} FFN output")
        torch.testing.assert_close(x[:, n:], step["teacher"]["layer_outputs"][i], rtol=0, atol=1e-5, msg=f"block {i} output")
    # the full (B, T, C) targets, padded steps included, through the clone/mask indexing
    mask = step["inputs"]["precomputed_mask"].bool()
    clone = step["clone_batch"]
    full = step["teacher"]["targets_full"].repeat_interleave(clone, 0)[mask]
    torch.testing.assert_close(out["targets"], full[~exp["pad"]], rtol=0, atol=1e-5)


def test_gradient_norms(step_run):
    name, step, model, out, _ = step_run
    exp = expected(step)
    ours = {n: p.grad.double().norm().item() for n, p in model.named_parameters() if p.grad is not None}
    without = sorted(n for n, p in model.named_parameters() if p.grad is None)
    # Meta keeps image positions as a frozen parameter, we as a buffer
    meta_without = sorted(n for n in step["params_without_grad"] if n in dict(model.named_parameters()))
    assert without == meta_without
    assert set(ours) == set(exp["grad_norms"])
    bad = {n: (ours[n], v) for n, v in exp["grad_norms"].items() if not math.isclose(ours[n], v, rel_tol=1e-4, abs_tol=1e-9)}
    assert not bad, f"gradient norms differ from Meta's: {bad}"


def test_ema_update(step_run):
    name, step, model, out, _ = step_run
    ema = step["ema_step"]
    first, second = ema["num_updates_from_to"]
    teacher = model.ema.model
    before = teacher.state_dict()
    for k, v in ema["teacher_before"].items():
        torch.testing.assert_close(before[k], v, rtol=0, atol=0, msg=f"teacher {k} is the checkpoint's _ema")
    # the student the EMA reads: the fixture's (checkpoint after a pretend SGD step)
    prefix = "blocks." if model.cfg.ema_encoder_only else ""
    student = dict(model.named_parameters())
    student_buffers = dict(model.named_buffers())
    with torch.no_grad():
        for k, v in ema["student_used"].items():
            (student.get(prefix + k) if prefix + k in student else student_buffers[prefix + k]).copy_(v)
    assert model.num_updates == first
    model.set_num_updates(second)
    assert model.ema.decay == pytest.approx(ema["decay_used"], rel=1e-9)
    after = teacher.state_dict()
    assert set(after) == set(ema["teacher_after"])
    for k, v in ema["teacher_after"].items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-7, msg=f"teacher {k} after one EMA step")
    model.set_num_updates(second)  # the same update again: no second step
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, after[k])


def test_teacher_runs_in_eval_mode_with_the_checkpoints_dropouts():
    """With the checkpoint's own dropouts (0.1, layerdrop 0.05) and the model in train mode,
    the teacher still gives Meta's targets: it runs in eval mode, without dropout or layerdrop."""
    step = fixture("v2_audio")
    model = load_model("v2_audio", step, overrides={})
    assert model.cfg.encoder_dropout == 0.1 and model.cfg.layerdrop == 0.05
    assert model.training
    torch.manual_seed(0)
    out, captured = run_step(model, step)
    for i, (x, t) in enumerate(captured):
        torch.testing.assert_close(t, step["teacher"]["layer_ffn_outputs"][i], rtol=0, atol=1e-5)
    exp = expected(step)
    torch.testing.assert_close(out["targets"], exp["targets"], rtol=0, atol=1e-5)


def test_padding_counts_toward_target_statistics_unless_asked():
    """Meta's instance norm of the targets counts padded steps (the default, so the fixtures
    reproduce); ``target_stats_exclude_padding`` uses the real steps only: then extra padding
    in the batch leaves the targets unchanged."""
    step = fixture("v2_text")
    overrides = {k: v[1] for k, v in step["config_overrides"].items()}
    inp = step["inputs"]
    pad_id = 1
    src, pm, mask = inp["source"], inp["padding_mask"], inp["precomputed_mask"]
    longer = (
        torch.cat([src, torch.full((2, 6), pad_id)], 1),
        torch.cat([pm, torch.ones(2, 6, dtype=torch.bool)], 1),
        torch.cat([mask, torch.zeros(mask.size(0), 6)], 1),
    )

    def targets(exclude, source, padding_mask, precomputed):
        model = load_model("v2_text", step, {**overrides, "target_stats_exclude_padding": exclude})
        out = model(source=source, padding_mask=padding_mask, precomputed_mask=precomputed)
        return out["targets"]

    meta = expected(step)["targets"]
    torch.testing.assert_close(targets(False, src, pm, mask), meta, rtol=0, atol=1e-5)
    assert not torch.allclose(targets(False, *longer), meta, atol=1e-3), "Meta's statistics depend on padding"

    ours = targets(True, src, pm, mask)
    torch.testing.assert_close(targets(True, *longer), ours, rtol=0, atol=1e-5)
    # an independent computation from the teacher's block outputs: per-sample, per-channel
    # statistics over the real steps, averaged over the top-2 blocks
    real = ~step["encoder_padding_mask"]
    layers = []
    for y in step["teacher"]["layer_ffn_outputs"]:
        normed = torch.zeros_like(y)
        for b in range(y.size(0)):
            v = y[b, real[b]]
            normed[b, real[b]] = (v - v.mean(0)) / torch.sqrt(v.var(0, unbiased=False) + 1e-5)
        layers.append(normed)
    full = (sum(layers) / len(layers)).repeat_interleave(2, 0)
    sel = mask.bool() & ~pm.repeat_interleave(2, 0)
    torch.testing.assert_close(ours, full[sel], rtol=0, atol=1e-5)
    assert not torch.allclose(ours, meta, atol=1e-3)


def test_step_parity_script_prints_the_margins():
    """``benchmarks/step_parity.py`` (README's margin table) runs and reports every modality."""
    import subprocess
    import sys

    from helpers import REPO, env

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_parity.py"), "--compat", str(compat_dir())],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[0] == "| quantity | v2_text | v2_audio | v2_image |"
    assert "| quantity | v1_text | v1_audio | v1_image |" in rows
    ema = [r for r in rows if r.startswith("| EMA update")]
    assert len(ema) == 2 and all(r.count("0.0e+00") == 3 for r in ema)  # bit-identical to Meta's EMA steps
    assert any("28 / 32 (4 padded)" in r for r in rows)
    assert "| sample_size (ours / Meta's) | 12 / 12 | 42 / 42 | 12 / 12 |" in rows
    for r in rows:  # every margin within STEPS.md's tolerances
        if r.startswith(("| loss", "| targets", "| predictions", "| teacher block", "| gradient")):
            assert all(float(c) < 1e-4 for c in r.strip("|").split("|")[1:]), r
