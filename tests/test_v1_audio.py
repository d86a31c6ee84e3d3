"""data2vec 1.0 speech (``data2vec_audio``): Meta's encoder output, one training step of
Meta's code (``../shared/compat/v1_audio.step.pt``, STEPS.md), tiny pretraining through
``fairseq-hydra-train`` with a SIGKILL and an exact resume, config errors.

Meta's v1 audio masks never cover padded frames, so the fixture's numbers are compared
as they are (no non-padded variant as for data2vec 2.0).
"""

import math
import os
import re
import shlex
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

import d2v_plugin
from d2v_plugin.models.ema import annealed_decay
from d2v_plugin.models.v1.audio import QKV, Data2VecAudioConfig, from_meta_config, meta_name
from helpers import BIN, CONFIG_DIR, assert_same_student_and_teacher, compat_dir, env, hydra_train, train_log
from test_audio import write_corpus

TINY = "pretraining/v1_audio_tiny"


# ---- 1. Meta's encoder ----------------------------------------------------------------
def test_meta_v1_audio_checkpoint():
    compat = compat_dir()
    enc = d2v_plugin.load_encoder(str(compat / "v1_audio.checkpoint.pt"))
    e = torch.load(compat / "v1_audio.expected.pt", weights_only=True)
    with torch.no_grad():
        out = enc(e["source"], e["padding_mask"])
    assert out.last_hidden_state.shape == e["x"].shape
    assert torch.equal(out.padding_mask, e["out_padding_mask"])
    keep = ~e["out_padding_mask"]
    diff = (out.last_hidden_state - e["x"])[keep].abs().max().item()
    print(f"v1_audio max abs diff {diff:.3g}")
    assert diff < 1e-4
    assert enc.modality == "AUDIO" and enc.embed_dim == 64


# ---- 2. one training step of Meta's code ----------------------------------------------
@pytest.fixture(scope="module")
def step():
    s = torch.load(compat_dir() / "v1_audio.step.pt", weights_only=True)
    print(sorted(s))
    return s


def load_model(step, overrides=None):
    if overrides is None:
        overrides = {k: v[1] for k, v in step["config_overrides"].items()}
    return d2v_plugin.load_pretraining_model(str(compat_dir() / "v1_audio.checkpoint.pt"), overrides)


def run_step(model, step):
    captured = []
    hooks = [b.register_forward_hook(lambda mod, args, out: captured.append(out)) for b in model.ema.model.layers]
    inp = step["inputs"]
    try:
        out = model(source=inp["source"], padding_mask=inp["padding_mask"], precomputed_mask=inp["mask_indices"])
    finally:
        for h in hooks:
            h.remove()
    return out, captured


@pytest.fixture(scope="module")
def step_run(step):
    torch.manual_seed(0)
    model = load_model(step)
    out, captured = run_step(model, step)
    sum(v.float().sum() for v in out["losses"].values()).backward()
    return model, out, captured


def feature_std(y):
    return torch.sqrt(y.reshape(-1, y.size(-1)).var(dim=0) + 1e-6).mean().item()


def test_step_losses_and_logged_values(step, step_run):
    model, out, _ = step_run
    assert set(out["losses"]) == set(step["losses"]) == {"regression"}
    ours = out["losses"]["regression"].float().sum().item()
    print(f"loss {ours:.6f} (Meta's {step['losses']['regression']:.6f})")
    assert ours == pytest.approx(step["losses"]["regression"], rel=1e-5)
    assert int(out["sample_size"]) == step["sample_size"] == 42
    assert out["target_var"].item() == pytest.approx(step["logged"]["target_var"], rel=1e-5)
    assert out["pred_var"].item() == pytest.approx(step["logged"]["pred_var"], rel=1e-5)
    # Meta logs the initial decay right after a load (STEPS.md, Surprises 12), we the annealed one
    assert step["logged"]["ema_decay"] == model.cfg.ema_decay * 1000
    assert out["ema_decay"] == pytest.approx(annealed_decay(0.999, 0.9999, 100, 30000), rel=1e-9)
    assert out["masked_pct"] == 42 / 98


def test_step_targets_predictions_and_teacher_layers(step, step_run):
    _, out, captured = step_run
    reg = step["regression"]
    t = (out["targets"] - reg["targets"]).abs().max().item()
    p = (out["predictions"].detach() - reg["predictions"]).abs().max().item()
    print(f"targets max abs diff {t:.3g}, predictions {p:.3g}")
    torch.testing.assert_close(out["targets"], reg["targets"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["predictions"].detach(), reg["predictions"], rtol=0, atol=1e-5)
    assert len(captured) == len(step["teacher"]["layer_ffn_outputs"]) == 2
    real = ~step["mask_info"]["frame_padding_mask"]
    for i, (x, ffn) in enumerate(captured):
        torch.testing.assert_close(ffn, step["teacher"]["layer_ffn_outputs"][i], rtol=0, atol=1e-5, msg=f"layer {i} FFN output")
        # block outputs at padded frames carry no meaning (Meta pads T to a multiple of 2 inside)
        torch.testing.assert_close(x[real], step["teacher"]["layer_outputs"][i][real], rtol=0, atol=1e-5, msg=f"layer {i} output")


def our_grad_norms(model, meta_names):
    """Our gradient norms under Meta's names: our qkv gradient split into q, k and v."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    out = {}
    for meta in meta_names:
        ours = meta_name(meta)
        if ours not in grads:
            continue
        g = grads[ours]
        m = re.search(r"\.self_attn\.([qkv])_proj\.", meta)
        if m:  # q, k, v
            g = g.chunk(3, 0)[QKV.index(m.group(1))]
        out[meta] = g.double().norm().item()
    return out


def test_step_gradient_norms(step, step_run):
    model, _, _ = step_run
    # every parameter of ours is the image of one or more of Meta's
    assert {meta_name(n) for n in step["grad_norms"]} == {n for n, _ in model.named_parameters()}
    assert step["params_without_grad"] == [] and all(p.grad is not None for p in model.parameters())
    ours = our_grad_norms(model, step["grad_norms"])
    assert set(ours) == set(step["grad_norms"])
    rel = {n: abs(ours[n] - v) / v for n, v in step["grad_norms"].items() if v > 1e-6}
    print(f"gradient norms: max rel diff {max(rel.values()):.3g}")
    # a key bias shifts every logit of a query alike: its true gradient is 0, both sides hold
    # fp32 rounding noise of ~1e-8 there
    bad = {n: (ours[n], v) for n, v in step["grad_norms"].items() if not math.isclose(ours[n], v, rel_tol=1e-4, abs_tol=1e-7)}
    assert not bad, f"gradient norms differ from Meta's: {bad}"


def test_step_ema_update(step, step_run):
    model, _, _ = step_run
    ema = step["ema_step"]
    first, second = ema["num_updates_from_to"]
    teacher = model.ema.model
    to_ours = lambda d: {k[len("encoder."):]: v for k, v in d2v_plugin.models.v1.audio.META_NAMES.convert({"encoder." + k: v for k, v in d.items()}).items()}  # noqa: E731
    before = teacher.state_dict()
    for k, v in to_ours(ema["teacher_before"]).items():
        assert torch.equal(before[k], v), f"teacher {k} is the checkpoint's _ema"
    student = dict(model.encoder.named_parameters())
    with torch.no_grad():
        for k, v in to_ours(ema["student_used"]).items():
            student[k].copy_(v)
    assert model.num_updates == first
    model.set_num_updates(second)
    assert model.ema.decay == pytest.approx(ema["decay_used"], rel=1e-9)
    after = teacher.state_dict()
    expected = to_ours(ema["teacher_after"])
    assert set(after) == set(expected)
    worst = max((after[k] - v).abs().max().item() for k, v in expected.items())
    print(f"EMA step max abs diff {worst:.3g}")
    for k, v in expected.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-7, msg=f"teacher {k} after one EMA step")
    copied = sorted(k for k in after if model.ema_copied(k))
    assert copied == sorted(meta_name(k) for k in ema["copied_not_averaged"])
    for k in copied:
        assert torch.equal(after[k], student[k])
    model.set_num_updates(second)  # the same update again: no second step
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, after[k])


def test_dropouts_of_the_checkpoint_leave_the_teacher_alone(step):
    """With the checkpoint's dropout 0.1 / layerdrop 0.05 in train mode the teacher (eval) still gives Meta's targets."""
    model = load_model(step, overrides={})
    assert model.cfg.dropout == 0.1 and model.cfg.encoder_layerdrop == 0.05 and model.training
    torch.manual_seed(0)
    out, captured = run_step(model, step)
    torch.testing.assert_close(out["targets"], step["regression"]["targets"], rtol=0, atol=1e-5)


# ---- 3. configs Meta's code would build differently are refused -----------------------
@pytest.mark.parametrize(
    "key,value",
    [("pos_conv_depth", 1), ("layer_type", "conformer"), ("mask_selection", "normal"), ("activation_fn", "relu"),
     ("group_norm_target_layer", True)],
)
def test_unsupported_meta_options_are_named(key, value):
    with pytest.raises(ValueError, match=key):
        from_meta_config({"_name": "data2vec_audio", key: value})


def test_meta_config_fields_keep_their_meaning():
    ckpt = torch.load(compat_dir() / "v1_audio.checkpoint.pt", weights_only=True)
    meta = ckpt["cfg"]["model"]
    ours = {f for f in Data2VecAudioConfig.__dataclass_fields__}
    kept = ours & set(meta)
    # every field Meta's data2vec_audio reads is one of ours
    for f in ("conv_feature_layers", "encoder_layers", "conv_pos", "pos_conv_depth", "mask_prob", "mask_length",
              "require_same_masks", "ema_layers_only", "instance_norm_target_layer", "average_top_k_layers"):
        assert f in kept
    assert ckpt["cfg"]["task"]["normalize"] is True  # what the model docstring tells users


# ---- 4. tiny pretraining through fairseq-hydra-train, killed and resumed --------------
TOTAL, KILL_AT = 24, 12
TRAIN_ARGS = (f"optimization.max_update={TOTAL}", f"checkpoint.save_interval_updates={KILL_AT}",
              "checkpoint.save_interval=1000", "common.log_interval=1", "dataset.max_tokens=48000")


def _cmd(data, save):
    return [str(c) for c in (BIN / "fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", TINY,
                             f"task.data={data}", f"checkpoint.save_dir={save}", *TRAIN_ARGS)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run of TOTAL updates and, beside it (2 cores), the same run SIGKILLed
    after its checkpoint at KILL_AT updates, then restarted with the same command."""
    root = tmp_path_factory.mktemp("v1audio")
    data = write_corpus(root / "data", 40)
    straight, killed = root / "straight", root / "killed"
    ref = subprocess.Popen(_cmd(data, straight), cwd=root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen(_cmd(data, killed), cwd=root, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    for line in proc.stdout:
        if "Saved checkpoint" in line and f"@ {KILL_AT} updates" in line:
            break
        assert time.time() < deadline, "no checkpoint within 300 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = hydra_train(TINY, f"task.data={data}", f"checkpoint.save_dir={killed}", *TRAIN_ARGS, cwd=root).stdout
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]
    return {"straight": straight, "killed": killed, "straight_out": out, "resumed_out": resumed}


def test_tiny_v1_audio_pretraining(runs):
    out = runs["straight_out"]
    logs = [r for r in train_log(out) if "loss" in r]
    assert [r["num_updates"] for r in logs] == list(range(1, TOTAL + 1)), out[-3000:]
    losses = [r["loss"] for r in logs]
    print("losses", losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) * 0.7, losses
    # spans of 5 frames starting at 65% of the frames, overlapping, then trimmed to the row
    # with the fewest (require_same_masks): 40-50% of the frames
    for r in logs:
        assert 0.3 < r["masked_pct"] < 0.6, r
        assert 0 < r["target_var"] and 0 < r["pred_var"]
    assert logs[-1]["ema_decay"] > logs[0]["ema_decay"]
    ckpt = torch.load(runs["straight"] / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert ckpt["cfg"]["model"]["_name"] == "data2vec_audio"
    assert set(ckpt["model"]["_ema"]) == {k[len("encoder."):] for k in ckpt["model"] if k.startswith("encoder.")}
    enc = d2v_plugin.load_encoder(str(runs["straight"] / "checkpoint_last.pt"))
    pm = torch.zeros(2, 16000, dtype=torch.bool)
    pm[1, 12000:] = True
    out = enc(torch.randn(2, 16000), pm)
    assert out.last_hidden_state.shape == (2, 49, 64) and torch.isfinite(out.last_hidden_state).all()
    assert out.padding_mask[1].sum() == 12 and not out.padding_mask[0].any()


def test_killed_v1_audio_run_resumes_exactly(runs):
    """The restart continues from the checkpoint at KILL_AT and ends where the uninterrupted
    run ends: same loss at the last update, same student, same EMA teacher."""
    out = runs["resumed_out"]
    assert "Loaded checkpoint" in out and f"@ {KILL_AT} updates" in out, out[-3000:]
    resumed_log, straight_log = train_log(out), train_log(runs["straight_out"])
    assert resumed_log[0]["num_updates"] == KILL_AT + 1
    assert resumed_log[-1]["num_updates"] == straight_log[-1]["num_updates"] == TOTAL
    for a, b in zip(resumed_log, straight_log[KILL_AT:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-4), (a, b)
    resumed = torch.load(runs["killed"] / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    reference = torch.load(runs["straight"] / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert resumed["optimizer_history"][-1]["num_updates"] == TOTAL
    assert_same_student_and_teacher(resumed["model"], reference["model"])


# ---- 5. scripts/train_audio.sh --v1 ----------------------------------------------------
def test_train_audio_script_v1_switch(tmp_path):
    """--v1 picks the 1.0 configs and save dirs and keeps the 1.0 recipe's batch (16 GPUs);
    --dry-run prints the command the script would run (several GPUs: under torchrun)."""
    from helpers import REPO, run

    fake = tmp_path / "fake-train"
    fake.write_text('#!/usr/bin/env bash\necho "TRAIN $*"\n')
    fake.chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text(f"{data}\n")
    script = REPO / "scripts" / "train_audio.sh"
    assert "--v1" in run(["bash", script, "--help"]).stdout

    def train(*args):
        proc = subprocess.run(["bash", str(script), *map(str, args), "--dry-run"], cwd=tmp_path,
                              env={**env(), "FAIRSEQ_HYDRA_TRAIN": str(fake)}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        command = shlex.split(next(line for line in proc.stdout.splitlines() if line.startswith("+ "))[2:])
        assert str(fake) in command
        return command

    v1 = train(data, "--v1", "--gpus", "4")
    assert "pretraining/v1_audio_base" in v1 and f"checkpoint.save_dir={tmp_path}/checkpoints/v1_audio_base" in v1
    assert "optimization.update_freq=[4]" in v1
    v2 = train(data, "--gpus", "4")
    assert "pretraining/audio_base" in v2 and "optimization.update_freq=[2]" in v2
    cpu = train(data, "--v1", "--cpu", "--save-dir", tmp_path / "mine", "optimization.max_update=3")
    assert "pretraining/v1_audio_base" in cpu and f"checkpoint.save_dir={tmp_path}/mine" in cpu and "optimization.max_update=3" in cpu


def test_masks_stay_inside_real_frames_and_are_reproducible():
    """Spans never cover padded frames, every row hides as many frames, and the same
    generator seed gives the same mask (what makes a resumed run exact)."""
    cfg = Data2VecAudioConfig(encoder_layers=1, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
                              conv_feature_layers="[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16,2,2)] * 2", conv_pos=8,
                              conv_pos_groups=4, pos_conv_depth=2, mask_prob=0.65, mask_length=3, ema_anneal_end_step=10, seed=1)
    model = d2v_plugin.models.v1.audio.Data2VecAudioModel(cfg, skip_ema=True)
    source, pm = torch.randn(3, 16000), torch.zeros(3, 16000, dtype=torch.bool)
    pm[1, 12000:] = True
    pm[2, 8000:] = True
    x, frame_pm = model.encoder_input(source, pm)
    assert frame_pm.sum(1).tolist() == [0, 12, 25]  # 37 and 24 real frames of 49

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return model.draw_mask(x, frame_pm, g)

    mask = draw(5)
    assert not (mask & frame_pm).any()
    assert len(set(mask.sum(1).tolist())) == 1 and mask.sum(1)[0] > 0
    assert torch.equal(draw(5), mask) and not torch.equal(draw(6), mask)
