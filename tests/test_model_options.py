"""Options of Meta's data2vec_multi that the step fixtures do not exercise, and the API's edges."""

import copy

import pytest
import torch
import torch.nn as nn

import d2v_plugin
from d2v_plugin.checkpoints import VocabularyInfo, _TaskInfo, model_config
from d2v_plugin.models.blocks import Attention, Block
from d2v_plugin.models.data2vec2 import Data2VecMultiConfig, Data2VecMultiModel
from d2v_plugin.models.ema import EMATeacher
from d2v_plugin.models.masking import MaskSeed, mask_info_from_mask

TEXT = {"mask_prob": 0.5, "mask_length": 1, "prenet_depth": 0, "dropout": 0.0,
        "decoder": {"decoder_dim": 16, "decoder_layers": 1, "decoder_groups": 1, "decoder_kernel": 3, "input_dropout": 0.0}}
AUDIO = {"feature_encoder_spec": "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2", "conv_pos_depth": 2,
         "conv_pos_width": 15, "conv_pos_groups": 4, "prenet_depth": 0, "mask_prob": 0.5, "mask_length": 5,
         "mask_noise_std": 0.5, "decoder": {"decoder_dim": 16, "decoder_layers": 1, "decoder_groups": 4, "input_dropout": 0.0}}
IMAGE = {"input_size": 16, "patch_size": 4, "embed_dim": 32, "prenet_depth": 0, "num_extra_tokens": 1,
         "mask_prob": 0.5, "mask_length": 2, "decoder": {"decoder_dim": 16, "decoder_layers": 1, "decoder_groups": 4}}


def model(modality="TEXT", depth=2, mod=None, **overrides):
    """A tiny model of ``modality``; ``mod``: settings of its modality config."""
    mod = mod or {}
    base = {"TEXT": TEXT, "AUDIO": AUDIO, "IMAGE": IMAGE}[modality]
    values = {
        "supported_modality": modality, "depth": depth, "embed_dim": 32, "num_heads": 2, "clone_batch": 2,
        "average_top_k_layers": depth, "instance_norm_target_layer": True, "encoder_dropout": 0.0,
        "attention_dropout": 0.0, "post_mlp_drop": 0.0, "ema_anneal_end_step": 10,
        "modalities": {modality.lower(): {**base, **mod}}, **overrides,
    }
    task = _TaskInfo(VocabularyInfo(40)) if modality == "TEXT" else None
    torch.manual_seed(0)
    return Data2VecMultiModel(model_config(values, Data2VecMultiConfig), task=task)


def tokens(B=2, T=12):
    return torch.randint(4, 40, (B, T), generator=torch.Generator().manual_seed(0))


def test_forward_accepts_metas_arguments_and_rejects_others():
    m = model()
    src = tokens()
    mask = torch.zeros(4, 12)
    mask[:, :6] = 1
    out = m(source=src, target=None, id=None, mode="TEXT", padding_mask=None, mask=True, features_only=False,
            force_remove_masked=False, remove_extra_tokens=True, precomputed_mask=mask)
    assert int(out["sample_size"]) == 24
    with pytest.raises(TypeError, match="precomputed_msk"):
        m(source=src, precomputed_msk=mask)
    with pytest.raises(ValueError, match="precomputed_mask has shape"):
        m(source=src, precomputed_mask=mask[:2])
    with pytest.raises(ValueError, match="same number"):
        m(source=src, precomputed_mask=torch.tril(torch.ones(4, 12)))


def test_text_alibi_is_applied_and_saved():
    m = model(mod={"use_alibi_encoder": True, "learned_alibi_scale": True})
    enc = m.modality_encoders["TEXT"]
    assert "modality_encoders.TEXT.alibi_scale" in m.state_dict()
    m.eval()
    src = tokens()
    with torch.no_grad():
        a = m.extract_features(src)["x"]
        enc.alibi_scale.fill_(0.0)  # no bias: a different output
        b = m.extract_features(src)["x"]
    assert not torch.allclose(a, b, atol=1e-4)
    out = m.train()(src)
    sum(v.sum() for v in out["losses"].values()).backward()
    assert enc.alibi_scale.grad is not None


def test_learned_alibi_for_text_and_images():
    for modality, extra in (("TEXT", {"alibi_max_pos": 12}), ("IMAGE", {"alibi_max_pos": 16})):
        m = model(modality, mod={"use_alibi_encoder": True, "learned_alibi": True, **extra})
        enc = m.modality_encoders[modality]
        assert enc.alibi_bias.shape == (1, 2, extra["alibi_max_pos"], extra["alibi_max_pos"])
        src = tokens() if modality == "TEXT" else torch.randn(2, 3, 16, 16)
        out = m(src)
        sum(v.sum() for v in out["losses"].values()).backward()
        assert enc.alibi_bias.grad is not None and enc.alibi_bias.grad.abs().sum() > 0


def test_alibi_logits_stay_float32_under_bf16():
    """A bias beyond 128 in bf16 is rounded to whole numbers; Meta keeps logits and bias in fp32."""
    torch.manual_seed(0)
    attn = Attention(8, 1)
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()  # q = k = 0: the attention weights are softmax(bias)
        attn.qkv.weight[16:].copy_(torch.eye(8))  # v = x
    x = torch.randn(1, 2, 8)
    bias = torch.tensor([[[[-200.0, -200.5], [-200.0, -200.5]]]])
    ref = attn(x, alibi_bias=bias)
    half = copy.deepcopy(attn).to(torch.bfloat16)(x.to(torch.bfloat16), alibi_bias=bias)
    w = torch.softmax(torch.tensor([0.0, -0.5]), 0)
    expected = attn.proj(w[0] * x[:, :1] + w[1] * x[:, 1:]).expand(1, 2, 8)
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(half.float(), ref, atol=0.05, rtol=0.02)


def test_metas_pre_norm_block_drops_the_ffn_residual():
    """STEPS.md, Surprises 6: Meta's pre-norm AltBlock returns 2 * mlp(norm2(x + attn(norm1(x))))."""
    torch.manual_seed(0)
    meta = Block(16, 2, layer_norm_first=True, ffn_residual=False).eval()
    textbook = copy.deepcopy(meta)
    textbook.ffn_residual = True
    x = torch.randn(2, 5, 16)
    h = x + meta.attn(meta.norm1(x))
    ffn = meta.mlp(meta.norm2(h))
    out, target = meta(x)
    torch.testing.assert_close(out, 2 * ffn)
    torch.testing.assert_close(target, ffn)
    torch.testing.assert_close(textbook(x)[0], h + ffn)
    # a checkpoint config without the field (Meta's) builds Meta's block
    cfg = model_config({"layer_norm_first": True}, Data2VecMultiConfig)
    assert cfg.pre_norm_ffn_residual is False


def test_keep_masked_pct_lets_the_student_see_some_masked_steps():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]] * 2)
    info = mask_info_from_mask(mask, keep_masked_pct=0.5)
    assert info.ids_keep.size(1) == 6  # 4 visible + half of the 4 masked
    m = model(mod={"keep_masked_pct": 0.5})
    out = m(tokens(), precomputed_mask=torch.tensor([[1.0] * 6 + [0.0] * 6] * 4))
    assert out["masked_pct"] == pytest.approx(1 - 9 / 12) and int(out["sample_size"]) == 24


def test_speech_masked_frames_zeroed_or_noised_and_channel_masks():
    enc = model("AUDIO").modality_encoders["AUDIO"]
    x = torch.ones(2, 10, 32)
    mask = torch.zeros(2, 10)
    mask[:, :5] = 1
    info = mask_info_from_mask(mask)
    zeroed = enc.apply_mask(x, info)
    assert zeroed[:, :5].abs().sum() == 0 and torch.equal(zeroed[:, 5:], x[:, 5:])
    noised = model("AUDIO", mod={"encoder_zero_mask": False}).modality_encoders["AUDIO"].apply_mask(x, info)
    assert 0.2 < noised[:, :5].std() < 0.8 and torch.equal(noised[:, 5:], x[:, 5:])  # mask_noise_std 0.5
    channels = model("AUDIO", mod={"mask_channel_prob": 0.5, "mask_channel_length": 4}).modality_encoders["AUDIO"]
    y = channels.apply_mask(x, None)
    dead = (y == 0).all(dim=1)  # (B, C): channels zeroed at every step
    assert dead.any() and not dead.all() and ((y == 0) | (y == 1)).all()


def test_span_mask_options_reach_computation():
    a = model(mod={"mask_length": 3, "mask_prob": 0.5})
    b = model(mod={"mask_length": 3, "mask_prob": 0.5, "mask_dropout": 0.5})
    enc_a, enc_b = a.modality_encoders["TEXT"], b.modality_encoders["TEXT"]
    ga, gb = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    na = enc_a.compute_mask(8, 40, None, "cpu", ga).mask.sum(1)
    nb = enc_b.compute_mask(8, 40, None, "cpu", gb).mask.sum(1)
    assert (nb < na).all()  # half of each row's spans unmasked again


@pytest.mark.parametrize("modality", ["TEXT", "AUDIO", "IMAGE"])
def test_masks_are_reproducible_from_the_seed(modality):
    m = model(modality)
    src = {"TEXT": tokens(), "AUDIO": torch.randn(2, 8000), "IMAGE": torch.randn(2, 3, 16, 16)}[modality]
    ids = torch.tensor([3, 7])

    def mask(update):
        m.num_updates = update
        return m(src, id=ids)["targets"].shape, m.modality_encoders[modality](
            src, None, mask=True, remove_masked=True, clone_batch=2, mask_seed=MaskSeed(1, update, ids))["encoder_mask"].mask

    a, b, c = mask(5)[1], mask(5)[1], mask(6)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # the two clones of a sample differ


def test_ema_step_fails_loudly_on_renamed_parameters():
    blocks = nn.ModuleList([nn.Linear(4, 4)])
    teacher = EMATeacher(blocks, 0.9)
    wrapped = nn.Module()
    wrapped._orig_mod = blocks  # what torch.compile's wrapper does to the names
    with pytest.raises(RuntimeError, match="'0.weight' has no matching student"):
        teacher.step(wrapped)
    frozen = nn.ModuleList([nn.Linear(4, 4)])
    frozen[0].bias.requires_grad_(False)
    teacher = EMATeacher(frozen, 0.9)
    with torch.no_grad():
        frozen[0].weight.add_(1.0)
        frozen[0].bias.add_(1.0)
    teacher.step(frozen)
    assert torch.equal(teacher.model[0].bias, frozen[0].bias)  # frozen: copied, as Meta's
    assert not torch.equal(teacher.model[0].weight, frozen[0].weight)  # trained: averaged


def save_checkpoint(m, path, **cfg_changes):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.structured(m.cfg), resolve=True, enum_to_str=True)
    cfg.update({"_name": "data2vec_multi", **cfg_changes})
    torch.save({"cfg": {"model": cfg}, "model": m.state_dict(), "args": None,
                "optimizer_history": [{"num_updates": 7}]}, path)
    return path


def test_load_pretraining_model_and_unsupported_options(tmp_path):
    m = model()
    path = save_checkpoint(m, tmp_path / "ours.pt")
    loaded = d2v_plugin.load_pretraining_model(str(path), {"encoder_dropout": 0.2, "modalities.text.mask_noise_std": 0.0})
    assert loaded.training and loaded.num_updates == 7 and loaded.ema is not None
    assert loaded.cfg.encoder_dropout == 0.2 and loaded.cfg.modalities.text.mask_noise_std == 0.0
    for k, v in m.ema.state_dict().items():
        assert torch.equal(loaded.ema.state_dict()[k], v)
    with pytest.raises(KeyError, match="modalities.text.mask_nosie_std"):
        d2v_plugin.load_pretraining_model(str(path), {"modalities.text.mask_nosie_std": 0.0})
    # Meta options we do not implement: refused for training, named; harmless for features
    meta = save_checkpoint(m, tmp_path / "meta.pt", shared_decoder={"decoder_dim": 8}, recon_loss=0.0)
    with pytest.raises(ValueError, match=r"model.shared_decoder=.*not implemented"):
        d2v_plugin.load_pretraining_model(str(meta))
    enc = d2v_plugin.load_encoder(str(meta))
    out = enc(tokens(), output_hidden_states=True)
    assert isinstance(out, d2v_plugin.EncoderOutput) and out.last_hidden_state.shape == (2, 12, 32)
    assert len(out.hidden_states) == 2 and out.cls is None


def test_block_masks_use_the_modality_settings():
    """Speech and image block masks take mask_prob / inverse_mask from the modality config."""
    img = model("IMAGE", mod={"mask_prob": 0.7, "inverse_mask": True}).modality_encoders["IMAGE"]
    assert (img.compute_mask(4, 16, None, "cpu", None).mask.sum(1) == 16 - int(16 * 0.3)).all()
    aud = model("AUDIO", mod={"mask_prob": 0.7}).modality_encoders["AUDIO"]
    assert (aud.compute_mask(4, 49, None, "cpu", None).mask.sum(1) == int(49 * 0.7)).all()
