"""data2vec 1.0 vision (``data2vec_vision``): a BEiT-style ViT trained with block masking.

An image becomes a CLS token followed by its patch embeddings (no absolute positions:
every block adds one *shared* relative position bias to its attention logits, BEiT's
table over patch offsets plus three entries for CLS -> patch, patch -> CLS and
CLS -> CLS). The student sees the whole sequence, with the masked patches replaced by a
learned ``mask_emb``; BEiT's block masking picks them (rectangles of random area and aspect
ratio, :func:`d2v_plugin.models.block_masking.beit_block_mask`). Blocks are pre-norm with
layer scale (``gamma_1`` / ``gamma_2``) and query/value biases only; a final LayerNorm
closes the encoder. The teacher is an EMA copy of ``encoder`` (relative position table
included) run on the unmasked ``cat(cls_emb, patch_embed(img))`` of the student.

Where we differ from Meta's ``examples/data2vec/models/data2vec_vision.py`` on purpose
(``../shared/compat/STEPS.md``, Surprises 7 to 9):

- ``apply_final_proj`` (default true): Meta builds ``final_proj`` but never applies it, so
  its student regresses the targets with the encoder's own final-LayerNorm output and the
  head is dead weight (it also makes plain DDP fail on a parameter without gradient).
  We apply it, as data2vec 1.0 audio (``final_proj``) and text (``regression_head``) do,
  which frees the encoder's output from having to *be* the target space. Meta's
  checkpoints (no ``apply_final_proj`` in their config) load with ``apply_final_proj=false``
  and train exactly as Meta's code does.
- masks are drawn from the reproducible torch generator of
  :func:`d2v_plugin.models.masking.mask_generator` (seed, update, sample ids) instead of
  Python's unseeded ``random``: a run can be repeated and resumed bit for bit.
- ``shared_rel_pos_bias=false`` (one table per block) is refused: Meta's code for it is
  an ``assert 1==2`` left from debugging.
- ``cls_emb`` / ``mask_emb`` start as truncated normals with std 0.02 (BEiT's
  initialisation; Meta's call passes 0.02 as the *mean* with std 1).
"""

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from fairseq.models import register_model

from ..architectures import Architecture, register_architecture
from ..block_masking import beit_block_mask
from ..blocks import Block
from ..modalities.image import PatchEmbed
from .base import Data2VecV1CommonConfig, Data2VecV1Model
from .meta_names import NameTable

logger = logging.getLogger(__name__)


@dataclass
class Data2VecVisionConfig(Data2VecV1CommonConfig):
    """Meta's ``Data2VecVisionConfig`` fields (same names and defaults) plus ``apply_final_proj``."""

    layer_scale_init_value: float = field(
        default=1e-4, metadata={"help": "initial value of the per-channel layer scales gamma_1/gamma_2 of every block; 0 = no layer scale"}
    )
    num_mask_patches: int = field(default=75, metadata={"help": "patches BEiT block masking tries to mask per image (at most this many)"})
    min_mask_patches_per_block: int = field(default=16, metadata={"help": "smallest area (in patches) of one masked rectangle"})
    max_mask_patches_per_block: int = field(default=196, metadata={"help": "largest number of patches one masked rectangle may add"})
    image_size: int = field(default=224, metadata={"help": "height and width of the (square) input images, in pixels"})
    patch_size: int = field(default=16, metadata={"help": "side of the square patches the images are cut into"})
    in_channels: int = field(default=3, metadata={"help": "channels of the input images"})
    shared_rel_pos_bias: bool = field(
        default=True,
        metadata={"help": "one relative position bias shared by all blocks (BEiT). Only true is supported: "
                  "Meta's per-block variant (false) is unfinished debugging code"},
    )
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth rate of the last block (rising linearly from 0 at the first)"})
    attention_dropout: float = field(default=0.0, metadata={"help": "dropout on the attention probabilities"})
    depth: int = field(default=12, metadata={"help": "number of transformer blocks"})
    embed_dim: int = field(default=768, metadata={"help": "width of the patch embeddings and of every block"})
    num_heads: int = field(default=12, metadata={"help": "attention heads per block"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "hidden width of the feed-forward networks / embed_dim"})
    end_of_block_targets: bool = field(
        default=True,
        metadata={"help": "targets average the teacher's block outputs; false = the layer-scaled feed-forward "
                  "outputs before the residual (gamma_2 * mlp(norm2(x)))"},
    )
    ema_transformer_only: bool = field(
        default=True,
        metadata={"help": "the teacher is an EMA copy of the encoder (blocks, relative position bias, final norm) and "
                  "reads the student's unmasked patch embeddings. Only true is supported"},
    )
    apply_final_proj: bool = field(
        default=True,
        metadata={"help": "predict the targets with the linear head final_proj on the student's output. false = Meta's "
                  "data2vec_vision, which builds final_proj but never applies it (the encoder's final-LayerNorm output "
                  "is the prediction); Meta's checkpoints load with false"},
    )


def relative_position_index(grid_h: int, grid_w: int) -> torch.Tensor:
    """(T, T) long, T = grid_h * grid_w + 1 (CLS first): the row of the bias table for each
    (query, key) pair. Patch pairs index their offset ``(dr, dc)`` as
    ``(dr + grid_h - 1) * (2 * grid_w - 1) + dc + grid_w - 1``; the last three rows of the
    table are CLS -> patch, patch -> CLS and CLS -> CLS (BEiT's layout, which Meta's
    checkpoints store as the buffer ``relative_position_index``)."""
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    dr = rows[:, None] - rows[None, :] + grid_h - 1
    dc = cols[:, None] - cols[None, :] + grid_w - 1
    num_offsets = (2 * grid_h - 1) * (2 * grid_w - 1)
    n = grid_h * grid_w + 1
    index = torch.empty(n, n, dtype=torch.long)
    index[1:, 1:] = dr * (2 * grid_w - 1) + dc
    index[0, :] = num_offsets  # CLS -> patch
    index[:, 0] = num_offsets + 1  # patch -> CLS
    index[0, 0] = num_offsets + 2  # CLS -> CLS
    return index


class RelativePositionBias(nn.Module):
    """BEiT's learned relative position bias: ``forward()`` -> (num_heads, T, T), CLS included."""

    def __init__(self, grid_h: int, grid_w: int, num_heads: int):
        super().__init__()
        self.grid = (grid_h, grid_w)
        num_entries = (2 * grid_h - 1) * (2 * grid_w - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_entries, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(grid_h, grid_w))

    def forward(self) -> torch.Tensor:
        n = self.relative_position_index.size(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous()


class VisionEncoder(nn.Module):
    """Shared relative position bias, pre-norm blocks with layer scale, final LayerNorm.

    ``forward(x, padding_mask, collect)``: ``x`` (B, T, C) with CLS first -> the normalised
    output (B, T, C) and, per block, ``collect="targets"``: the block output
    (``end_of_block_targets``) or ``gamma_2 * mlp(norm2(x))``, ``"outputs"``: the block
    output, None: nothing (the final norm is not applied to those).
    """

    def __init__(self, cfg: Data2VecVisionConfig, grid):
        super().__init__()
        self.end_of_block_targets = cfg.end_of_block_targets
        self.rel_pos_bias = RelativePositionBias(grid[0], grid[1], cfg.num_heads)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist() if cfg.depth > 0 else []
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim,
                cfg.num_heads,
                cfg.mlp_ratio,
                qkv_bias="qv",
                attn_drop=cfg.attention_dropout,
                drop_path=rates[i],
                layer_norm_first=True,
                ffn_residual=True,
                ffn_targets=True,  # forward picks the block output or the FFN branch
                layer_scale_init=cfg.layer_scale_init_value,
            )
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        """BEiT's initialisation: truncated normal (std 0.02) Linear weights, zero biases, unit
        LayerNorms, then each block's output projections divided by sqrt(2 * block number)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x, padding_mask=None, collect: Optional[str] = None):
        bias = self.rel_pos_bias().unsqueeze(0)
        collected = []
        for blk in self.blocks:
            x, t = blk(x, padding_mask, bias)
            if collect == "outputs" or (collect == "targets" and self.end_of_block_targets):
                collected.append(x)
            elif collect == "targets":
                # Meta's fc_feature is the feed-forward branch after layer scale
                collected.append(t if blk.gamma_2 is None else blk.gamma_2 * t)
        return self.norm(x), collected


@register_model("data2vec_vision", dataclass=Data2VecVisionConfig)
class Data2VecVisionModel(Data2VecV1Model):
    """data2vec 1.0 vision; see the module docstring. Parameter names are Meta's except
    ``patch_embed.proj`` and ``mlp.fc1`` / ``mlp.fc2`` (:data:`META_NAMES`)."""

    mode = "IMAGE"
    num_extra_tokens = 1

    def __init__(self, cfg: Data2VecVisionConfig, task=None, skip_ema: bool = False):
        super().__init__()
        if not cfg.shared_rel_pos_bias:
            raise ValueError(
                "model.shared_rel_pos_bias=false (a relative position bias per block) is not supported: Meta's "
                "data2vec_vision stops there with `assert 1==2`; use shared_rel_pos_bias=true"
            )
        if not cfg.ema_transformer_only:
            raise ValueError("model.ema_transformer_only=false (a teacher of the whole model) is not supported; use true")
        if cfg.image_size % cfg.patch_size != 0:
            raise ValueError(f"model.image_size {cfg.image_size} is not a multiple of model.patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_channels, cfg.embed_dim)
        self.grid = self.patch_embed.grid
        if cfg.num_mask_patches > self.grid[0] * self.grid[1]:
            raise ValueError(f"model.num_mask_patches {cfg.num_mask_patches} exceeds the {self.grid[0] * self.grid[1]} patches of an image")
        self.cls_emb = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        nn.init.trunc_normal_(self.mask_emb, std=0.02)
        self.encoder = VisionEncoder(cfg, self.grid)
        self.final_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        if cfg.average_top_k_layers > cfg.depth:
            logger.warning(f"model.average_top_k_layers={cfg.average_top_k_layers} > depth={cfg.depth}: the targets average all {cfg.depth} blocks")
        self._init_teacher(skip_ema)

    @classmethod
    def build_model(cls, cfg: Data2VecVisionConfig, task=None):
        return cls(cfg, task=task, skip_ema=cfg.skip_ema)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def max_positions(self):
        return None

    # ---- hooks of Data2VecV1Model ----------------------------------------------------
    def encoder_input(self, source, padding_mask=None):
        x = self.patch_embed(source)
        cls = self.cls_emb.expand(x.size(0), -1, -1).to(x.dtype)
        return torch.cat((cls, x), dim=1), None

    def draw_mask(self, x, padding_mask, generator: Optional[torch.Generator]) -> torch.Tensor:
        cfg = self.cfg
        return beit_block_mask(
            x.size(0), self.grid[0], self.grid[1], cfg.num_mask_patches,
            cfg.min_mask_patches_per_block, cfg.max_mask_patches_per_block,
            device=x.device, generator=generator,
        )

    def apply_mask(self, x, mask: torch.Tensor, generator: Optional[torch.Generator] = None):
        w = mask.unsqueeze(-1).to(x.dtype)
        patches = x[:, 1:] * (1 - w) + self.mask_emb.to(x.dtype) * w
        return torch.cat((x[:, :1], patches), dim=1)

    def predict(self, x):
        return self.final_proj(x) if self.cfg.apply_final_proj else x

    def remove_pretraining_modules(self, modality=None):
        """Drop the teacher, the head and the mask embedding. The final LayerNorm stays: it is
        part of the encoder's output (``load_encoder``); Meta's fine-tuning replaces it with
        its own norm on the pooled patches."""
        super().remove_pretraining_modules(modality)
        self.final_proj = None
        self.mask_emb = None


# ---- Meta's checkpoints ---------------------------------------------------------------
# (Meta's name piece, ours): the only names that differ. Every other key of Meta's
# data2vec_vision (cls_emb, mask_emb, encoder.rel_pos_bias.*, encoder.blocks.{i}.{norm1,
# attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj, norm2, gamma_1, gamma_2},
# encoder.norm, final_proj) is ours unchanged; the teacher (_ema) holds encoder keys.
META_NAMES = NameTable([
    (r"^patch_embed\.conv\.", "patch_embed.proj."),  # the patch convolution (ours: modalities.image.PatchEmbed)
    (r"^(.*\.)?mlp\.0\.", r"\1mlp.fc1."),  # Meta's mlp is nn.Sequential(Linear, GELU, Linear, Dropout)
    (r"^(.*\.)?mlp\.2\.", r"\1mlp.fc2."),
], "data2vec_vision")


def _rename(key: str) -> str:
    return META_NAMES.lookup(key)[0]


def from_meta_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """Meta's parameter names -> ours (``_ema`` included); our own checkpoints pass unchanged."""
    out = {}
    for key, value in state.items():
        if key == "_ema" and isinstance(value, dict):
            out[key] = type(value)((_rename(k), v) for k, v in value.items())
        else:
            out[_rename(key)] = value
    return out


def from_meta_config(values: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's model config -> ours: Meta's (no ``apply_final_proj``) keeps Meta's
    behaviour, the encoder's output is the prediction."""
    values = dict(values)
    values.setdefault("apply_final_proj", False)
    return values


register_architecture(
    Architecture(
        name="data2vec_vision",
        config=Data2VecVisionConfig,
        model=Data2VecVisionModel,
        modality="IMAGE",
        from_meta_config=from_meta_config,
        from_meta_state=from_meta_state,
    )
)
