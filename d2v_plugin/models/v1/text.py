"""data2vec 1.0 text (``data2vec_text``): a RoBERTa-style post-LN encoder that regresses,
at masked tokens, the layer-normed average of its EMA teacher's top feed-forward outputs.

What this file adds to :class:`~d2v_plugin.models.v1.base.Data2VecV1Model`:

- the encoder: token + learned position embeddings, LayerNorm, dropout
  (:class:`~d2v_plugin.models.modalities.text.TextLocalEncoder`), padded steps zeroed (as
  fairseq's ``TransformerEncoder``), then post-LN blocks; a block's target is its FFN output
  before dropout and residual (Meta's ``fc_result``);
- the masking, done here and not in the task (``d2v_text_pretraining`` yields clean tokens).
  It follows fairseq's ``MaskTokensDataset``: per sequence,
  ``int(mask_prob * length / mask_multiple_length + u)`` span starts (``u`` uniform in [0, 1))
  are drawn without replacement among the sequence's real tokens, each start masks
  ``mask_multiple_length`` tokens, cut at the end of the sequence. Padding is never masked;
  ``<s>`` and ``</s>`` may be, as in ``MaskTokensDataset`` (it masks any token of the item).
  Each selected token becomes ``<mask>``, or stays itself with ``leave_unmasked_prob``, or a
  random token with ``random_token_prob`` (uniform over the ordinary symbols: neither the
  special ones nor ``<mask>``; BERT's 80/10/10 with the defaults);
- the head: ``head_layers`` Linear layers with GELU between them, the first one widening to
  2 x embed_dim (Meta's ``regression_head``).

On purpose different from Meta's:

- the teacher sees the clean sequence. Meta's masked_lm pipeline feeds it ``<pad>`` everywhere
  but at the masked tokens (fairseq issue #4881; ``shared/compat/STEPS.md``, Surprises 2);
- the loss is taken at every selected token, whether it became ``<mask>``, a random token or
  stayed itself (BERT's rule). Meta takes it only where the input is ``<mask>``, so its
  random / unchanged tokens are never predicted (the same when both probabilities are 0,
  as in Meta's recipe);
- the masks are reproducible from (``common.seed``, update, sample ids)
  (:func:`~d2v_plugin.models.masking.mask_generator`).

Meta's checkpoints load through :data:`META_NAMES` (parameter names) and
:func:`from_meta_config` (its nested ``transformer`` config).
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from fairseq.models import register_model
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from omegaconf import II

from ..architectures import Architecture, register_architecture
from ..blocks import Block, Mlp, run_stack
from ..data2vec2 import plain_config
from ..modalities.text import TextConfig, TextLocalEncoder
from .base import Data2VecV1CommonConfig, Data2VecV1Model
from .meta_names import NameTable

logger = logging.getLogger(__name__)


@dataclass
class Data2VecTextConfig(Data2VecV1CommonConfig):
    embed_dim: int = field(default=768, metadata={"help": "model width"})
    ffn_embed_dim: int = field(default=3072, metadata={"help": "hidden width of each block's feed-forward network"})
    layers: int = field(default=12, metadata={"help": "number of transformer blocks"})
    attention_heads: int = field(default=12, metadata={"help": "attention heads per block"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the embeddings, after attention and after the feed-forward network"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on the attention weights"})
    activation_dropout: float = field(
        default=0.0,
        metadata={"help": "dropout after the feed-forward activation (and, unlike fairseq's layer, once more after fc2)"},
    )
    encoder_layerdrop: float = field(default=0.0, metadata={"help": "probability of skipping a block in training (student only)"})
    max_positions: int = field(default=II("task.tokens_per_sample"), metadata={"help": "longest sequence: the learned position table covers this many positions"})
    no_scale_embedding: bool = field(default=True, metadata={"help": "do not multiply token embeddings by sqrt(embed_dim)"})
    layernorm_embedding: bool = field(default=True, metadata={"help": "LayerNorm on the summed token and position embeddings"})
    learned_pos: bool = field(default=True, metadata={"help": "learned (true) or sinusoidal (false) position embeddings"})
    head_layers: int = field(
        default=2,
        metadata={"help": "Linear layers of the regression head (GELU between; the first widens to 2 x embed_dim); Meta's recipe: 2"},
    )
    ema_transformer_layers_only: bool = field(
        default=True,
        metadata={"help": "the teacher averages only the transformer blocks and copies the embeddings (and their LayerNorm) from the student"},
    )
    mask_prob: float = field(default=0.15, metadata={"help": "fraction of each sequence's tokens selected for prediction (span starts: mask_prob / mask_multiple_length)"})
    mask_multiple_length: int = field(default=1, metadata={"help": "each selection masks this many consecutive tokens"})
    leave_unmasked_prob: float = field(default=0.1, metadata={"help": "a selected token stays itself with this probability (still predicted)"})
    random_token_prob: float = field(default=0.1, metadata={"help": "a selected token becomes a random ordinary token with this probability (still predicted)"})


# Meta's parameter names (``Data2VecTextModel`` of fairseq examples/data2vec, whose encoder is
# fairseq's TransformerEncoder) -> ours. Several Meta tensors that map to one name are
# concatenated along dim 0 in the order of this table (q, k, v -> attn.qkv). ``None``: dropped.
# The teacher (Meta's ``encoder._ema``, names relative to ``sentence_encoder``) is mapped with
# the same table (see :func:`meta_teacher_name`).
META_NAMES = NameTable([
    (r"^encoder\.sentence_encoder\.version$", None),
    (r"^encoder\.sentence_encoder\.embed_tokens\.(.+)$", r"encoder.local_encoder.embed_tokens.\1"),
    (r"^encoder\.sentence_encoder\.embed_positions\.(.+)$", r"encoder.local_encoder.embed_positions.\1"),
    (r"^encoder\.sentence_encoder\.layernorm_embedding\.(.+)$", r"encoder.local_encoder.layernorm_embedding.\1"),
    (r"^encoder\.sentence_encoder\.layers\.(\d+)\.self_attn\.q_proj\.(.+)$", r"encoder.blocks.\1.attn.qkv.\2"),
    (r"^encoder\.sentence_encoder\.layers\.(\d+)\.self_attn\.k_proj\.(.+)$", r"encoder.blocks.\1.attn.qkv.\2"),
    (r"^encoder\.sentence_encoder\.layers\.(\d+)\.self_attn\.v_proj\.(.+)$", r"encoder.blocks.\1.attn.qkv.\2"),
    (r"^encoder\.sentence_encoder\.layers\.(\d+)\.self_attn\.out_proj\.(.+)$", r"encoder.blocks.\1.attn.proj.\2"),
    (r"^encoder\.sentence_encoder\.layers\.(\d+)\.self_attn_layer_norm\.(.+)$", r"encoder.blocks.\1.norm1.\2"),
    (r"^encoder\.sentence_encoder\.layers\.(\d+)\.fc1\.(.+)$", r"encoder.blocks.\1.mlp.fc1.\2"),
    (r"^encoder\.sentence_encoder\.layers\.(\d+)\.fc2\.(.+)$", r"encoder.blocks.\1.mlp.fc2.\2"),
    (r"^encoder\.sentence_encoder\.layers\.(\d+)\.final_layer_norm\.(.+)$", r"encoder.blocks.\1.norm2.\2"),
    (r"^encoder\.regression_head\.(.+)$", r"regression_head.\1"),
], "data2vec_text", strict=True)
META_PREFIX = "encoder.sentence_encoder."  # what Meta's teacher names are relative to
OUR_TEACHER_PREFIX = "encoder."  # what ours are relative to


def meta_name(name: str):
    """(our name, rank in the table) for one of Meta's parameter names; (None, rank) = dropped."""
    return META_NAMES.lookup(name)


def meta_teacher_name(name: str) -> Optional[str]:
    """Our teacher name (relative to ``encoder``) for a key of Meta's ``encoder._ema``."""
    ours, _ = meta_name(META_PREFIX + name)
    if ours is None:
        return None
    if not ours.startswith(OUR_TEACHER_PREFIX):
        raise KeyError(f"Meta's teacher key {name!r} maps outside the encoder ({ours})")
    return ours[len(OUR_TEACHER_PREFIX):]


def from_meta_teacher(teacher: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Meta's ``encoder._ema`` (names relative to ``sentence_encoder``) -> our ``_ema``."""
    return META_NAMES.convert(teacher, lambda k: (meta_teacher_name(k), meta_name(META_PREFIX + k)[1]))


def from_meta_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's model state under our names (identity for our own checkpoints)."""
    if not any(k.startswith(META_PREFIX) for k in state):
        return state
    state = dict(state)
    teacher = state.pop("encoder._ema", None)
    out = META_NAMES.convert(state)
    if teacher is not None:
        out["_ema"] = from_meta_teacher(teacher)
    return out


def from_meta_config(values: Dict[str, Any]) -> Dict[str, Any]:
    """Meta's ``data2vec_text`` config (nested ``transformer``) -> our flat fields; ours unchanged."""
    t = values.get("transformer")
    if not isinstance(t, dict):
        return values
    enc = t.get("encoder") or {}
    unsupported = {
        "transformer.encoder.normalize_before": (enc.get("normalize_before", False), False),
        "transformer.activation_fn": (t.get("activation_fn", "relu"), "gelu"),
        "transformer.no_token_positional_embeddings": (t.get("no_token_positional_embeddings", False), False),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"data2vec_text checkpoint with {key}={value!r}: d2v_plugin builds only {key}={supported!r} (Meta's recipe)")
    out = {k: v for k, v in values.items() if k not in ("transformer", "max_positions", "load_checkpoint_heads")}
    out.update(
        embed_dim=enc["embed_dim"],
        ffn_embed_dim=enc["ffn_embed_dim"],
        layers=enc["layers"],
        attention_heads=enc["attention_heads"],
        encoder_layerdrop=enc.get("layerdrop", 0.0),
        learned_pos=enc.get("learned_pos", False),
        dropout=t.get("dropout", 0.1),
        attention_dropout=t.get("attention_dropout", 0.0),
        activation_dropout=t.get("activation_dropout", 0.0),
        # fairseq's TransformerEncoder sizes its positions by max_source_positions, not max_positions
        max_positions=t.get("max_source_positions", values.get("max_positions")),
        no_scale_embedding=t.get("no_scale_embedding", False),
        layernorm_embedding=t.get("layernorm_embedding", False),
    )
    # Meta masks in its task (not in cfg.model): its recipe's masking, to continue pretraining alike
    out.setdefault("mask_prob", 0.35)
    out.setdefault("mask_multiple_length", 4)
    out.setdefault("leave_unmasked_prob", 0.0)
    out.setdefault("random_token_prob", 0.0)
    return out


class TextEncoderV1(nn.Module):
    """Embeddings (``local_encoder``) and post-LN blocks: what the EMA teacher copies."""

    def __init__(self, cfg: Data2VecTextConfig, vocab_size: int, pad_idx: int):
        super().__init__()
        self.pad_idx = pad_idx
        self.layerdrop = cfg.encoder_layerdrop
        local = TextConfig(
            max_source_positions=cfg.max_positions,
            learned_pos=cfg.learned_pos,
            dropout=cfg.dropout,
            no_scale_embedding=cfg.no_scale_embedding,
            layernorm_embedding=cfg.layernorm_embedding,
        )
        self.local_encoder = TextLocalEncoder(local, vocab_size, cfg.embed_dim, pad_idx)
        blocks = []
        for _ in range(cfg.layers):
            blk = Block(
                cfg.embed_dim,
                cfg.attention_heads,
                mlp_ratio=cfg.ffn_embed_dim / cfg.embed_dim,
                qkv_bias=True,
                drop=cfg.dropout,
                attn_drop=cfg.attention_dropout,
                mlp_drop=cfg.activation_dropout,
                post_mlp_drop=cfg.dropout,
                layer_norm_first=False,
                ffn_targets=True,
            )
            if blk.mlp.fc1.out_features != cfg.ffn_embed_dim:  # a width that is no whole ratio
                blk.mlp = Mlp(cfg.embed_dim, cfg.ffn_embed_dim, drop=cfg.activation_dropout)
            blocks.append(blk)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, tokens, padding_mask=None, collect: Optional[str] = None):
        x = self.local_encoder(tokens)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)  # as fairseq's TransformerEncoder
        return run_stack(self.blocks, x, padding_mask, collect=collect, layerdrop=self.layerdrop, training=self.training)


def regression_head(dim: int, layers: int) -> nn.Sequential:
    """Meta's head: ``layers`` Linear layers, GELU between them, the first widening to 2 x dim."""
    if layers < 1:
        raise ValueError(f"model.head_layers={layers}: the regression head needs at least one layer")
    mods, cur = [], dim
    for i in range(layers - 1):
        nxt = 2 * dim if i == 0 else cur
        mods += [nn.Linear(cur, nxt), nn.GELU()]
        cur = nxt
    mods.append(nn.Linear(cur, dim))
    return nn.Sequential(*mods)


def _mask_index(dictionary) -> int:
    """``<mask>``: our tasks and Meta's masked_lm append it as the last symbol."""
    if hasattr(dictionary, "indices"):
        idx = dictionary.index("<mask>")
        if idx == dictionary.unk():
            raise ValueError("the dictionary has no <mask> symbol (load it with d2v_plugin.tasks._common.load_text_dictionary)")
        return idx
    return len(dictionary) - 1


@register_model("data2vec_text", dataclass=Data2VecTextConfig)
class Data2VecTextModel(Data2VecV1Model):
    mode = "TEXT"

    def __init__(self, cfg: Data2VecTextConfig, task=None, skip_ema: bool = False):
        super().__init__()
        self.cfg = cfg = plain_config(cfg)
        dictionary = getattr(task, "source_dictionary", None) if task is not None else None
        if dictionary is None:
            raise ValueError("data2vec_text needs a task with a source dictionary (or d2v_plugin.checkpoints.VocabularyInfo)")
        if not 0 <= cfg.leave_unmasked_prob + cfg.random_token_prob <= 1:
            raise ValueError("model.leave_unmasked_prob + model.random_token_prob must lie in [0, 1]")
        self.pad_idx = dictionary.pad()
        self.mask_idx = _mask_index(dictionary)
        self.vocab_size = len(dictionary)
        self.nspecial = getattr(dictionary, "nspecial", 4)  # <s>, <pad>, </s>, <unk>
        self.encoder = TextEncoderV1(cfg, self.vocab_size, self.pad_idx)
        self.regression_head = regression_head(cfg.embed_dim, cfg.head_layers)
        self.apply(init_bert_params)  # BERT's init, as Meta's (normal(0, 0.02), padding row 0)
        self._init_teacher(skip_ema)

    @classmethod
    def build_model(cls, cfg: Data2VecTextConfig, task=None):
        return cls(cfg, task=task, skip_ema=cfg.skip_ema)

    def ema_copied(self, name: str) -> bool:
        """Meta's ``ema_transformer_layers_only``: embeddings and their LayerNorm are copied."""
        return self.cfg.ema_transformer_layers_only and name.startswith("local_encoder.")

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def max_positions(self):
        return self.cfg.max_positions

    def remove_pretraining_modules(self, modality=None):
        super().remove_pretraining_modules(modality)
        self.regression_head = None

    # ---- hooks of Data2VecV1Model --------------------------------------------------
    def encoder_input(self, source, padding_mask):
        """The tokens and their padding (from the tokens, as Meta's; None when nothing is padded)."""
        pm = source.eq(self.pad_idx)
        return source, (pm if pm.any() else None)

    def draw_mask(self, x, padding_mask, generator: Optional[torch.Generator]) -> torch.Tensor:
        """(B, T) bool, True = selected: spans as fairseq's MaskTokensDataset draws them, never on padding."""
        cfg = self.cfg
        B, T = x.shape
        real = torch.ones(B, T, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        lengths = real.sum(1)
        span = cfg.mask_multiple_length
        u = torch.rand(B, generator=generator, device=x.device)
        num_starts = (cfg.mask_prob * lengths.double() / span + u.double()).long().clamp(max=lengths)
        noise = torch.rand(B, T, generator=generator, device=x.device).masked_fill(~real, 2.0)
        rank = noise.argsort(dim=1).argsort(dim=1)  # random order of the real tokens, padding last
        starts = rank < num_starts.unsqueeze(1)
        mask = starts.clone()
        for i in range(1, span):
            mask[:, i:] |= starts[:, :-i]
        mask &= real  # spans end at the end of the sequence
        return mask

    def apply_mask(self, x, mask: torch.Tensor, generator: Optional[torch.Generator] = None):
        """The student's tokens: selected ones -> ``<mask>``, or unchanged (``leave_unmasked_prob``),
        or a random ordinary token (``random_token_prob``); drawn with the mask generator."""
        cfg = self.cfg
        out = x.clone()
        replace = mask
        leave, rand = cfg.leave_unmasked_prob, cfg.random_token_prob
        if leave + rand > 0:
            u = torch.rand(x.shape, generator=generator, device=x.device)
            random_pos = mask & (u >= leave) & (u < leave + rand)
            replace = mask & (u >= leave + rand)
            if random_pos.any():
                # uniform over the ordinary symbols [nspecial, vocab) without <mask>
                tokens = torch.randint(self.nspecial, self.vocab_size - 1, x.shape, generator=generator, device=x.device)
                tokens = tokens + (tokens >= self.mask_idx).long()
                out[random_pos] = tokens[random_pos]
        out[replace] = self.mask_idx
        return out

    def predict(self, x):
        return self.regression_head(x)


register_architecture(
    Architecture(
        name="data2vec_text",
        config=Data2VecTextConfig,
        model=Data2VecTextModel,
        modality="TEXT",
        from_meta_config=from_meta_config,
        from_meta_state=from_meta_state,
        vocab_key="encoder.local_encoder.embed_tokens.weight",
    )
)
