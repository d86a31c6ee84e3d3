"""data2vec 1.0 text (``data2vec_text``): Meta's checkpoint, one training step of Meta's code
(``../shared/compat/v1_text.step.pt``, STEPS.md), the masking, and pretraining through the real
``fairseq-hydra-train`` (a killed run resumes exactly)."""

import math
import os
import shlex
import signal
import subprocess
import time

import pytest
import torch

import d2v_plugin
from d2v_plugin.checkpoints import VocabularyInfo
from d2v_plugin.models.masking import MaskSeed, mask_generator
from d2v_plugin.models.v1.text import Data2VecTextConfig, Data2VecTextModel, from_meta_teacher, meta_name, meta_teacher_name
from helpers import BIN, CONFIG_DIR, assert_same_student_and_teacher, compat_dir, env, hydra_train, train_log

TINY = "pretraining/v1_text_tiny"
CASE = "full_targets"  # the teacher sees the clean sequence (not Meta's padded target_tokens, fairseq #4881)


def annealed(start, end, step, total):
    return end if step >= total else end - (end - start) * (1 - step / total)


# ---- Meta's checkpoint --------------------------------------------------------------------


def test_meta_checkpoint_encoder_output():
    exp = torch.load(compat_dir() / "v1_text.expected.pt", weights_only=True)
    enc = d2v_plugin.load_encoder(str(compat_dir() / "v1_text.checkpoint.pt"))
    assert enc.modality == "TEXT" and enc.embed_dim == 64
    with torch.no_grad():
        out = enc(exp["source"])
    real = ~exp["padding_mask"]
    assert torch.equal(out.padding_mask, exp["padding_mask"])
    diff = (out.last_hidden_state - exp["x"]).abs()[real].max().item()
    assert diff < 1e-4, diff


# ---- one training step of Meta's code -----------------------------------------------------


def step_fixture():
    return torch.load(compat_dir() / "v1_text.step.pt", weights_only=True)


OVERRIDES = {"dropout": 0.0, "attention_dropout": 0.0, "leave_unmasked_prob": 0.0, "random_token_prob": 0.0}


@pytest.fixture(scope="module")
def step_run():
    step = step_fixture()
    model = d2v_plugin.load_pretraining_model(str(compat_dir() / "v1_text.checkpoint.pt"), OVERRIDES)
    captured = []
    hooks = [b.register_forward_hook(lambda mod, args, out: captured.append(out)) for b in model.ema.model.blocks]
    inp = step["inputs"]
    try:
        out = model(source=inp["unmasked_tokens"], precomputed_mask=inp["target_positions"])
    finally:
        for h in hooks:
            h.remove()
    loss = sum(v.float().sum() for v in out["losses"].values())
    loss.backward()
    return step, model, out, captured


def test_step_masked_input_is_metas(step_run):
    step, model, _, _ = step_run
    inp = step["inputs"]
    assert model.mask_idx == step["dictionary"]["mask"] and model.pad_idx == step["dictionary"]["pad"]
    masked = model.apply_mask(inp["unmasked_tokens"], inp["target_positions"])
    assert torch.equal(masked, inp["src_tokens"])


def test_step_losses_and_sample_size(step_run):
    step, model, out, _ = step_run
    case = step["cases"][CASE]
    assert int(out["sample_size"]) == case["sample_size"]
    assert set(out["losses"]) == {"regression"}
    assert out["losses"]["regression"].sum().item() == pytest.approx(case["losses"]["main"], rel=1e-5)
    # Meta logs the initial decay right after a load (STEPS.md, Surprises 12), we the annealed one
    assert case["logged"]["ema_decay"] == pytest.approx(1000 * model.cfg.ema_decay)
    n = step["checkpoint_num_updates"]
    assert out["ema_decay"] == pytest.approx(annealed(model.cfg.ema_decay, model.cfg.ema_end_decay, n, model.cfg.ema_anneal_end_step))


def test_step_targets_predictions_and_teacher_blocks(step_run):
    step, model, out, captured = step_run
    case = step["cases"][CASE]
    torch.testing.assert_close(out["targets"], case["regression"]["targets"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["predictions"].detach(), case["regression"]["predictions"], rtol=0, atol=1e-5)
    assert len(captured) == len(case["teacher"]["layer_outputs"])
    # every step, padded ones included: those see the zeroed embeddings fairseq's encoder gives them
    for i, (x, ffn) in enumerate(captured):
        torch.testing.assert_close(ffn, case["teacher"]["layer_ffn_outputs"][i], rtol=0, atol=1e-5, msg=f"block {i} FFN output")
        torch.testing.assert_close(x, case["teacher"]["layer_outputs"][i], rtol=0, atol=1e-5, msg=f"block {i} output")


def test_step_gradient_norms(step_run):
    step, model, _, _ = step_run
    case = step["cases"][CASE]
    # Meta's norms under our names: q, k, v -> attn.qkv is the norm of the three together
    squares = {}
    for name, norm in case["grad_norms"].items():
        ours, _ = meta_name(name)
        squares[ours] = squares.get(ours, 0.0) + norm ** 2
    meta = {k: math.sqrt(v) for k, v in squares.items()}
    ours = {n: p.grad.double().norm().item() for n, p in model.named_parameters() if p.grad is not None}
    without = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert without == sorted(meta_name(n)[0] for n in case["params_without_grad"])
    assert set(ours) == set(meta)
    bad = {n: (ours[n], v) for n, v in meta.items() if not math.isclose(ours[n], v, rel_tol=1e-4, abs_tol=1e-9)}
    assert not bad, f"gradient norms differ from Meta's: {bad}"


def test_step_ema_update(step_run):
    step, model, _, _ = step_run
    ema = step["ema_step"]
    first, second = ema["num_updates_from_to"]
    teacher = model.ema.model
    before = teacher.state_dict()
    exp_before, student_used, exp_after = (from_meta_teacher(ema[k]) for k in ("teacher_before", "student_used", "teacher_after"))
    assert set(before) == set(exp_before)
    for k, v in exp_before.items():
        torch.testing.assert_close(before[k], v, rtol=0, atol=0, msg=f"teacher {k} is the checkpoint's _ema")
    student = dict(model.encoder.named_parameters())
    with torch.no_grad():
        for k, v in student_used.items():
            student[k].copy_(v)
    assert model.num_updates == first
    model.set_num_updates(second)
    assert model.ema.decay == pytest.approx(ema["decay_used"], rel=1e-9)
    after = teacher.state_dict()
    assert set(after) == set(exp_after)
    for k, v in exp_after.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-7, msg=f"teacher {k} after one EMA step")
    copied = sorted(k for k in after if model.ema_copied(k))
    assert copied == sorted(meta_teacher_name(k) for k in ema["copied_not_averaged"])
    for k in copied:
        assert torch.equal(after[k], student_used[k]), k
    model.set_num_updates(second)  # the same update again: no second step
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, after[k])


# ---- masking --------------------------------------------------------------------------------

VOCAB = 60  # ids 0-3 special, 4..58 ordinary, 59 = <mask>


def small_model(**kw):
    values = dict(embed_dim=16, ffn_embed_dim=32, layers=1, attention_heads=2, max_positions=128, seed=1,
                  ema_anneal_end_step=10, dropout=0.0, attention_dropout=0.0)
    values.update(kw)
    torch.manual_seed(0)
    return Data2VecTextModel(Data2VecTextConfig(**values), task=type("T", (), {"source_dictionary": VocabularyInfo(VOCAB)})())


def batch(B=64, T=100, pad_from=None):
    tokens = torch.randint(4, VOCAB - 1, (B, T), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = 0
    if pad_from is not None:
        for b in range(B):
            tokens[b, pad_from[b]:] = 1
    return tokens


def draw(model, tokens, update=0, ids=None):
    x, pm = model.encoder_input(tokens, None)
    ids = torch.arange(tokens.size(0)) if ids is None else ids
    g = mask_generator(MaskSeed(model.cfg.seed, update, ids), tokens.device)
    mask = model.draw_mask(x, pm, g)
    return mask, model.apply_mask(x, mask, g), pm


def test_corruption_is_80_10_10():
    model = small_model(mask_prob=0.15, mask_multiple_length=1, leave_unmasked_prob=0.1, random_token_prob=0.1)
    tokens = batch(B=400, T=100)
    mask, corrupted, _ = draw(model, tokens)
    n = mask.sum().item()
    assert n / mask.numel() == pytest.approx(0.15, abs=0.005)
    to_mask = (corrupted == model.mask_idx) & mask
    same = (corrupted == tokens) & mask
    changed = mask & ~to_mask & ~same
    assert to_mask.sum().item() / n == pytest.approx(0.8, abs=0.02)
    # a random token equals the original 1 time in 55: count it with the unchanged ones
    assert same.sum().item() / n == pytest.approx(0.1 + 0.1 / 55, abs=0.015)
    assert changed.sum().item() / n == pytest.approx(0.1 * 54 / 55, abs=0.015)
    assert torch.equal(corrupted[~mask], tokens[~mask]), "unselected tokens are never changed"
    rand = corrupted[changed]
    assert rand.min() >= 4 and rand.max() < model.mask_idx, "random tokens are ordinary symbols, never special or <mask>"
    assert len(rand.unique()) == VOCAB - 5


def test_spans_and_counts_follow_mask_tokens_dataset():
    """int(p * length / span + u) span starts per row, spans of mask_multiple_length, cut at the end."""
    model = small_model(mask_prob=0.35, mask_multiple_length=4, leave_unmasked_prob=0.0, random_token_prob=0.0)
    lengths = torch.randint(5, 100, (300,), generator=torch.Generator().manual_seed(0))
    tokens = batch(B=300, T=100, pad_from=lengths.tolist())
    mask, corrupted, pm = draw(model, tokens)
    assert torch.equal(corrupted == model.mask_idx, mask), "leave/random 0: every selected token is <mask>"
    assert not (mask & pm).any(), "padding is never masked"
    for b in range(300):
        L = int(lengths[b])
        row = mask[b, :L].int().tolist()
        # maximal runs of masked tokens: each is a union of spans of 4, only the last may be cut at L
        runs, ends = [], []
        for i, m in enumerate(row):
            if m and (i == 0 or not row[i - 1]):
                runs.append(0)
            if m:
                runs[-1] += 1
                ends.append(i)
        assert all(r >= 4 for r in runs[:-1]), (L, row)
        assert not runs or runs[-1] >= 4 or row[-1] == 1, (L, row)
        assert len(runs) <= math.floor(0.35 * L / 4 + 1)  # at most int(p * L / span + u) starts
    frac = mask.sum().item() / (~pm).sum().item()
    assert 0.27 < frac < 0.35  # 0.35 less the overlap of spans


def test_mask_is_reproducible():
    model = small_model(mask_prob=0.3, mask_multiple_length=2)
    tokens = batch(B=8, T=50)
    ids = torch.arange(100, 108)
    a = draw(model, tokens, update=5, ids=ids)
    b = draw(model, tokens, update=5, ids=ids)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = draw(model, tokens, update=6, ids=ids)
    d = draw(model, tokens, update=5, ids=ids + 8)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    # the forward draws exactly this mask from (common.seed, update, ids)
    model.set_num_updates(5)
    out = model(source=tokens, id=ids)
    assert int(out["sample_size"]) == int(a[0].sum())


def test_padding_is_never_predicted():
    model = small_model(mask_prob=0.5, mask_multiple_length=3)
    tokens = batch(B=4, T=30, pad_from=[30, 20, 10, 5])
    every = torch.ones(4, 30, dtype=torch.bool)
    out = model(source=tokens, precomputed_mask=every)
    assert int(out["sample_size"]) == 30 + 20 + 10 + 5


# ---- pretraining through fairseq-hydra-train -------------------------------------------------


END = 80  # updates of the uninterrupted run


def _train_args(text_bin, save, max_update):
    return [
        f"task.data={text_bin}", f"checkpoint.save_dir={save}", f"optimization.max_update={max_update}",
        "checkpoint.save_interval_updates=20", "common.log_interval=1", "model.ema_anneal_end_step=1000",
        "model.ema_decay=0.95", "model.ema_end_decay=0.99",
        # a cosine period that does not follow max_update: every run gets the same learning rates
        "lr_scheduler.warmup_updates=10", "+lr_scheduler.lr_period_updates=1000",
    ]


@pytest.fixture(scope="module")
def tiny_run(text_bin, tmp_path_factory):
    """END updates of v1_text_tiny, uninterrupted, logged at every update."""
    save = tmp_path_factory.mktemp("v1_tiny_run")
    proc = hydra_train(TINY, *_train_args(text_bin, save, END), cwd=tmp_path_factory.mktemp("cwd"))
    return save, proc.stdout, train_log(proc.stdout)


def test_tiny_pretraining_learns_and_logs(tiny_run):
    save, out, rows = tiny_run
    assert [int(r["num_updates"]) for r in rows] == list(range(1, END + 1)), out[-3000:]
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.7 * first, [r["loss"] for r in rows]
    for key in ("ema_decay", "target_var", "pred_var", "masked_pct", "model_norm", "ema_norm"):
        assert key in rows[-1], f"{key} not logged: {sorted(rows[-1])}"
    # 0.35 in spans of 4, less their overlap; 8 x 64 tokens, no padding
    pct = sum(r["masked_pct"] for r in rows) / len(rows)
    assert 0.27 < pct < 0.35, pct
    for row in rows:
        assert row["sample_size"] == pytest.approx(row["masked_pct"] * 8 * 64, abs=0.5)
        # update k runs with the decay set by set_num_updates(k - 1)
        k = int(row["num_updates"])
        assert row["ema_decay"] == pytest.approx(annealed(0.95, 0.99, k - 1, 1000), abs=2e-6)


def test_tiny_checkpoint_reloads(tiny_run):
    save, _, _ = tiny_run
    ckpt = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    state = ckpt["model"]
    assert ckpt["cfg"]["model"]["_name"] == "data2vec_text"
    assert ckpt["optimizer_history"][-1]["num_updates"] == END
    teacher = state["_ema"]
    assert set(teacher) == {k[len("encoder."):] for k in state if k.startswith("encoder.")}
    diff = (teacher["blocks.0.attn.qkv.weight"] - state["encoder.blocks.0.attn.qkv.weight"]).abs().max()
    assert 0 < diff < 0.5
    # the embeddings are copied (ema_transformer_layers_only): the student of the last EMA step,
    # one optimizer step before the saved student
    emb = (teacher["local_encoder.embed_tokens.weight"] - state["encoder.local_encoder.embed_tokens.weight"]).abs().max()
    assert emb < 0.01
    enc = d2v_plugin.load_encoder(str(save / "checkpoint_last.pt"))
    tokens = torch.tensor([[0, 5, 6, 7, 8, 2, 1, 1]])
    with torch.no_grad():
        out = enc(tokens, output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 8, 64) and len(out.hidden_states) == 2
    assert out.padding_mask.tolist() == [[False] * 6 + [True] * 2]
    assert enc.model.regression_head is None and enc.model.ema is None


def test_killed_run_resumes_exactly(text_bin, tmp_path, tiny_run):
    """SIGKILL a run after a checkpoint; the restart continues from it and ends where the
    uninterrupted run (``tiny_run``) ends: same losses, same student, same EMA teacher."""
    straight, _, straight_log = tiny_run
    save = tmp_path / "killed"
    cmd = [BIN / "fairseq-hydra-train", "--config-dir", CONFIG_DIR, "--config-name", TINY, *_train_args(text_bin, save, 1000)]
    proc = subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    for line in proc.stdout:
        if "Saved checkpoint" in line and "@ 40 updates" in line:
            break
        assert time.time() < deadline, "no checkpoint within 300 s"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)["optimizer_history"][-1]["num_updates"]
    assert 40 <= n < END

    out = hydra_train(TINY, *_train_args(text_bin, save, END), cwd=tmp_path).stdout
    assert "Loaded checkpoint" in out and f"@ {n} updates" in out, out[-3000:]
    resumed_log = train_log(out)
    assert [int(r["num_updates"]) for r in resumed_log] == list(range(n + 1, END + 1))
    for row in resumed_log:
        ref = straight_log[int(row["num_updates"]) - 1]
        assert row["sample_size"] == ref["sample_size"], "the same masks"
        assert row["loss"] == pytest.approx(ref["loss"], abs=2e-4), row["num_updates"]
    resumed = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    reference = torch.load(straight / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert resumed["optimizer_history"][-1]["num_updates"] == END
    assert set(resumed["model"]) == set(reference["model"])
    assert_same_student_and_teacher(resumed["model"], reference["model"])


def test_train_text_script_v1_selects_the_1_0_configs(tmp_path):
    """``train_text.sh --v1`` picks pretraining/v1_text_tiny (quick start) or pretraining/v1_text_base
    (with DATA_DIR) and saves under checkpoints/v1_text_*; without --v1 the 2.0 configs. --dry-run
    prints the command the script would run (the configs themselves train in the tests above)."""
    from helpers import REPO

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "fairseq-hydra-train").write_text('#!/usr/bin/env bash\necho "ARGS $*"\n')
    (fake / "fairseq-hydra-train").chmod(0o755)
    data = tmp_path / "data"
    data.mkdir()
    (data / "dict.txt").write_text("a 1\n")
    (tmp_path / "demo" / "bin").mkdir(parents=True)
    e = {**env(), "PATH": f"{fake}{os.pathsep}{env()['PATH']}", "PYTHON": "true"}  # `true`: no corpus preparation

    def args(*cli):
        proc = subprocess.run(["bash", str(REPO / "scripts" / "train_text.sh"), *cli, "--dry-run"], cwd=tmp_path, env=e,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        command = shlex.split(next(line for line in proc.stdout.splitlines() if line.startswith("+ "))[2:])
        assert str(fake / "fairseq-hydra-train") in command
        return command

    help_text = subprocess.run(["bash", str(REPO / "scripts" / "train_text.sh"), "--help"], capture_output=True, text=True).stdout
    assert "--v1" in help_text and "v1_text_tiny" in help_text and "v1_text_base" in help_text
    for cli, config, save in (
        (["--v1", "--work-dir", "demo"], "pretraining/v1_text_tiny", "checkpoints/v1_text_tiny"),
        ([str(data), "--v1", "--gpus", "2"], "pretraining/v1_text_base", "checkpoints/v1_text_base"),
        ([str(data), "--gpus", "2"], "pretraining/text_base", "checkpoints/text_base"),
        (["--work-dir", "demo"], "pretraining/text_tiny", "checkpoints/text_tiny"),
    ):
        a = args(*cli)
        assert a[a.index("--config-name") + 1] == config, cli
        assert f"checkpoint.save_dir={save}" in a, cli
