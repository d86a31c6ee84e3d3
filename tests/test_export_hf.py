"""Hugging Face transformers export / import of data2vec 1.0 (d2v_plugin/export/hf.py).

Each of the three 1.0 architectures: a random model of ours (every LayerNorm, bias, layer
scale randomised, so a wrong mapping shows) and the compat fixture are exported, loaded with
``transformers.AutoModel`` and run on the same input as ``d2v_plugin.Encoder``; the import
goes back and must give the HF outputs and our original weights.
"""

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from d2v_plugin import Encoder, load_encoder  # noqa: E402
from d2v_plugin.checkpoints import VocabularyInfo, _TaskInfo, load_student, model_config  # noqa: E402
from d2v_plugin.export import hf as hfx  # noqa: E402
from d2v_plugin.models.architectures import architecture  # noqa: E402

from helpers import compat_dir  # noqa: E402

transformers.logging.set_verbosity_error()
TOL = 1e-4
PAD = 1

TINY = {
    "data2vec_text": dict(embed_dim=64, ffn_embed_dim=128, layers=2, attention_heads=2, max_positions=32),
    "data2vec_audio": dict(
        conv_feature_layers="[(32, 10, 5)] + [(32, 3, 2)] * 2", conv_bias=True, encoder_layers=2, encoder_embed_dim=64,
        encoder_ffn_embed_dim=128, encoder_attention_heads=2, conv_pos=16, conv_pos_groups=4, pos_conv_depth=2,
    ),
    "data2vec_vision": dict(
        image_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_mask_patches=6,
        min_mask_patches_per_block=2, max_mask_patches_per_block=6,
    ),
}
COMPAT = {"data2vec_text": "v1_text", "data2vec_audio": "v1_audio", "data2vec_vision": "v1_image"}


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random: matrices N(0, 0.15), LayerNorm weights 1 + N(0, 0.3), the rest N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "relative_position_bias_table" in name:
                p.copy_(noise)
            elif p.dim() >= 2:
                p.copy_(0.15 * noise)
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)


def tiny_model(arch_name: str, seed: int = 0):
    arch = architecture(arch_name)
    cfg = model_config(dict(TINY[arch_name]), arch.config)
    cfg.skip_ema = True
    task = _TaskInfo(VocabularyInfo(50)) if arch_name == "data2vec_text" else None
    model = arch.model(cfg, task=task, skip_ema=True)
    model.remove_pretraining_modules()
    randomise(model, seed)
    return model.eval()


def tiny_input(arch_name: str):
    """(source, padding_mask) with padding for text and speech."""
    g = torch.Generator().manual_seed(1)
    if arch_name == "data2vec_text":
        x = torch.randint(4, 50, (2, 12), generator=g)
        x[:, 0] = 0
        x[1, 8:] = PAD
        return x, None
    if arch_name == "data2vec_audio":
        x = torch.randn(2, 4000, generator=g)
        pm = torch.zeros(2, 4000, dtype=torch.bool)
        pm[1, 2500:] = True
        x[1, 2500:] = 0
        return x, pm
    return torch.randn(2, 3, 32, 32, generator=g), None


def compare(arch_name: str, encoder: Encoder, hf_model, source, padding_mask) -> float:
    """Max |ours - HF| of last_hidden_state over the real steps (vision: CLS included)."""
    with torch.no_grad():
        if arch_name == "data2vec_text":
            ours = encoder(source, padding_mask)
            real = source.ne(PAD)
            theirs = hf_model(input_ids=source, attention_mask=real.long()).last_hidden_state
        elif arch_name == "data2vec_audio":
            ours = encoder(source, padding_mask)
            am = None if padding_mask is None else (~padding_mask.bool()).long()
            theirs = hf_model(input_values=source, attention_mask=am).last_hidden_state
            real = torch.ones(theirs.shape[:2], dtype=torch.bool) if ours.padding_mask is None else ~ours.padding_mask
        else:
            ours = encoder(source, keep_extra_tokens=True)
            theirs = hf_model(pixel_values=source).last_hidden_state
            real = torch.ones(theirs.shape[:2], dtype=torch.bool)
    assert ours.last_hidden_state.shape == theirs.shape
    return (ours.last_hidden_state - theirs)[real].abs().max().item()


def load_hf(path):
    return transformers.AutoModel.from_pretrained(str(path)).eval()


ARCHS = ["data2vec_text", "data2vec_audio", "data2vec_vision"]
HF_CLASSES = {"data2vec_text": "Data2VecTextModel", "data2vec_audio": "Data2VecAudioModel", "data2vec_vision": "Data2VecVisionModel"}


@pytest.mark.parametrize("arch_name", ARCHS)
def test_random_model_export_matches_transformers(arch_name, tmp_path):
    model = tiny_model(arch_name)
    summary = hfx.export_hf(model, str(tmp_path / "hf"))
    hf_model = load_hf(tmp_path / "hf")
    assert type(hf_model).__name__ == HF_CLASSES[arch_name] == summary["hf_class"]
    diff = compare(arch_name, Encoder(model), hf_model, *tiny_input(arch_name))
    assert diff < TOL, f"{arch_name}: max diff {diff}"
    files = set(os.listdir(tmp_path / "hf"))
    assert {"config.json", "model.safetensors"} <= files
    if arch_name == "data2vec_audio":
        pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
        assert pre["sampling_rate"] == 16000 and pre["do_normalize"] is True and pre["return_attention_mask"] is True
        assert transformers.AutoFeatureExtractor.from_pretrained(str(tmp_path / "hf")).__class__.__name__ == "Wav2Vec2FeatureExtractor"
    elif arch_name == "data2vec_vision":
        pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
        assert pre["image_processor_type"].startswith("BeitImageProcessor")
        assert pre["image_mean"] == [0.485, 0.456, 0.406] and pre["image_std"] == [0.229, 0.224, 0.225]
        assert pre["size"] == {"height": 32, "width": 32}
    else:
        assert any("tokenizer" in n for n in summary["notes"])


def test_scaled_text_embeddings(tmp_path):
    """no_scale_embedding=false: HF never scales, so the export folds sqrt(dim) into the embeddings."""
    TINY["data2vec_text"]["no_scale_embedding"] = False
    try:
        model = tiny_model("data2vec_text")
    finally:
        del TINY["data2vec_text"]["no_scale_embedding"]
    assert model.encoder.local_encoder.embed_scale == 8.0
    summary = hfx.export_hf(model, str(tmp_path / "hf"))
    assert any("multiplied by 8" in n for n in summary["notes"])
    assert compare("data2vec_text", Encoder(model), load_hf(tmp_path / "hf"), *tiny_input("data2vec_text")) < TOL


@pytest.mark.parametrize("arch_name", ARCHS)
def test_compat_checkpoint_export_matches_transformers(arch_name, tmp_path):
    ckpt = compat_dir() / f"{COMPAT[arch_name]}.checkpoint.pt"
    expected = compat_dir() / f"{COMPAT[arch_name]}.expected.pt"
    hfx.export_hf(str(ckpt), str(tmp_path / "hf"))
    inputs = torch.load(expected, map_location="cpu", weights_only=False)
    diff = compare(arch_name, Encoder(load_student(str(ckpt))), load_hf(tmp_path / "hf"), inputs["source"], inputs["padding_mask"])
    assert diff < TOL, f"{COMPAT[arch_name]}: max diff {diff}"


@pytest.mark.parametrize("arch_name", ARCHS)
def test_export_import_round_trip(arch_name, tmp_path):
    """export -> import gives our weights back; the imported checkpoint computes what HF computes."""
    model = tiny_model(arch_name, seed=3)
    hfx.export_hf(model, str(tmp_path / "hf"))
    summary = hfx.import_hf(str(tmp_path / "hf"), str(tmp_path / "back.pt"))
    assert summary["arch"] == arch_name
    original = model.state_dict()
    back = load_student(str(tmp_path / "back.pt"))
    restored = back.state_dict()
    assert set(restored) == set(original)
    for key, value in original.items():
        assert torch.equal(restored[key], value), key
    diff = compare(arch_name, load_encoder(str(tmp_path / "back.pt")), load_hf(tmp_path / "hf"), *tiny_input(arch_name))
    assert diff < TOL


def _hf_native(arch_name: str):
    """A random transformers model (not from our export) of the tiny size."""
    T = transformers
    if arch_name == "data2vec_text":
        cfg = T.Data2VecTextConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                   max_position_embeddings=34, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)
        model = T.Data2VecTextModel(cfg, add_pooling_layer=False)
    elif arch_name == "data2vec_audio":
        cfg = T.Data2VecAudioConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                    conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), conv_bias=False,
                                    num_conv_pos_embeddings=3, num_conv_pos_embedding_groups=4, conv_pos_kernel_size=5)
        model = T.Data2VecAudioModel(cfg)
    else:
        cfg = T.Data2VecVisionConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                     image_size=32, patch_size=8, use_shared_relative_position_bias=True,
                                     use_mean_pooling=False, layer_norm_eps=1e-5, layer_scale_init_value=0.1)
        model = T.Data2VecVisionModel(cfg)
    randomise(model, seed=5)
    return model.eval()


@pytest.mark.parametrize("arch_name", ARCHS)
def test_import_of_transformers_model(arch_name, tmp_path):
    """A model saved by transformers itself -> import_hf -> load_encoder: the same outputs."""
    hf_model = _hf_native(arch_name)
    hf_model.save_pretrained(str(tmp_path / "hf"))
    summary = hfx.import_hf(str(tmp_path / "hf"), str(tmp_path / "imported.pt"))
    assert summary["initialised"], "the pretraining head is not in the HF model and must be listed"
    encoder = load_encoder(str(tmp_path / "imported.pt"))
    assert encoder.modality == {"data2vec_text": "TEXT", "data2vec_audio": "AUDIO", "data2vec_vision": "IMAGE"}[arch_name]
    diff = compare(arch_name, encoder, hf_model, *tiny_input(arch_name))
    assert diff < TOL, f"{arch_name}: max diff {diff}"
    # and back out again: the same HF weights
    hfx.export_hf(str(tmp_path / "imported.pt"), str(tmp_path / "again"))
    again = load_hf(tmp_path / "again").state_dict()
    expected = dict(hf_model.state_dict())
    if arch_name == "data2vec_text":
        # the (random) token type 0 embedding is folded into the word embeddings
        tt = expected.pop("embeddings.token_type_embeddings.weight")
        assert summary["notes"] and "folded" in summary["notes"][0]
        expected["embeddings.word_embeddings.weight"] = expected["embeddings.word_embeddings.weight"] + tt[0]
        assert not again["embeddings.token_type_embeddings.weight"].any()
    for key, value in expected.items():
        if key.startswith("pooler.") or "relative_position_index" in key:
            continue
        assert torch.equal(again[key], value), key


def test_data2vec2_text_as_roberta(tmp_path):
    """A 2.0 text model with prenet_depth 0, learned positions, no ALiBi and post-norm blocks is
    a Data2VecTextModel; imported back it is a 1.0 text checkpoint computing the same."""
    ckpt = compat_dir() / "v2_text.checkpoint.pt"
    summary = hfx.export_hf(str(ckpt), str(tmp_path / "hf"))
    assert summary["hf_class"] == "Data2VecTextModel" and "data2vec 2.0 text" in summary["notes"][0]
    source = torch.load(compat_dir() / "v2_text.expected.pt", map_location="cpu", weights_only=False)["source"]
    assert source.eq(PAD).any()
    hf_model = load_hf(tmp_path / "hf")
    # our 2.0 text encoder takes the padding mask from the caller (HF from attention_mask)
    diff = compare("data2vec_text", load_encoder(str(ckpt)), hf_model, source, source.eq(PAD))
    assert diff < TOL, diff
    assert hfx.import_hf(str(tmp_path / "hf"), str(tmp_path / "v1.pt"))["arch"] == "data2vec_text"
    assert compare("data2vec_text", load_encoder(str(tmp_path / "v1.pt")), hf_model, source, None) < TOL


def test_data2vec2_text_with_alibi_refused(tmp_path):
    model = load_student(str(compat_dir() / "v2_text.checkpoint.pt"))
    model.modality_encoders["TEXT"].modality_cfg.use_alibi_encoder = True
    with pytest.raises(ValueError, match="ALiBi.*transformers has no data2vec 2.0 architecture"):
        hfx.export_hf(model, str(tmp_path / "hf"))


def test_dtype_bf16(tmp_path):
    from safetensors import safe_open

    model = tiny_model("data2vec_vision")
    summary = hfx.export_hf(model, str(tmp_path / "hf"), dtype="bf16")
    assert summary["dtype"] == "bf16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}
    hf_model = transformers.AutoModel.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert compare("data2vec_vision", Encoder(model), hf_model, *tiny_input("data2vec_vision")) < 0.1
    with pytest.raises(ValueError, match="dtype"):
        hfx.export_hf(model, str(tmp_path / "x"), dtype="int8")


def test_data2vec2_refused(tmp_path):
    ckpt = compat_dir() / "v2_audio.checkpoint.pt"
    with pytest.raises(ValueError, match="transformers has no data2vec 2.0 architecture.*--format inference.*--format onnx"):
        hfx.export_hf(str(ckpt), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_unsupported_model_type(tmp_path):
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        hfx.import_hf(str(tmp_path / "bert"), str(tmp_path / "out.pt"))
    assert not (tmp_path / "out.pt").exists()


def test_unsupported_option_refused(tmp_path):
    model = _hf_native("data2vec_vision")
    model.config.use_mean_pooling = True
    model.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="use_mean_pooling"):
        hfx.import_hf(str(tmp_path / "hf"), str(tmp_path / "out.pt"))


def test_import_cli(tmp_path, capsys):
    assert hfx.import_main([str(tmp_path / "nope"), "--out", str(tmp_path / "o.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(str(tmp_path / "bert"))
    assert hfx.import_main([str(tmp_path / "bert"), "--out", str(tmp_path / "o.pt")]) == 2
    assert "'bert'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hfx.import_main([str(tmp_path / "bert")])  # --out is required
    hfx.export_hf(tiny_model("data2vec_text"), str(tmp_path / "hf"))
    assert hfx.import_main([str(tmp_path / "hf"), "--out", str(tmp_path / "o.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "data2vec_text"
    assert load_encoder(str(tmp_path / "o.pt")).modality == "TEXT"


@pytest.mark.parametrize("arch_name,mutate", [
    ("data2vec_text", "swap_qk"),
    ("data2vec_audio", "swap_qk"),
    ("data2vec_vision", "swap_qk"),
    ("data2vec_vision", "swap_gammas"),
])
def test_mapping_mistakes_are_caught(arch_name, mutate, tmp_path, monkeypatch):
    """The comparison is sensitive: a table with query and key (or the two layer scales) swapped fails it."""
    table = list(hfx.NAME_TABLES[arch_name])
    for n, (ours, theirs) in enumerate(table):
        if mutate == "swap_qk" and isinstance(theirs, tuple):
            table[n] = (ours, (theirs[1], theirs[0], theirs[2]))
        elif mutate == "swap_gammas" and ours.endswith("gamma_1"):
            table[n] = (ours, theirs.replace("lambda_1", "lambda_2"))
        elif mutate == "swap_gammas" and ours.endswith("gamma_2"):
            table[n] = (ours, theirs.replace("lambda_2", "lambda_1"))
    monkeypatch.setitem(hfx.NAME_TABLES, arch_name, table)
    model = tiny_model(arch_name)
    hfx.export_hf(model, str(tmp_path / "hf"))
    assert compare(arch_name, Encoder(model), load_hf(tmp_path / "hf"), *tiny_input(arch_name)) > 1e-2


def _docstring_text():
    """Real English text offline: the docstrings of some standard-library modules."""
    import collections
    import inspect
    import json as json_module
    import pathlib
    import re

    lines = []
    for module in (collections, inspect, json_module, pathlib, re, os):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                lines += [line.strip() for line in doc.splitlines() if len(line.split()) >= 4]
    return sorted(set(lines))


def test_sentencepiece_tokenizer_gives_fairseqs_ids(tmp_path):
    """The exported XLMRobertaTokenizer reproduces fairseq's ids (sentencepiece pieces looked up in
    dict.txt) on held-out text, including words the vocabulary must split into many pieces."""
    import collections
    import random

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from d2v_plugin.export.hf_tokenizer import write_hf_tokenizer
    from d2v_plugin.prep.text import write_spm_dict
    from d2v_plugin.tasks._common import load_text_dictionary

    lines = _docstring_text()
    random.Random(0).shuffle(lines)
    train, held_out = lines[: len(lines) * 4 // 5], lines[len(lines) * 4 // 5:]
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "spm"), vocab_size=500,
                                   model_type="unigram", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    counts = collections.Counter(p for line in train for p in sp.encode(line, out_type=str))
    write_spm_dict(tmp_path / "spm.model", counts, tmp_path / "dict.txt")
    dictionary = load_text_dictionary(str(tmp_path / "dict.txt"))
    write_hf_tokenizer(str(tmp_path / "hf"), str(tmp_path / "spm.model"), dictionary)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = held_out + ["Supercalifragilistic deserialisation of JSONDecoder(strict=False) -> 42.5%"]
    differ = []
    for text in texts:
        fairseq_ids = [dictionary.bos()] + [dictionary.index(p) for p in sp.encode(text, out_type=str)] + [dictionary.eos()]
        ids = tok(text)["input_ids"]
        if ids != fairseq_ids:
            differ.append(text)
            # sentencepiece and transformers' Unigram break exact ties differently (">>>" = ">>" ">"
            # or ">" ">>"): the same pieces in another order, never other pieces
            assert sorted(ids) == sorted(fairseq_ids), text
    assert len(differ) <= 0.03 * len(texts), differ
    assert tok.mask_token_id == dictionary.index("<mask>") == len(dictionary) - 1
    assert tok.pad_token_id == dictionary.pad()
