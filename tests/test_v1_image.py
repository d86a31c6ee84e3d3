"""data2vec 1.0 vision (``data2vec_vision``): Meta's checkpoint and training step
(``../shared/compat/v1_image.*``, STEPS.md), BEiT block masking, and tiny pretraining
through ``fairseq-hydra-train`` (loss, masks, reload, SIGKILL and exact resume)."""

import math
import os
import signal
import subprocess
import time

import pytest
import torch

import d2v_plugin
from helpers import BIN, CONFIG_DIR, assert_same_student_and_teacher, compat_dir, env, hydra_train, train_log
from test_image import write_images

TINY = "pretraining/v1_image_tiny"
# our parameter name -> Meta's (the fixture's grad_norms / params_without_grad are Meta's names)
OURS_TO_META = [("patch_embed.proj.", "patch_embed.conv."), (".mlp.fc1.", ".mlp.0."), (".mlp.fc2.", ".mlp.2.")]


def meta_name(name):
    for ours, meta in OURS_TO_META:
        name = name.replace(ours, meta)
    return name


def step_fixture():
    step = torch.load(compat_dir() / "v1_image.step.pt", weights_only=True)
    print(sorted(step))
    return step


# ---- Meta's checkpoint ------------------------------------------------------------------
def test_loads_meta_checkpoint_and_matches_its_features():
    compat = compat_dir()
    encoder = d2v_plugin.load_encoder(str(compat / "v1_image.checkpoint.pt"))
    expected = torch.load(compat / "v1_image.expected.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        out = encoder(expected["source"])
        hidden = encoder(expected["source"], output_hidden_states=True, keep_extra_tokens=True)
    assert out.last_hidden_state.shape == expected["x"].shape == (2, 16, 64)
    torch.testing.assert_close(out.last_hidden_state, expected["x"], atol=1e-4, rtol=0)
    assert out.cls.shape == (2, 64) and len(hidden.hidden_states) == 2
    model = encoder.model
    assert model.cfg.apply_final_proj is False  # Meta's config: Meta's behaviour
    assert model.ema is None and model.final_proj is None


def test_relative_position_index_is_the_checkpoints():
    from d2v_plugin.models.v1.vision import relative_position_index

    state = torch.load(compat_dir() / "v1_image.checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert torch.equal(relative_position_index(4, 4), state["encoder.rel_pos_bias.relative_position_index"])
    assert torch.equal(relative_position_index(4, 4), state["_ema"]["rel_pos_bias.relative_position_index"])
    # a non-square grid: every patch pair with the same offset shares a row, distinct offsets don't
    idx = relative_position_index(3, 5)
    assert idx.shape == (16, 16) and int(idx.max()) == 5 * 9 + 2
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
    offsets = torch.stack([rows.flatten()[:, None] - rows.flatten(), cols.flatten()[:, None] - cols.flatten()], -1)
    seen = {}
    for (i, j), off in zip(torch.cartesian_prod(torch.arange(15), torch.arange(15)).tolist(), offsets.view(-1, 2).tolist()):
        assert seen.setdefault(tuple(off), int(idx[i + 1, j + 1])) == int(idx[i + 1, j + 1])
    assert len(set(seen.values())) == len(seen)


def test_meta_names_map_one_to_one():
    from d2v_plugin.models.v1.vision import from_meta_state

    state = torch.load(compat_dir() / "v1_image.checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    ours = from_meta_state(state)
    assert from_meta_state(ours).keys() == ours.keys()  # identity on our names
    assert {meta_name(k) for k in ours if k != "_ema"} == {k for k in state if k != "_ema"}
    assert "patch_embed.proj.weight" in ours and "encoder.blocks.1.mlp.fc2.bias" in ours
    assert "blocks.0.mlp.fc1.weight" in ours["_ema"]


# ---- one training step against Meta's -----------------------------------------------------
@pytest.fixture(scope="module")
def step_run():
    step = step_fixture()
    overrides = {k: v[1] for k, v in step["config_overrides"].items()}
    assert overrides == {"drop_path": 0.0, "attention_dropout": 0.0}
    model = d2v_plugin.load_pretraining_model(str(compat_dir() / "v1_image.checkpoint.pt"), overrides)
    captured = []
    hooks = [b.register_forward_hook(lambda mod, args, out: captured.append(out)) for b in model.ema.model.blocks]
    inp = step["inputs"]
    try:
        out = model(inp["img"], precomputed_mask=inp["mask_indices"].flatten(1).bool())
    finally:
        for h in hooks:
            h.remove()
    sum(v.float().sum() for v in out["losses"].values()).backward()
    return step, model, out, captured


def test_step_losses_and_logged_values(step_run):
    step, model, out, _ = step_run
    assert model.training and model.cfg.apply_final_proj is False
    assert int(out["sample_size"]) == step["sample_size"] == 12
    assert set(out["losses"]) == set(step["losses"]) == {"regression"}
    assert out["losses"]["regression"].sum().item() == pytest.approx(step["losses"]["regression"], rel=1e-5)
    for k in ("target_var", "pred_var"):
        assert float(out[k]) == pytest.approx(step["logged"][k], rel=1e-5), k
    # Meta logs the config's initial decay right after a load (990, STEPS.md Surprises 12); we
    # log the decay annealed to the checkpoint's update (40 of 40: ema_end_decay)
    assert step["logged"]["ema_decay"] == pytest.approx(1000 * step["model_cfg_after_overrides"]["ema_decay"])
    assert out["ema_decay"] == pytest.approx(step["model_cfg_after_overrides"]["ema_end_decay"], rel=1e-9)


def test_step_targets_predictions_and_teacher_blocks(step_run):
    step, model, out, captured = step_run
    torch.testing.assert_close(out["targets"], step["regression"]["targets"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["predictions"].detach(), step["regression"]["predictions"], rtol=0, atol=1e-5)
    assert len(captured) == len(step["teacher"]["layer_outputs"]) == 2
    for i, ((x, _), blk) in enumerate(zip(captured, model.ema.model.blocks)):
        torch.testing.assert_close(x[:, 1:], step["teacher"]["layer_outputs"][i], rtol=0, atol=1e-5, msg=f"block {i}")
    # the feed-forward targets (end_of_block_targets=false) are Meta's fc_feature, gamma_2 applied
    inp = model.encoder_input(step["inputs"]["img"])[0]
    model.ema.model.end_of_block_targets = False
    try:
        with torch.no_grad():
            _, ffn = model.ema.model(inp, None, collect="targets")
    finally:
        model.ema.model.end_of_block_targets = True
    for i, f in enumerate(ffn):
        torch.testing.assert_close(f[:, 1:], step["teacher"]["layer_ffn_outputs"][i], rtol=0, atol=1e-5, msg=f"block {i} FFN")


def test_step_gradient_norms(step_run):
    step, model, out, _ = step_run
    ours = {meta_name(n): p.grad.double().norm().item() for n, p in model.named_parameters() if p.grad is not None}
    without = sorted(meta_name(n) for n, p in model.named_parameters() if p.grad is None)
    assert without == sorted(step["params_without_grad"]) == ["final_proj.bias", "final_proj.weight"]
    assert set(ours) == set(step["grad_norms"])
    assert {"encoder.blocks.0.attn.q_bias", "encoder.blocks.1.attn.v_bias", "encoder.blocks.0.gamma_2"} <= set(ours)
    bad = {n: (ours[n], v) for n, v in step["grad_norms"].items() if not math.isclose(ours[n], v, rel_tol=1e-4)}
    assert not bad, f"gradient norms differ from Meta's: {bad}"


def test_step_ema_update(step_run):
    step, model, out, _ = step_run
    ema = step["ema_step"]
    first, second = ema["num_updates_from_to"]
    teacher = model.ema.model
    names = lambda d: {meta_name("." + k)[1:]: v for k, v in d.items()}  # noqa: E731  (teacher keys -> Meta's)
    before = names(teacher.state_dict())
    assert set(before) == set(ema["teacher_before"])
    for k, v in ema["teacher_before"].items():
        assert torch.equal(before[k], v), f"teacher {k} is the checkpoint's _ema"
    # the pretend SGD step of the fixture: the student the EMA reads
    ours_of = {meta_name("." + k)[1:]: k for k in teacher.state_dict()}
    student = {**dict(model.encoder.named_parameters()), **dict(model.encoder.named_buffers())}
    with torch.no_grad():
        for k, v in ema["student_used"].items():
            student[ours_of[k]].copy_(v)
    assert model.num_updates == first
    model.set_num_updates(second)
    assert model.ema.decay == pytest.approx(ema["decay_used"], rel=1e-9)
    after = names(teacher.state_dict())
    assert set(after) == set(ema["teacher_after"])
    for k, v in ema["teacher_after"].items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-7, msg=f"teacher {k} after one EMA step")
    assert torch.equal(after["rel_pos_bias.relative_position_index"], ema["student_used"]["rel_pos_bias.relative_position_index"])


def test_final_proj_is_applied_by_default():
    """Our default applies the head (all parameters train: plain DDP works); Meta's checkpoint
    with ``apply_final_proj=true`` then predicts through it."""
    from d2v_plugin.models.v1.vision import Data2VecVisionConfig

    assert Data2VecVisionConfig().apply_final_proj is True
    step = step_fixture()
    model = d2v_plugin.load_pretraining_model(str(compat_dir() / "v1_image.checkpoint.pt"),
                                              {"drop_path": 0.0, "attention_dropout": 0.0, "apply_final_proj": True})
    out = model(step["inputs"]["img"], precomputed_mask=step["inputs"]["mask_indices"].flatten(1).bool())
    proj = model.final_proj
    torch.testing.assert_close(out["predictions"].detach(), proj(step["regression"]["predictions"]).detach(), rtol=0, atol=1e-5)
    sum(v.sum() for v in out["losses"].values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unsupported_options_are_refused():
    from d2v_plugin.checkpoints import model_config
    from d2v_plugin.models.v1.vision import Data2VecVisionConfig, Data2VecVisionModel

    base = {"depth": 1, "embed_dim": 32, "num_heads": 2, "image_size": 16, "patch_size": 4, "num_mask_patches": 4,
            "min_mask_patches_per_block": 2, "max_mask_patches_per_block": 4, "max_update": 10}
    with pytest.raises(ValueError, match="shared_rel_pos_bias"):
        Data2VecVisionModel(model_config({**base, "shared_rel_pos_bias": False}, Data2VecVisionConfig))
    with pytest.raises(ValueError, match="ema_transformer_only"):
        Data2VecVisionModel(model_config({**base, "ema_transformer_only": False}, Data2VecVisionConfig))
    with pytest.raises(ValueError, match="num_mask_patches"):
        Data2VecVisionModel(model_config({**base, "num_mask_patches": 17}, Data2VecVisionConfig))


# ---- BEiT block masking -------------------------------------------------------------------
def test_beit_block_mask_matches_beits_generator():
    """Statistics of our generator-driven masks against BEiT's algorithm driven by Python's
    ``random`` (written out below from its description): the same count distribution and the
    same per-patch frequencies; counts never exceed the target; every rectangle of a single
    block is within the area / aspect limits."""
    import random

    from d2v_plugin.models.block_masking import beit_block_mask

    def beit(h, w, num, lo, hi, rng):
        mask = [[0] * w for _ in range(h)]
        count = 0
        while count < num:
            limit = min(num - count, hi)
            delta = 0
            for _ in range(10):
                area = rng.uniform(lo, limit)
                aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
                bh, bw = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if bw < w and bh < h:
                    top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                    new = sum(1 - mask[i][j] for i in range(top, top + bh) for j in range(left, left + bw))
                    if 0 < new <= limit:
                        for i in range(top, top + bh):
                            for j in range(left, left + bw):
                                mask[i][j] = 1
                        delta = new
                        break
            if delta == 0:
                break
            count += delta
        return torch.tensor(mask).flatten()

    for (h, w, num, lo, hi, n) in [(14, 14, 75, 16, 196, 1000), (4, 4, 6, 2, 6, 3000), (6, 9, 20, 4, 10, 3000)]:
        ours = beit_block_mask(n, h, w, num, lo, hi, generator=torch.Generator().manual_seed(1)).float()
        rng = random.Random(2)
        ref = torch.stack([beit(h, w, num, lo, hi, rng) for _ in range(n)]).float()
        assert ours.shape == (n, h * w)
        assert ours.sum(1).max() <= num
        assert abs(ours.sum(1).mean() - ref.sum(1).mean()) < 0.03 * num, (ours.sum(1).mean(), ref.sum(1).mean())
        assert abs(ours.sum(1).std() - ref.sum(1).std()) < 0.1 * max(float(ref.sum(1).std()), 0.5)
        # per-patch masking frequencies: 4.5 standard errors of a difference of two frequencies
        assert (ours.mean(0) - ref.mean(0)).abs().max() < 4.5 * math.sqrt(2 * 0.25 / n)
        if (h, w) == (6, 9):
            checked = (ours, ref, h, w)
    # the shapes of the masked regions (areas, aspect ratios, h < H and w < W of each block):
    # their bounding boxes are distributed as BEiT's
    ours, ref, h, w = checked

    def boxes(masks):
        out = []
        for m in masks.view(-1, h, w).bool():
            rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
            out.append((int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1), int(m.sum())))
        return out

    ours_boxes, ref_boxes = boxes(ours), boxes(ref)
    shapes = {b[:2] for b in ours_boxes + ref_boxes}
    tv = sum(abs(sum(b[:2] == s for b in ours_boxes) - sum(b[:2] == s for b in ref_boxes)) for s in shapes) / (2 * n)
    assert tv < 0.06, tv
    # 3x3 grid, blocks of area 4: with h < 3 and w < 3 only a 2x2 square fits, so every mask is one
    # (or empty, when 10 tries of the aspect ratio all miss it)
    squares = beit_block_mask(500, 3, 3, 4, 4, 4, generator=torch.Generator().manual_seed(4)).view(-1, 3, 3)
    squares = squares[squares.any(2).any(1)]
    assert len(squares) > 450 and (squares.sum((1, 2)) == 4).all()
    assert (squares.any(1).sum(1) == 2).all() and (squares.any(2).sum(1) == 2).all()
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    assert torch.equal(beit_block_mask(4, 14, 14, 75, 16, 196, generator=g1), beit_block_mask(4, 14, 14, 75, 16, 196, generator=g2))


# ---- tiny pretraining through fairseq-hydra-train ---------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("v1_images"))


def _train_args(data, save, max_update, *extra):
    return [f"task.data={data}", f"checkpoint.save_dir={save}", f"optimization.max_update={max_update}", *extra]


@pytest.fixture(scope="module")
def tiny_run(images, tmp_path_factory):
    save = tmp_path_factory.mktemp("v1_image_tiny")
    proc = hydra_train(TINY, *_train_args(images, save, 40, "common.log_interval=10"), cwd=tmp_path_factory.mktemp("cwd"))
    return save, proc.stdout, train_log(proc.stdout)


def test_tiny_loss_falls_and_masks_as_configured(tiny_run):
    from omegaconf import OmegaConf

    save, out, rows = tiny_run
    assert len(rows) == 4, out[-3000:]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-2:]) / 2
    assert last < 0.8 * first, [r["loss"] for r in rows]
    cfg = OmegaConf.load(CONFIG_DIR / f"{TINY}.yaml").model
    # BEiT masking: at most num_mask_patches per image, most images reach it (16 patches)
    per_image = rows[-1]["sample_size"] / 16
    assert 0.7 * cfg.num_mask_patches <= per_image <= cfg.num_mask_patches
    assert rows[-1]["masked_pct"] == pytest.approx(per_image / 16, abs=1e-3)
    assert rows[-1]["target_var"] > 0 and rows[-1]["pred_var"] > 0


def test_tiny_checkpoint_reloads(tiny_run):
    save, _, _ = tiny_run
    ckpt = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    state = ckpt["model"]
    assert ckpt["cfg"]["model"]["_name"] == "data2vec_vision" and ckpt["cfg"]["model"]["apply_final_proj"] is True
    assert set(state["_ema"]) == {k[len("encoder."):] for k in state if k.startswith("encoder.")}
    encoder = d2v_plugin.load_encoder(str(save / "checkpoint_last.pt"))
    assert encoder.model.cfg.apply_final_proj is True  # ours keep our setting
    with torch.no_grad():
        out = encoder(torch.randn(3, 3, 32, 32))
    assert out.last_hidden_state.shape == (3, 16, 64) and torch.isfinite(out.last_hidden_state).all()


def test_killed_run_resumes_exactly(images, tmp_path):
    """SIGKILL a run after a checkpoint; the restart ends where an uninterrupted run ends:
    same student, same EMA teacher (the masks come from (seed, update, ids))."""
    def train(*args, popen=False):
        cmd = [str(BIN / "fairseq-hydra-train"), "--config-dir", str(CONFIG_DIR), "--config-name", TINY, *map(str, args)]
        if popen:
            return subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proc = subprocess.run(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:]
        return proc.stdout

    save = tmp_path / "killed"
    # the schedules (lr, EMA decay) must not depend on max_update, which differs between the runs
    extra = ("checkpoint.save_interval_updates=10", "common.log_interval=1", "+lr_scheduler.max_update=1000",
             "model.ema_anneal_end_step=1000")
    proc = train(*_train_args(images, save, 1000, *extra), popen=True)
    # an uninterrupted run to update 14, side by side (the kill comes right after update 10)
    straight = tmp_path / "straight"
    reference_run = train(*_train_args(images, straight, 14, *extra), popen=True)
    deadline = time.time() + 300
    for line in proc.stdout:
        if "Saved checkpoint" in line and "@ 10 updates" in line:
            break
        assert time.time() < deadline, "no checkpoint within 300 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)["optimizer_history"][-1]["num_updates"]
    assert n == 10  # the next checkpoint would be at 20

    out = train(*_train_args(images, save, n + 4, *extra))
    reference_out = reference_run.communicate(timeout=300)[0]
    assert reference_run.returncode == 0, reference_out[-3000:]
    assert "Loaded checkpoint" in out and f"@ {n} updates" in out, out[-3000:]
    assert train_log(out)[0]["num_updates"] == n + 1
    resumed = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    reference = torch.load(straight / "checkpoint_last.pt", map_location="cpu", weights_only=True)["model"]
    assert_same_student_and_teacher(resumed, reference, atol=1e-6)


# ---- scripts/train_image.sh --v1 ------------------------------------------------------------
def test_train_image_script_v1(tmp_path):
    from helpers import REPO

    script = REPO / "scripts" / "train_image.sh"
    run = lambda *a: subprocess.run(["bash", str(script), *a], cwd=tmp_path, env=env(),  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    help_text = run("--help").stdout
    assert "--v1" in help_text and "v1_image_tiny" in help_text and "checkpoints/v1_image_base" in help_text
    # a stand-in for fairseq-hydra-train that prints its arguments (test_image.py trains through the script)
    fake = tmp_path / "fake_train"
    fake.write_text('#!/usr/bin/env bash\necho "ARGS $*"\n')
    fake.chmod(0o755)
    e = {**env(), "FAIRSEQ_HYDRA_TRAIN": str(fake)}
    for flags, config in ((["--v1"], "v1_image_tiny"), ([], "image_tiny")):
        proc = subprocess.run(["bash", str(script), *flags, "optimization.max_update=4"], cwd=tmp_path, env=e,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        args = next(line for line in proc.stdout.splitlines() if line.startswith("ARGS ")).split()[1:]
        assert args[args.index("--config-name") + 1] == f"pretraining/{config}"
        assert f"checkpoint.save_dir={tmp_path / 'checkpoints' / config}" in args
        assert args[-1] == "optimization.max_update=4" and "common.cpu=true" in args
