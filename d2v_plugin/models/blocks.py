"""Transformer building blocks shared by every data2vec 2.0 modality.

Parameter names (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``norm1``,
``norm2``) follow Meta's released checkpoints so that they load without renaming.
"""

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth


class Attention(nn.Module):
    """Multi-head self-attention on ``F.scaled_dot_product_attention``.

    ``padding_mask`` (B, T) is True at padded keys; ``alibi_bias`` (B or 1, H', T, T) is an
    additive bias for the first H' heads (ALiBi, or BEiT's relative position bias).

    ``qkv_bias``: True = one bias for queries, keys and values; ``"qv"`` = learned query and
    value biases only (``q_bias``, ``v_bias``; BEiT / data2vec 1.0 vision: a key bias adds
    the same amount to every logit of a query, so it cannot change the attention).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias=True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias is True)
        self.q_bias = self.v_bias = None
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, padding_mask: Optional[torch.Tensor] = None, alibi_bias: Optional[torch.Tensor] = None):
        B, T, C = x.shape
        if self.q_bias is not None:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias)))
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.view(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = attention_bias(padding_mask, alibi_bias, self.num_heads, T)
        dtype = q.dtype
        if bias is not None and bias.is_floating_point() and bias.dtype != dtype:
            # an ALiBi bias stays float32, and so do the logits it is added to (as Meta's):
            # in bf16 a bias beyond 128 would be rounded to whole numbers
            q, k, v = q.to(bias.dtype), k.to(bias.dtype), v.to(bias.dtype)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.to(dtype).transpose(1, 2).reshape(B, T, C)
        return self.proj_drop(self.proj(x))


def attention_bias(padding_mask, alibi_bias, num_heads: int, T: int):
    """Combine a key padding mask and an ALiBi bias into one mask, or None.

    Without ALiBi: a boolean mask (True = attend). With ALiBi: an additive float32 bias
    (``-inf`` at padded keys), the bias for the first H' heads and 0 for the others.
    """
    if padding_mask is not None and not padding_mask.any():
        padding_mask = None
    if padding_mask is None and alibi_bias is None:
        return None
    if alibi_bias is None:
        # boolean mask: True = attend
        return ~padding_mask[:, None, None, :]
    bias = alibi_bias.float()
    if bias.size(1) < num_heads:
        bias = F.pad(bias, (0, 0, 0, 0, 0, num_heads - bias.size(1)))
    if padding_mask is not None:
        bias = bias.masked_fill(padding_mask[:, None, None, :], float("-inf"))
    return bias


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """A transformer block that also returns the tensor data2vec regresses.

    ``layer_norm_first`` picks pre-norm or post-norm (Meta's text, speech and image
    recipes are all post-norm). ``ffn_targets``: the target is the feed-forward output
    before the residual connection (data2vec 2.0's default) rather than the block output.

    ``ffn_residual`` (pre-norm only): the textbook ``x + mlp(norm2(x))``. False is Meta's
    ``AltBlock``, whose pre-norm path returns ``mlp(norm2(x)) + mlp(norm2(x))`` and drops the
    residual stream around the feed-forward network; Meta's pre-norm checkpoints need it.

    ``layer_scale_init`` > 0 (pre-norm only): learned per-channel scales ``gamma_1`` /
    ``gamma_2`` on the attention and feed-forward branches, starting at that value (CaiT /
    BEiT layer scale; data2vec 1.0 vision).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        mlp_drop: float = 0.0,
        post_mlp_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        layer_norm_first: bool = True,
        ffn_targets: bool = True,
        ffn_residual: bool = True,
        layer_scale_init: float = 0.0,
    ):
        super().__init__()
        if layer_scale_init > 0 and not layer_norm_first:
            raise ValueError("layer_scale_init (gamma_1/gamma_2) needs pre-norm blocks (layer_norm_first)")
        self.layer_norm_first = layer_norm_first
        self.ffn_targets = ffn_targets
        self.ffn_residual = ffn_residual
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=mlp_drop)
        self.post_mlp_dropout = nn.Dropout(post_mlp_drop)
        self.gamma_1 = self.gamma_2 = None
        if layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    # set by set_activation_checkpointing: recompute this block's activations in the backward
    # pass instead of keeping them (training with gradients only)
    activation_checkpointing = False

    def forward(self, x, padding_mask=None, alibi_bias=None):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # non-reentrant: works under DDP and with inputs that need no grad; the RNG state is
            # restored for the recomputation, so dropout draws the same mask twice
            return checkpoint(self._forward, x, padding_mask, alibi_bias, use_reentrant=False)
        return self._forward(x, padding_mask, alibi_bias)

    def _forward(self, x, padding_mask=None, alibi_bias=None):
        if self.layer_norm_first:
            a = self.attn(self.norm1(x), padding_mask, alibi_bias)
            x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
            ffn = self.mlp(self.norm2(x))
            residual = x if self.ffn_residual else ffn
            branch = self.post_mlp_dropout(ffn)
            x = residual + self.drop_path(branch if self.gamma_2 is None else self.gamma_2 * branch)
        else:
            x = self.norm1(x + self.drop_path(self.attn(x, padding_mask, alibi_bias)))
            ffn = self.mlp(x)
            x = self.norm2(x + self.drop_path(self.post_mlp_dropout(ffn)))
        return x, (ffn if self.ffn_targets else x)


def skip_block(x: torch.Tensor, blk: nn.Module) -> torch.Tensor:
    """``x`` past a block that layerdrop skips. In distributed training the block's parameters
    still enter the graph with weight 0, so their gradient is 0 (what fairseq's legacy_ddp fills
    in for a missing gradient) and PyTorch's DDP (ddp_backend=c10d) finds every parameter used,
    instead of stopping at the next step with its unused-parameter error. A single process
    leaves the block's gradients empty, as before."""
    if not (torch.is_grad_enabled() and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1):
        return x
    params = [p for p in blk.parameters() if p.requires_grad]
    if not params:
        return x
    return x + 0.0 * sum(p.sum() for p in params).to(x.dtype)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Turn activation checkpointing on or off in every :class:`Block` of ``model``; return
    how many blocks there are. A teacher copied from the student later inherits the flag, but
    runs without gradients, so it never recomputes."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for blk in blocks:
        blk.activation_checkpointing = bool(enabled)
    return len(blocks)


class BlockStack(nn.Module):
    """A list of blocks run in order (a modality's prenet), with optional LayerNorm and dropout.

    Post-norm models normalise the input, pre-norm models the output.
    """

    def __init__(self, blocks: nn.ModuleList, norm: Optional[nn.Module], layer_norm_first: bool, layerdrop: float, dropout: float):
        super().__init__()
        self.blocks = blocks
        self.norm = norm
        self.layer_norm_first = layer_norm_first
        self.layerdrop = layerdrop
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, padding_mask=None, alibi_bias=None, alibi_scale=None):
        if self.norm is not None and not self.layer_norm_first:
            x = self.norm(x)
        x = self.dropout(x)
        for i, blk in enumerate(self.blocks):
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                x = skip_block(x, blk)
                continue
            x, _ = blk(x, padding_mask, scaled_alibi(alibi_bias, alibi_scale, i))
        if self.norm is not None and self.layer_norm_first:
            x = self.norm(x)
        return x


def run_stack(blocks, x, padding_mask=None, attn_bias=None, collect: Optional[str] = None, layerdrop: float = 0.0, training: bool = False):
    """Run ``blocks`` in order; return the output and, per block run, what ``collect`` asks
    for: ``"targets"`` (what the block offers as a regression target), ``"outputs"`` (the
    block output) or None (nothing). ``layerdrop``: skip each block with this probability
    when ``training``. ``attn_bias``: one additive attention bias for every block."""
    collected = []
    for blk in blocks:
        if training and layerdrop > 0 and torch.rand(()) < layerdrop:
            x = skip_block(x, blk)
            continue
        x, t = blk(x, padding_mask, attn_bias)
        if collect is not None:
            collected.append(t if collect == "targets" else x)
    return x, collected


def scaled_alibi(alibi_bias, alibi_scale, layer: int):
    """The ALiBi bias for one layer: a per-layer learned scale applies when given."""
    if alibi_bias is None or alibi_scale is None:
        return alibi_bias
    scale = alibi_scale[layer] if alibi_scale.size(0) > 1 else alibi_scale.squeeze(0)
    return alibi_bias * scale.type_as(alibi_bias)
