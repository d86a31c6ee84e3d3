"""Hugging Face transformers export of data2vec 1.0 models, and import back.

``export_hf(checkpoint, out_dir)`` writes a directory that ``transformers.AutoModel.from_pretrained``
loads as ``Data2VecTextModel``, ``Data2VecAudioModel`` or ``Data2VecVisionModel``, computing the
same ``last_hidden_state`` as :func:`d2v_plugin.load_encoder` (vision: CLS first, as ours with
``keep_extra_tokens=True``; speech: at the real frames, padded frames aside). ``import_hf(dir,
checkpoint)`` goes the other way and writes a checkpoint that ``load_encoder`` and fine-tuning
(``model.model_path``) read. ``d2v-import-hf DIR --out CHECKPOINT`` is its command line.

One name table per architecture (:data:`NAME_TABLES`: our name pattern <-> HF name pattern)
serves both directions. ``{i}``, ``{j}`` stand for block / layer numbers, ``{p}`` for
``weight`` / ``bias``; an HF side that is a tuple of three names is our ``attn.qkv`` split
along dim 0 into query, key and value.

What the two sides compute alike (checked by ``tests/test_export_hf.py``):

- text: HF's RoBERTa-style position ids (``padding_idx + cumsum`` of the real tokens) are
  fairseq's ``make_positions``, so the learned position table is copied as is
  (``max_position_embeddings`` = our positions + pad + 1 rows). HF adds a token type
  embedding (written as zeros, ``type_vocab_size`` 1), applies the embedding LayerNorm and
  dropout as our ``layernorm_embedding``; it never scales the token embeddings, so a model
  with ``no_scale_embedding=false`` has the sqrt(dim) folded into the exported embeddings.
  Ours zeroes padded steps after the embeddings and HF does not: outputs at padded tokens
  differ (they are masked as keys in both). HF's pooler is not part of data2vec: it is not
  written and ``from_pretrained`` initialises it randomly (it warns).
- speech: the conv feature extractor with layer norm, ``feature_projection`` (layer_norm +
  projection), ``pos_conv_embed`` with ``num_conv_pos_embeddings`` (= our ``pos_conv_depth``
  layers) of kernel ``conv_pos_kernel_size`` = our ``max(3, conv_pos // pos_conv_depth)``,
  post-LN blocks. ``mask_emb`` becomes ``masked_spec_embed``.
- vision: ``use_shared_relative_position_bias`` (the same BEiT index layout), layer scale
  (``lambda_1``/``lambda_2`` = ``gamma_1``/``gamma_2``), query / value biases, the final
  LayerNorm as ``layernorm`` (``use_mean_pooling=false``).

data2vec 2.0 (``data2vec_multi``) has no transformers architecture and is refused, except a
2.0 text model that *is* a RoBERTa encoder (post-norm blocks, learned positions, embedding
LayerNorm, no ALiBi, ``prenet_depth`` 0, no final norm: Meta's text recipe), which is written
as ``Data2VecTextModel`` (importing it back gives a 1.0 ``data2vec_text`` checkpoint).
"""

import argparse
import json
import logging
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

# ---- name tables: (our pattern, HF pattern or (query, key, value) patterns) -----------------
QKV = Tuple[str, str, str]

TEXT_NAMES: List[Tuple[str, Union[str, QKV]]] = [
    ("encoder.local_encoder.embed_tokens.weight", "embeddings.word_embeddings.weight"),
    ("encoder.local_encoder.embed_positions.weight", "embeddings.position_embeddings.weight"),
    ("encoder.local_encoder.layernorm_embedding.{p}", "embeddings.LayerNorm.{p}"),
    ("encoder.blocks.{i}.attn.qkv.{p}", (
        "encoder.layer.{i}.attention.self.query.{p}",
        "encoder.layer.{i}.attention.self.key.{p}",
        "encoder.layer.{i}.attention.self.value.{p}",
    )),
    ("encoder.blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("encoder.blocks.{i}.norm1.{p}", "encoder.layer.{i}.attention.output.LayerNorm.{p}"),
    ("encoder.blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("encoder.blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("encoder.blocks.{i}.norm2.{p}", "encoder.layer.{i}.output.LayerNorm.{p}"),
]

AUDIO_NAMES: List[Tuple[str, Union[str, QKV]]] = [
    ("mask_emb", "masked_spec_embed"),
    ("feature_extractor.conv_layers.{j}.0.{p}", "feature_extractor.conv_layers.{j}.conv.{p}"),
    ("feature_extractor.conv_layers.{j}.2.1.{p}", "feature_extractor.conv_layers.{j}.layer_norm.{p}"),
    ("layer_norm.{p}", "feature_projection.layer_norm.{p}"),
    ("post_extract_proj.{p}", "feature_projection.projection.{p}"),
    ("encoder.pos_conv.{j}.0.{p}", "encoder.pos_conv_embed.layers.{j}.conv.{p}"),
    ("encoder.layer_norm.{p}", "encoder.layer_norm.{p}"),
    ("encoder.layers.{i}.attn.qkv.{p}", (
        "encoder.layers.{i}.attention.q_proj.{p}",
        "encoder.layers.{i}.attention.k_proj.{p}",
        "encoder.layers.{i}.attention.v_proj.{p}",
    )),
    ("encoder.layers.{i}.attn.proj.{p}", "encoder.layers.{i}.attention.out_proj.{p}"),
    ("encoder.layers.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm.{p}"),
    ("encoder.layers.{i}.mlp.fc1.{p}", "encoder.layers.{i}.feed_forward.intermediate_dense.{p}"),
    ("encoder.layers.{i}.mlp.fc2.{p}", "encoder.layers.{i}.feed_forward.output_dense.{p}"),
    ("encoder.layers.{i}.norm2.{p}", "encoder.layers.{i}.final_layer_norm.{p}"),
]

VISION_NAMES: List[Tuple[str, Union[str, QKV]]] = [
    ("cls_emb", "embeddings.cls_token"),
    ("mask_emb", "embeddings.mask_token"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("encoder.rel_pos_bias.relative_position_bias_table", "encoder.relative_position_bias.relative_position_bias_table"),
    ("encoder.blocks.{i}.gamma_1", "encoder.layer.{i}.lambda_1"),
    ("encoder.blocks.{i}.gamma_2", "encoder.layer.{i}.lambda_2"),
    ("encoder.blocks.{i}.norm1.{p}", "encoder.layer.{i}.layernorm_before.{p}"),
    ("encoder.blocks.{i}.attn.qkv.weight", (
        "encoder.layer.{i}.attention.attention.query.weight",
        "encoder.layer.{i}.attention.attention.key.weight",
        "encoder.layer.{i}.attention.attention.value.weight",
    )),
    ("encoder.blocks.{i}.attn.q_bias", "encoder.layer.{i}.attention.attention.query.bias"),
    ("encoder.blocks.{i}.attn.v_bias", "encoder.layer.{i}.attention.attention.value.bias"),
    ("encoder.blocks.{i}.attn.proj.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("encoder.blocks.{i}.norm2.{p}", "encoder.layer.{i}.layernorm_after.{p}"),
    ("encoder.blocks.{i}.mlp.fc1.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("encoder.blocks.{i}.mlp.fc2.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("encoder.norm.{p}", "layernorm.{p}"),
]

NAME_TABLES = {"data2vec_text": TEXT_NAMES, "data2vec_audio": AUDIO_NAMES, "data2vec_vision": VISION_NAMES}
# our arch name <-> transformers model_type
HF_MODEL_TYPES = {"data2vec_text": "data2vec-text", "data2vec_audio": "data2vec-audio", "data2vec_vision": "data2vec-vision"}
OUR_ARCHS = {v: k for k, v in HF_MODEL_TYPES.items()}

# our keys that have no HF counterpart on purpose (HF recomputes the index)
OUR_SKIP = {"data2vec_vision": re.compile(r"^encoder\.rel_pos_bias\.relative_position_index$")}
# HF keys handled outside the table (text: token type embeddings, folded) or not data2vec's (pooler)
HF_SKIP = {
    "data2vec_text": re.compile(r"^(pooler\..*|embeddings\.token_type_embeddings\.weight)$"),
    "data2vec_audio": re.compile(r"^$"),
    "data2vec_vision": re.compile(r"^(pooler\..*|.*relative_position_index)$"),
}

_HOLES = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "p": r"(?P<p>weight|bias)"}


def _regex(pattern: str) -> "re.Pattern":
    out = re.escape(pattern)
    for hole, rx in _HOLES.items():
        out = out.replace(re.escape("{" + hole + "}"), rx)
    return re.compile("^" + out + "$")


def _compiled(arch: str):
    return [(_regex(ours), ours, hf) for ours, hf in NAME_TABLES[arch]]


def to_hf_state(arch: str, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our (student, pretraining modules removed) state dict -> HF names; q, k, v split."""
    table = _compiled(arch)
    skip = OUR_SKIP.get(arch)
    out = {}
    for key, value in state.items():
        if skip is not None and skip.match(key):
            continue
        for rx, _, hf in table:
            m = rx.match(key)
            if m is None:
                continue
            holes = m.groupdict()
            if isinstance(hf, tuple):
                for name, part in zip(hf, value.chunk(3, dim=0)):
                    out[name.format(**holes)] = part.clone()
            else:
                out[hf.format(**holes)] = value
            break
        else:
            raise ValueError(f"{arch}: parameter {key!r} has no Hugging Face counterpart in the name table")
    return out


def from_hf_state(arch: str, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An HF state dict -> our names (query, key, value concatenated into ``attn.qkv``)."""
    table = []
    for _, ours, hf in _compiled(arch):
        names = hf if isinstance(hf, tuple) else (hf,)
        for rank, name in enumerate(names):
            table.append((_regex(name), ours, rank, len(names)))
    skip = HF_SKIP[arch]
    parts: Dict[str, Dict[int, torch.Tensor]] = {}
    sizes: Dict[str, int] = {}
    for key, value in state.items():
        for rx, ours, rank, n in table:
            m = rx.match(key)
            if m is None:
                continue
            name = ours.format(**m.groupdict())
            parts.setdefault(name, {})[rank] = value
            sizes[name] = n
            break
        else:
            if skip.match(key):
                continue
            raise ValueError(f"{arch}: Hugging Face parameter {key!r} has no data2vec counterpart in the name table")
    out = {}
    for name, got in parts.items():
        if len(got) != sizes[name]:
            raise ValueError(f"{arch}: {name} needs {sizes[name]} Hugging Face tensors (query, key, value), found {sorted(got)}")
        out[name] = got[0] if sizes[name] == 1 else torch.cat([got[r] for r in range(sizes[name])], dim=0)
    return out


# ---- configs ---------------------------------------------------------------------------
def _single(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"{what}={list(value)}: data2vec 1.0 vision needs square images and patches")
        value = value[0]
    return int(value)


def _text_config(model) -> Dict[str, Any]:
    cfg = model.cfg
    if not cfg.learned_pos:
        raise ValueError("data2vec_text with learned_pos=false (sinusoidal positions): transformers' Data2VecTextModel has learned positions only")
    if not cfg.layernorm_embedding:
        raise ValueError("data2vec_text with layernorm_embedding=false: transformers' Data2VecTextModel always normalises its embeddings")
    le = model.encoder.local_encoder
    return dict(
        model_type="data2vec-text",
        architectures=["Data2VecTextModel"],
        vocab_size=model.vocab_size,
        hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.attention_heads,
        intermediate_size=cfg.ffn_embed_dim,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=le.embed_positions.weight.size(0),
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=model.pad_idx,
        bos_token_id=0,
        eos_token_id=2,
        position_embedding_type="absolute",
    )


def _audio_config(model) -> Dict[str, Any]:
    cfg = model.cfg
    if str(cfg.extractor_mode) != "layer_norm":
        raise ValueError(
            f"data2vec_audio with extractor_mode={cfg.extractor_mode!r}: transformers' Data2VecAudioModel has a layer-norm "
            "feature extractor only (extractor_mode='layer_norm')"
        )
    if cfg.layer_norm_first:
        raise ValueError("data2vec_audio with layer_norm_first=true: transformers' Data2VecAudioModel is post-norm only")
    layers = model.conv_layers
    return dict(
        model_type="data2vec-audio",
        architectures=["Data2VecAudioModel"],
        hidden_size=cfg.encoder_embed_dim,
        num_hidden_layers=cfg.encoder_layers,
        num_attention_heads=cfg.encoder_attention_heads,
        intermediate_size=cfg.encoder_ffn_embed_dim,
        hidden_act="gelu",
        feat_extract_activation="gelu",
        hidden_dropout=cfg.dropout,
        activation_dropout=cfg.activation_dropout,
        attention_dropout=cfg.attention_dropout,
        feat_proj_dropout=cfg.dropout_input,
        layerdrop=cfg.encoder_layerdrop,
        layer_norm_eps=1e-5,
        conv_dim=[c for c, _, _ in layers],
        conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers],
        conv_bias=bool(cfg.conv_bias),
        num_conv_pos_embeddings=cfg.pos_conv_depth,
        num_conv_pos_embedding_groups=cfg.conv_pos_groups,
        conv_pos_kernel_size=max(3, cfg.conv_pos // cfg.pos_conv_depth),
        mask_time_length=cfg.mask_length,
    )


def _vision_config(model) -> Dict[str, Any]:
    cfg = model.cfg
    dim = cfg.embed_dim
    hidden = model.encoder.blocks[0].mlp.fc1.out_features if len(model.encoder.blocks) else int(dim * cfg.mlp_ratio)
    return dict(
        model_type="data2vec-vision",
        architectures=["Data2VecVisionModel"],
        hidden_size=dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        intermediate_size=hidden,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=cfg.attention_dropout,
        layer_norm_eps=1e-5,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.in_channels,
        use_mask_token=getattr(model, "mask_emb", None) is not None,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=cfg.layer_scale_init_value,
        drop_path_rate=cfg.drop_path,
        use_mean_pooling=False,
    )


def _our_text_config(c) -> Dict[str, Any]:
    if c.hidden_act != "gelu":
        raise ValueError(f"data2vec-text with hidden_act={c.hidden_act!r}: d2v_plugin's blocks use 'gelu'")
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"data2vec-text with position_embedding_type={c.position_embedding_type!r}: only 'absolute' is supported")
    if c.pad_token_id != 1:
        raise ValueError(f"data2vec-text with pad_token_id={c.pad_token_id}: d2v_plugin's text checkpoints pad with index 1 (fairseq)")
    return {
        "_name": "data2vec_text",
        "embed_dim": c.hidden_size,
        "ffn_embed_dim": c.intermediate_size,
        "layers": c.num_hidden_layers,
        "attention_heads": c.num_attention_heads,
        "dropout": c.hidden_dropout_prob,
        "attention_dropout": c.attention_probs_dropout_prob,
        "max_positions": c.max_position_embeddings - c.pad_token_id - 1,
        "no_scale_embedding": True,
        "layernorm_embedding": True,
        "learned_pos": True,
    }


def _our_audio_config(c) -> Dict[str, Any]:
    for key in ("hidden_act", "feat_extract_activation"):
        if getattr(c, key) != "gelu":
            raise ValueError(f"data2vec-audio with {key}={getattr(c, key)!r}: d2v_plugin uses 'gelu'")
    if getattr(c, "add_adapter", False):
        raise ValueError("data2vec-audio with add_adapter=true: d2v_plugin has no adapter layers")
    if c.num_conv_pos_embeddings < 2:
        raise ValueError(f"data2vec-audio with num_conv_pos_embeddings={c.num_conv_pos_embeddings}: d2v_plugin needs >= 2 positional conv layers")
    if c.conv_pos_kernel_size < 3:
        raise ValueError(f"data2vec-audio with conv_pos_kernel_size={c.conv_pos_kernel_size}: d2v_plugin's kernel is max(3, conv_pos // depth) >= 3")
    spec = "[" + ", ".join(f"({d}, {k}, {s})" for d, k, s in zip(c.conv_dim, c.conv_kernel, c.conv_stride)) + "]"
    return {
        "_name": "data2vec_audio",
        "extractor_mode": "layer_norm",
        "conv_feature_layers": spec,
        "conv_bias": bool(c.conv_bias),
        "encoder_layers": c.num_hidden_layers,
        "encoder_embed_dim": c.hidden_size,
        "encoder_ffn_embed_dim": c.intermediate_size,
        "encoder_attention_heads": c.num_attention_heads,
        "layer_norm_first": False,
        "dropout": c.hidden_dropout,
        "attention_dropout": c.attention_dropout,
        "activation_dropout": c.activation_dropout,
        "encoder_layerdrop": c.layerdrop,
        "dropout_input": c.feat_proj_dropout,
        # max(3, conv_pos // depth) gives the kernel back
        "conv_pos": c.conv_pos_kernel_size * c.num_conv_pos_embeddings,
        "conv_pos_groups": c.num_conv_pos_embedding_groups,
        "pos_conv_depth": c.num_conv_pos_embeddings,
        "mask_length": c.mask_time_length,
    }


def _our_vision_config(c) -> Dict[str, Any]:
    if c.hidden_act != "gelu":
        raise ValueError(f"data2vec-vision with hidden_act={c.hidden_act!r}: d2v_plugin's blocks use 'gelu'")
    refuse = {
        "use_absolute_position_embeddings": False,
        "use_relative_position_bias": False,
        "use_shared_relative_position_bias": True,
        "use_mean_pooling": False,
    }
    for key, want in refuse.items():
        if bool(getattr(c, key)) != want:
            raise ValueError(
                f"data2vec-vision with {key}={getattr(c, key)}: d2v_plugin's data2vec 1.0 vision model needs {key}={want} "
                "(one shared relative position bias, no absolute positions, a final LayerNorm on every token)"
            )
    dim = c.hidden_size
    image, patch = _single(c.image_size, "image_size"), _single(c.patch_size, "patch_size")
    patches = (image // patch) ** 2
    masking = {}
    if patches < 196:  # BEiT's block masking defaults (75 of 196 patches) do not fit a smaller grid
        num = max(1, round(patches * 75 / 196))
        masking = {"num_mask_patches": num, "min_mask_patches_per_block": min(16, num), "max_mask_patches_per_block": patches}
    return {
        "_name": "data2vec_vision",
        **masking,
        "layer_scale_init_value": c.layer_scale_init_value,
        "image_size": image,
        "patch_size": patch,
        "in_channels": c.num_channels,
        "shared_rel_pos_bias": True,
        "drop_path": c.drop_path_rate,
        "attention_dropout": c.attention_probs_dropout_prob,
        "depth": c.num_hidden_layers,
        "embed_dim": dim,
        "num_heads": c.num_attention_heads,
        "mlp_ratio": c.intermediate_size / dim,
        "apply_final_proj": True,
    }


# ---- export ----------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _student(path_or_model):
    from ..checkpoints import load_student
    from ..encoder import Encoder

    if isinstance(path_or_model, (str, os.PathLike)):
        return load_student(str(path_or_model)), str(path_or_model)
    model = path_or_model.model if isinstance(path_or_model, Encoder) else path_or_model
    return model, type(model).__name__


V2_REFUSAL = (
    "transformers has no data2vec 2.0 architecture (its Data2Vec* models are data2vec 1.0), so it cannot be exported "
    "as a Hugging Face model; use `d2v-export --format inference` (safetensors + config for d2v_plugin) or `--format onnx` instead"
)


def _v2_text_blocker(model) -> Optional[str]:
    """Why a data2vec 2.0 model is not a post-norm RoBERTa-style text encoder (None: it is)."""
    cfg = model.cfg
    if getattr(model, "mode", None) != "TEXT" or list(model.modality_encoders) != ["TEXT"]:
        return f"its modality is {getattr(model, 'mode', None)} (only data2vec 2.0 text can be written as Data2VecTextModel)"
    enc = model.modality_encoders["TEXT"]
    t = enc.modality_cfg
    checks = [
        (cfg.layer_norm_first, "pre-norm blocks (layer_norm_first=true)"),
        (model.norm is not None, "a final LayerNorm"),
        (t.prenet_depth != 0 or len(enc.context_encoder.blocks) > 0, f"prenet_depth={t.prenet_depth} (modality-specific blocks)"),
        (enc.context_encoder.norm is not None, "a LayerNorm before the shared blocks"),
        (t.use_alibi_encoder, "ALiBi attention biases (use_alibi_encoder=true)"),
        (not t.learned_pos or t.no_token_positional_embeddings, "no learned positions"),
        (not t.layernorm_embedding, "no embedding LayerNorm (layernorm_embedding=false)"),
        (t.num_extra_tokens != 0, f"num_extra_tokens={t.num_extra_tokens}"),
        (abs(cfg.norm_eps - 1e-5) > 1e-12 or not cfg.norm_affine, f"norm_eps={cfg.norm_eps} / norm_affine={cfg.norm_affine}"),
    ]
    for failed, what in checks:
        if failed:
            return f"it has {what}, which transformers' Data2VecTextModel cannot express"
    return None


def _v2_text_as_v1(model, source: str):
    """A data2vec 2.0 text model that is a post-norm RoBERTa encoder (prenet_depth 0, learned
    positions, no ALiBi, no final norm) -> (our 1.0 text state, its HF config values)."""
    why = _v2_text_blocker(model)
    if why is not None:
        raise ValueError(f"{source} is a data2vec 2.0 model (data2vec_multi) and {why}: {V2_REFUSAL}")
    local = "modality_encoders.TEXT.local_encoder."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(local):
            state["encoder.local_encoder." + key[len(local):]] = value.detach().float().cpu()
        elif key.startswith("blocks."):
            state["encoder." + key] = value.detach().float().cpu()
        elif key.startswith("modality_encoders.TEXT.decoder.") or key.startswith("_ema") or key.startswith("ema."):
            continue  # pretraining only
        else:
            raise ValueError(f"{source}: data2vec 2.0 text parameter {key!r} has no Hugging Face counterpart")
    cfg = model.cfg
    enc = model.modality_encoders["TEXT"]
    le = enc.local_encoder
    values = dict(
        model_type="data2vec-text",
        architectures=["Data2VecTextModel"],
        vocab_size=le.embed_tokens.weight.size(0),
        hidden_size=cfg.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=cfg.num_heads,
        intermediate_size=model.blocks[0].mlp.fc1.out_features,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.encoder_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=le.embed_positions.weight.size(0),
        type_vocab_size=1,
        layer_norm_eps=cfg.norm_eps,
        pad_token_id=enc.pad_idx,
        bos_token_id=0,
        eos_token_id=2,
        position_embedding_type="absolute",
    )
    return state, values, le.embed_scale


def _arch_name(model, source: str) -> str:
    from ..models.architectures import architecture_of

    name = architecture_of(model).name
    if name == "data2vec_multi":
        if _v2_text_blocker(model) is None:
            return "data2vec_text"
        raise ValueError(f"{source} is a data2vec 2.0 model (data2vec_multi) and {_v2_text_blocker(model)}: {V2_REFUSAL}")
    if name not in NAME_TABLES:
        raise ValueError(f"{source}: {name} has no Hugging Face export (supported: {sorted(NAME_TABLES)})")
    return name


def _hf_classes(arch: str):
    import transformers

    return {
        "data2vec_text": (transformers.Data2VecTextConfig, transformers.Data2VecTextModel),
        "data2vec_audio": (transformers.Data2VecAudioConfig, transformers.Data2VecAudioModel),
        "data2vec_vision": (transformers.Data2VecVisionConfig, transformers.Data2VecVisionModel),
    }[arch]


# fine-tuned text heads -> (transformers class, prefix of the base model in its state dict)
HF_HEADS = {
    "d2v_text_classification": ("Data2VecTextForSequenceClassification", "data2vec_text."),
    "d2v_span_qa": ("Data2VecTextForQuestionAnswering", "data2vec_text."),
    "d2v_ctc": ("Data2VecAudioForCTC", "data2vec_audio."),
    "d2v_image_classification": ("Data2VecVisionForImageClassification", "data2vec_vision."),
}

IMAGE_HEAD_REFUSAL = (
    "transformers' Data2VecVisionForImageClassification either ends the encoder with its LayerNorm and reads the CLS "
    "token, or mean-pools the patches into a LayerNorm with no encoder norm; our (and Meta's) fine-tuning keeps the "
    "encoder's final norm and adds a norm on the pooled patches, which it cannot express: use `d2v-export --format "
    "inference` (d2v_plugin.load_model) instead"
)


def _finetuned(path_or_model):
    """The fine-tuned record of a fine-tuning checkpoint / export with a text head (else None)."""
    if not isinstance(path_or_model, (str, os.PathLike)):
        return None
    from ..predict.finetuned import find_finetuned

    rec = find_finetuned(str(path_or_model))
    return rec if rec is not None and rec.name in HF_HEADS else None


def _head_state(rec, values: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The head's weights under transformers' names; ``values`` (the config) gets the head's fields."""
    state = rec.state
    if rec.name == "d2v_image_classification":
        raise ValueError(f"{rec.path}: {IMAGE_HEAD_REFUSAL}")
    if rec.name == "d2v_ctc":
        symbols = list(rec.model_cfg["target_symbols"])
        values.update(vocab_size=len(symbols), pad_token_id=symbols.index("<s>"), bos_token_id=None, eos_token_id=None,
                      final_dropout=rec.model_cfg.get("final_dropout", 0.0), ctc_loss_reduction="sum",
                      ctc_zero_infinity=True)
        return {f"lm_head.{p}": state[f"head.{p}"].float() for p in ("weight", "bias")}
    if rec.name == "d2v_span_qa":
        return {f"qa_outputs.{p}": state[f"span_head.{p}"].float() for p in ("weight", "bias")}
    cfg = rec.model_cfg
    if cfg.get("pooler_activation_fn", "tanh") != "tanh":
        raise ValueError(f"{rec.path}: the head's activation is {cfg['pooler_activation_fn']}; transformers' "
                         "Data2VecTextForSequenceClassification head is fixed to tanh")
    inner = state["head.dense.weight"].size(0)
    if inner != values["hidden_size"]:
        raise ValueError(f"{rec.path}: the head's inner width is {inner}, not the encoder's {values['hidden_size']}, "
                         "which transformers' classification head requires")
    num = state["head.out_proj.weight"].size(0)
    values["num_labels"] = num
    if rec.task_cfg.get("regression_target"):
        values["problem_type"] = "regression"
    else:
        values["problem_type"] = "single_label_classification"
        names = rec.classes or [str(i) for i in range(num)]
        values["id2label"] = {i: n for i, n in enumerate(names[:num])}
        values["label2id"] = {n: i for i, n in enumerate(names[:num])}
    values["classifier_dropout"] = cfg.get("pooler_dropout", 0.0)
    return {f"classifier.{k[len('head.'):]}": v.float() for k, v in state.items() if k.startswith("head.")}


def export_hf(path_or_model, out_dir: str, dtype: str = "fp32") -> Dict[str, Any]:
    """Write a transformers model directory (``config.json``, ``model.safetensors`` and, for
    speech and vision, ``preprocessor_config.json``) of a data2vec 1.0 checkpoint (ours or
    Meta's; a path, or a loaded model / :class:`d2v_plugin.Encoder`).

    ``dtype``: ``fp32``, ``bf16`` or ``fp16`` for the saved weights. Returns a summary dict
    (``model_type``, ``hf_class``, ``out_dir``, ``files``, ``num_parameters``, ``dtype``, ``notes``).
    Raises ValueError for data2vec 2.0 and for 1.0 options transformers cannot express.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    model, source = _student(path_or_model)
    arch = _arch_name(model, source)
    notes: List[str] = []
    head = _finetuned(path_or_model)
    from ..models.architectures import architecture_of

    if architecture_of(model).name == "data2vec_multi":  # a 2.0 text model that is a RoBERTa encoder
        state, values, scale = _v2_text_as_v1(model, source)
        notes.append("data2vec 2.0 text (prenet_depth 0, learned positions, no ALiBi, post-norm) written as Data2VecTextModel; "
                     "d2v-import-hf brings it back as a data2vec 1.0 text checkpoint")
    else:
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if arch == "data2vec_text":
        if architecture_of(model).name != "data2vec_multi":
            values = _text_config(model)
            scale = model.encoder.local_encoder.embed_scale
        key = "encoder.local_encoder.embed_tokens.weight"
        if scale != 1.0:
            state[key] = state[key] * scale
            notes.append(f"no_scale_embedding=false: the token embeddings are exported multiplied by {scale:g}")
        notes.append("the pooler is not part of data2vec: transformers initialises it randomly")
    elif arch == "data2vec_audio":
        values = _audio_config(model)
        notes.append("the model expects normalised 16 kHz waveforms (zero mean, unit variance per utterance)")
    else:
        values = _vision_config(model)
    hf_state = to_hf_state(arch, state)
    if arch == "data2vec_text":
        hf_state["embeddings.token_type_embeddings.weight"] = torch.zeros(1, values["hidden_size"])
    config_cls, model_cls = _hf_classes(arch)
    prefix = ""
    if head is not None:
        import transformers

        class_name, prefix = HF_HEADS[head.name]
        model_cls = getattr(transformers, class_name)
        values["architectures"] = [class_name]
        hf_state = {prefix + k: v for k, v in hf_state.items()}
        hf_state.update(_head_state(head, values))
        notes.append(f"the {head.name} head is written as {class_name}")
    config = config_cls(**{k: v for k, v in values.items() if k != "model_type"})
    hf_model = model_cls(config)
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not HF_SKIP[arch].match(k[len(prefix):] if k.startswith(prefix) else k)]
    if missing or unexpected:
        raise ValueError(f"{arch}: the Hugging Face model does not fit the mapped weights: missing {missing[:8]}, unexpected {unexpected[:8]}")
    hf_model.to(DTYPES[dtype])
    os.makedirs(out_dir, exist_ok=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    if arch == "data2vec_text":
        notes.append(_write_tokenizer(out_dir, path_or_model, head, values))
    if arch == "data2vec_audio":
        from transformers import Wav2Vec2FeatureExtractor

        features = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
        )
        features.save_pretrained(out_dir)
        if head is not None:
            notes.append(_write_ctc_processor(out_dir, features, list(head.model_cfg["target_symbols"])))
    elif arch == "data2vec_vision":
        _write_image_processor(out_dir, model.cfg.image_size)
        notes.append("last_hidden_state holds the CLS token first (d2v_plugin's Encoder drops it unless keep_extra_tokens=True)")
    return {
        "model_type": HF_MODEL_TYPES[arch],
        "hf_class": model_cls.__name__,
        "out_dir": out_dir,
        "files": sorted(os.listdir(out_dir)),
        "num_parameters": sum(v.numel() for v in hf_state.values()),
        "dtype": dtype,
        "notes": notes,
    }


def _tokenizer_files(path_or_model, head):
    """(sentencepiece model, dict.txt) the text model was trained with, or (None, why not)."""
    from .hf_tokenizer import find_sentencepiece_model

    if head is not None:
        if head.tokenizer is None or head.tokenizer.kind != "sentencepiece":
            kind = head.tokenizer.kind if head.tokenizer is not None else "unknown"
            return None, f"its tokenizer is {kind}, not sentencepiece"
        return head.tokenizer.files["model"], head.dict_path
    if not isinstance(path_or_model, (str, os.PathLike)) or os.path.isdir(path_or_model):
        return None, "no training data directory is known for it"
    from ..checkpoints import read_checkpoint

    task = (read_checkpoint(str(path_or_model)).get("cfg") or {}).get("task") or {}
    data = str(task.get("data") or "").split(":")[0]
    spm_model = find_sentencepiece_model(data)
    if spm_model is None or not os.path.isfile(os.path.join(data, "dict.txt")):
        return None, f"no spm.model and dict.txt in or beside its task.data ({data or 'not set'})"
    return spm_model, os.path.join(data, "dict.txt")


def _write_tokenizer(out_dir: str, path_or_model, head, values) -> str:
    from ..tasks._common import load_text_dictionary
    from .hf_tokenizer import write_hf_tokenizer

    spm_model, dict_path = _tokenizer_files(path_or_model, head)
    why = dict_path if spm_model is None else None
    if spm_model is not None:
        dictionary = load_text_dictionary(dict_path)
        if len(dictionary) != values["vocab_size"]:
            why = f"{dict_path} (+ <mask>) has {len(dictionary)} symbols, the model {values['vocab_size']}"
        else:
            try:
                return write_hf_tokenizer(out_dir, spm_model, dictionary)
            except ValueError as e:
                why = str(e)
    return (f"no tokenizer is written ({why}): token ids are fairseq dictionary indices (pad {values['pad_token_id']}); "
            "Meta's checkpoints use RoBERTa's GPT-2 BPE: AutoTokenizer.from_pretrained('FacebookAI/roberta-base')")


def _write_ctc_processor(out_dir: str, features, symbols: List[str]) -> str:
    """A Wav2Vec2Processor (feature extractor + letter tokenizer) for a CTC model: the letter
    dictionary in its order, ``<s>`` the blank (transformers' pad token), ``|`` between words."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2Processor

    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump({s: i for i, s in enumerate(symbols)}, f, indent=1)
    tokenizer = Wav2Vec2CTCTokenizer(os.path.join(out_dir, "vocab.json"), bos_token=None, eos_token=None,
                                     unk_token="<unk>", pad_token="<s>", word_delimiter_token="|")
    Wav2Vec2Processor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(out_dir)
    return "CTC letters as a Wav2Vec2Processor (AutoProcessor.from_pretrained; the blank <s> is its pad token)"


def _write_image_processor(out_dir: str, size: int) -> None:
    values = dict(
        do_resize=True,
        size={"height": size, "width": size},
        do_center_crop=False,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_reduce_labels=False,
    )
    try:
        from transformers import BeitImageProcessor

        BeitImageProcessor(**values).save_pretrained(out_dir)
    except ImportError:  # no vision extras: the same file by hand
        values["image_processor_type"] = "BeitImageProcessor"
        with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
            json.dump(values, f, indent=2)


# ---- import ----------------------------------------------------------------------------
def _hf_config(hf_dir: str):
    from transformers import AutoConfig

    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"Hugging Face model directory {hf_dir} does not exist")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"{hf_dir} holds no config.json: not a Hugging Face model directory")
    with open(os.path.join(hf_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in OUR_ARCHS:
        raise ValueError(
            f"{hf_dir}: model_type {model_type!r} is not supported; d2v-import-hf reads {sorted(OUR_ARCHS)} "
            "(transformers' data2vec 1.0 models)"
        )
    return OUR_ARCHS[model_type], AutoConfig.from_pretrained(hf_dir)


def import_hf(hf_dir: str, out_checkpoint: str) -> Dict[str, Any]:
    """Convert a transformers data2vec 1.0 directory (``Data2VecText/Audio/VisionModel`` or a
    task model built on one) into a d2v_plugin checkpoint ``{"cfg": {"model": {...}}, "model": state}``
    that :func:`d2v_plugin.load_encoder` and fine-tuning (``model.model_path``) read.

    Parameters that data2vec pretraining has but the HF model lacks (text: the regression
    head; speech / vision: ``final_proj``, vision: ``mask_emb``) are freshly initialised and
    listed in the summary's ``initialised``. Returns a summary dict.
    """
    from transformers import AutoModel

    from ..checkpoints import VocabularyInfo, _TaskInfo, model_config
    from ..models.architectures import architecture

    arch, hf_config = _hf_config(hf_dir)
    values = {"data2vec_text": _our_text_config, "data2vec_audio": _our_audio_config, "data2vec_vision": _our_vision_config}[arch](hf_config)
    hf_model = AutoModel.from_pretrained(hf_dir, dtype=torch.float32)
    hf_state = {k: v.detach().float().cpu() for k, v in hf_model.state_dict().items()}
    prefix = getattr(hf_model, "base_model_prefix", "")
    if prefix and any(k.startswith(prefix + ".") for k in hf_state):  # a task model: its base model only
        hf_state = {k[len(prefix) + 1:]: v for k, v in hf_state.items() if k.startswith(prefix + ".")}
    notes: List[str] = []
    eps = getattr(hf_config, "layer_norm_eps", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        notes.append(f"layer_norm_eps={eps:g} in the HF config; d2v_plugin's LayerNorms use 1e-5 (outputs differ slightly)")
    state = from_hf_state(arch, hf_state)
    task = None
    if arch == "data2vec_text":
        tt = hf_state.get("embeddings.token_type_embeddings.weight")
        if tt is not None and tt[0].abs().max() > 0:
            # every token gets token type 0: fold its embedding into the word embeddings
            state["encoder.local_encoder.embed_tokens.weight"] = state["encoder.local_encoder.embed_tokens.weight"] + tt[0]
            notes.append("the token type 0 embedding is folded into the token embeddings (other token types are dropped)")
        task = _TaskInfo(VocabularyInfo(state["encoder.local_encoder.embed_tokens.weight"].size(0), pad=hf_config.pad_token_id))
        notes.append("no dictionary is written: use the tokenizer / fairseq dictionary of the original model (pad index 1)")
    a = architecture(arch)
    cfg = model_config(dict(values), a.config)
    cfg.skip_ema = True
    fresh = a.model(cfg, task=task, skip_ema=True).state_dict()
    unknown = sorted(set(state) - set(fresh))
    if unknown:
        raise ValueError(f"{hf_dir}: converted weights without a place in the d2v_plugin model: {unknown[:8]}")
    initialised = sorted(k for k in fresh if k not in state and not (OUR_SKIP.get(arch) and OUR_SKIP[arch].match(k)))
    for key, value in fresh.items():
        if key not in state:
            state[key] = value
        elif tuple(state[key].shape) != tuple(value.shape):
            raise ValueError(f"{hf_dir}: {key} has shape {tuple(state[key].shape)}; the config describes {tuple(value.shape)}")
    ckpt = {"cfg": {"model": values}, "model": state, "hf_import": {"source": os.path.abspath(hf_dir), "model_type": hf_config.model_type}}
    os.makedirs(os.path.dirname(os.path.abspath(out_checkpoint)), exist_ok=True)
    torch.save(ckpt, out_checkpoint)
    return {
        "arch": arch,
        "model_type": hf_config.model_type,
        "out_checkpoint": out_checkpoint,
        "num_parameters": sum(v.numel() for k, v in state.items() if k not in initialised),
        "initialised": initialised,
        "notes": notes,
    }


def import_main(argv: Optional[Sequence[str]] = None) -> int:
    """``d2v-import-hf DIR --out CHECKPOINT``."""
    parser = argparse.ArgumentParser(
        prog="d2v-import-hf",
        description="Convert a Hugging Face transformers data2vec 1.0 model directory (data2vec-text, data2vec-audio, "
        "data2vec-vision) into a d2v_plugin checkpoint for d2v_plugin.load_encoder and fine-tuning (model.model_path).",
    )
    parser.add_argument("hf_dir", metavar="DIR", help="transformers model directory (config.json + model.safetensors or pytorch_model.bin)")
    parser.add_argument("--out", required=True, metavar="CHECKPOINT", help="path of the d2v_plugin checkpoint (.pt) to write")
    args = parser.parse_args(argv)
    try:
        summary = import_hf(args.hf_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"d2v-import-hf: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(import_main())
