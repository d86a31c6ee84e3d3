"""The pieces of data2vec 2.0, checked in-process on a tiny text model."""

import pytest
import torch

import d2v_plugin  # noqa: F401
from d2v_plugin.checkpoints import VocabularyInfo, _TaskInfo, model_config
from d2v_plugin.models.data2vec2 import Data2VecMultiConfig, Data2VecMultiModel, RepresentationCollapse
from d2v_plugin.models.ema import annealed_decay
from d2v_plugin.models.masking import mask_info_from_mask, token_mask
from d2v_plugin.models.targets import build_targets

TINY = dict(
    depth=2, embed_dim=64, num_heads=2, clone_batch=2, average_top_k_layers=2,
    instance_norm_target_layer=True, ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=10,
    modalities={"text": {"mask_prob": 0.48, "mask_length": 1, "prenet_depth": 0,
                         "decoder": {"decoder_dim": 32, "decoder_layers": 2, "decoder_groups": 1, "decoder_kernel": 9}}},
)


def tiny_model(**overrides):
    values = {**TINY, **overrides}
    return Data2VecMultiModel(model_config(values, Data2VecMultiConfig), task=_TaskInfo(VocabularyInfo(50)))


def batch(B=4, T=64):
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 50, (B, T), generator=g), torch.zeros(B, T, dtype=torch.bool)


def test_student_sees_only_unmasked_tokens_and_teacher_all():
    torch.manual_seed(0)
    model = tiny_model()
    seen = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    model.ema.model[0].register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    source, pad = batch()
    out = model(source, padding_mask=pad)
    keep = int(64 * (1 - 0.48))
    assert seen == [(4 * 2, keep, 64), (4, 64, 64)]  # student: 2 clones, visible only; teacher: all
    assert out["sample_size"] == 4 * 2 * (64 - keep)
    assert out["masked_pct"] == pytest.approx(1 - keep / 64)
    assert out["losses"]["TEXT_regression"].shape == (4 * 2 * (64 - keep), 64)


def test_clones_get_different_masks_and_masks_are_reproducible():
    from d2v_plugin.models.masking import MaskSeed, clone_seed, mask_generator

    seed = clone_seed(MaskSeed(1, 5, torch.arange(4)), 2)
    a = token_mask(8, 64, 0.5, "cpu", mask_generator(seed, "cpu")).mask
    b = token_mask(8, 64, 0.5, "cpu", mask_generator(seed, "cpu")).mask
    later = token_mask(8, 64, 0.5, "cpu", mask_generator(seed._replace(update=6), "cpu")).mask
    assert torch.equal(a, b)
    assert not torch.equal(a, later)
    assert not torch.equal(a[0], a[1])
    assert (a.sum(1) == 32).all()


def test_mask_info_restores_order():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 0, 1]])
    info = mask_info_from_mask(mask)
    x = torch.arange(12.0).view(2, 6, 1)
    visible = torch.gather(x, 1, info.ids_keep.unsqueeze(-1))
    assert visible.squeeze(-1).tolist() == [[0, 3, 5], [7, 8, 10]]
    filled = torch.cat([visible, torch.full((2, 3, 1), -1.0)], 1)
    restored = torch.gather(filled, 1, info.ids_restore.unsqueeze(-1)).squeeze(-1)
    assert (restored == -1).long().tolist() == mask.tolist()
    with pytest.raises(ValueError, match="same number"):
        mask_info_from_mask(torch.tensor([[1, 0], [1, 1]]))


def test_targets_instance_normalised_per_layer():
    layers = [torch.randn(3, 20, 8) * 5 + 2 for _ in range(3)]
    y = build_targets(layers, 1, instance_norm_target_layer=True)
    assert torch.allclose(y.mean(dim=1), torch.zeros(3, 8), atol=1e-5)
    assert torch.allclose(y.var(dim=1, unbiased=False), torch.ones(3, 8), atol=1e-3)
    # top-2 average of normalised layers: zero mean per channel, only the last 2 layers used
    y2 = build_targets(layers, 2, instance_norm_target_layer=True)
    norm = lambda t: (t - t.mean(1, keepdim=True)) / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + 1e-5)  # noqa: E731
    assert torch.allclose(y2, (norm(layers[1]) + norm(layers[2])) / 2, atol=1e-4)
    y3 = build_targets(layers, 3, layer_norm_targets=True)
    assert torch.allclose(y3.mean(dim=-1), torch.zeros(3, 20), atol=1e-5)
    # more layers asked for than there are: all are averaged (Meta's behaviour; v2_text uses 12 of 2)
    assert torch.allclose(build_targets(layers, 4), build_targets(layers, 3))


def test_model_targets_follow_config():
    torch.manual_seed(0)
    model = tiny_model(average_top_k_layers=1)
    source, pad = batch()
    enc = model.modality_encoders["TEXT"]
    out = enc(source, pad, mask=True, remove_masked=True, clone_batch=2)
    y = model.teacher_targets(source, pad, out, enc, "TEXT")
    assert y.shape == (4, 64, 64)
    assert torch.allclose(y.mean(dim=1), torch.zeros(4, 64), atol=1e-4)
    var = y.var(dim=1, unbiased=False)  # instance norm's eps=1e-5 pulls small channels below 1
    assert (var > 0.9).all() and (var < 1.001).all()


def test_ema_schedule_and_update():
    model = tiny_model()
    student = model.blocks[0].attn.qkv.weight
    with torch.no_grad():
        student.add_(1.0)  # move the student away from the teacher
    teacher_before = model.ema.model[0].attn.qkv.weight.clone()
    model.set_num_updates(0)  # before update 1: nothing to fold in yet
    assert torch.equal(model.ema.model[0].attn.qkv.weight, teacher_before)
    model.set_num_updates(4)
    d = annealed_decay(0.9, 0.99, 4, 10)
    assert model.ema.decay == pytest.approx(0.9 + 0.09 * 0.4)
    torch.testing.assert_close(model.ema.model[0].attn.qkv.weight, d * teacher_before + (1 - d) * student.detach())
    model.set_num_updates(4)  # same update again: no second step
    torch.testing.assert_close(model.ema.model[0].attn.qkv.weight, d * teacher_before + (1 - d) * student.detach())
    model.set_num_updates(50)
    assert model.ema.decay == 0.99


def test_collapse_guard_stops_training():
    torch.manual_seed(0)
    model = tiny_model(collapse_check_start=0, min_target_var=100.0)
    source, pad = batch()
    with pytest.raises(RepresentationCollapse, match="target_var .* model.min_target_var"):
        model(source, padding_mask=pad)


def test_extract_features_without_mask_is_deterministic_in_eval():
    torch.manual_seed(0)
    model = tiny_model()
    model.eval()
    source, pad = batch(2, 16)
    a = model.extract_features(source, pad)["x"]
    b = model.extract_features(source, pad)["x"]
    assert a.shape == (2, 16, 64) and torch.equal(a, b)


@pytest.mark.parametrize("prenet_depth", [0, 1])
@pytest.mark.parametrize("same_dtype", [False, True])
def test_half_precision_student(prenet_depth, same_dtype):
    """fp16/bf16 training converts the student. ema_same_dtype=false: the teacher runs in fp32;
    true (Meta's default): in the student's dtype, with fp32 master weights for the average."""
    torch.manual_seed(0)
    text = {**TINY["modalities"]["text"], "prenet_depth": prenet_depth}
    model = tiny_model(modalities={"text": text}, ema_same_dtype=same_dtype).to(torch.bfloat16)
    source, pad = batch()
    out = model(source, padding_mask=pad)
    loss = sum(v.float().sum() for v in out["losses"].values())
    loss.backward()
    assert torch.isfinite(loss)
    assert next(model.ema.model.parameters()).dtype == (torch.bfloat16 if same_dtype else torch.float32)
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert all(v.dtype == torch.float32 for v in model.ema.state_dict().values())
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.add_(0.01)
    before = {k: v.clone() for k, v in model.ema.state_dict().items()}
    model.set_num_updates(1)
    after = model.ema.state_dict()
    # a step of 1e-4 * 0.01 is far below bf16's resolution: only fp32 masters keep it
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)


def test_layerdrop_skips_student_blocks_only():
    """layerdrop applies to the student in training (pretraining and fine-tuning features),
    never to the teacher, whose every block feeds the targets."""
    torch.manual_seed(0)
    model = tiny_model(layerdrop=1.0)
    calls = []
    model.blocks[0].register_forward_hook(lambda *a: calls.append("student"))
    model.ema.model[0].register_forward_hook(lambda *a: calls.append("teacher"))
    source, pad = batch()
    out = model(source, padding_mask=pad)  # top-2 targets need both teacher blocks
    assert calls == ["teacher"] and torch.isfinite(out["target_var"])
    calls.clear()
    model.extract_features(source, pad)
    assert calls == []
    model.eval()
    model.extract_features(source, pad)
    assert calls == ["student"]


def test_teacher_rebuilt_from_student_when_checkpoint_has_none():
    """A checkpoint without ``_ema``: the teacher starts from the *loaded* student, not from
    the random weights the model had before loading."""
    torch.manual_seed(0)
    trained = tiny_model(ema_encoder_only=False)
    state = {k: v for k, v in trained.state_dict().items() if k != "_ema"}
    torch.manual_seed(1)
    model = tiny_model(ema_encoder_only=False)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, trained.blocks[0].attn.qkv.weight)
    model.load_state_dict(state)
    teacher = model.ema.model
    assert teacher.ema is None  # no teacher inside the teacher
    assert all(enc.decoder is None and enc.local_encoder is None for enc in teacher.modality_encoders.values())
    t_state = teacher.state_dict()
    assert t_state and all(torch.equal(v, state[k]) for k, v in t_state.items())
