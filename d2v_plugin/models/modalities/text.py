"""Text modality: token + learned position embeddings, LayerNorm, dropout."""

import math
from dataclasses import dataclass, field

import torch.nn as nn
from fairseq.modules import PositionalEmbedding

from ..decoders import ConvDecoder
from .base import ModalityConfig, ModalityEncoder


@dataclass
class TextConfig(ModalityConfig):
    max_source_positions: int = field(default=512, metadata={"help": "longest sequence the position embeddings cover"})
    learned_pos: bool = field(default=True, metadata={"help": "learned (true) or sinusoidal (false) positions"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the embeddings"})
    no_scale_embedding: bool = field(default=True, metadata={"help": "do not multiply token embeddings by sqrt(dim)"})
    layernorm_embedding: bool = field(default=True, metadata={"help": "LayerNorm on the summed embeddings"})
    no_token_positional_embeddings: bool = field(default=False, metadata={"help": "no position embeddings at all"})


class TextLocalEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, vocab_size: int, embed_dim: int, pad_idx: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, embed_dim, pad_idx)
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(embed_dim)
        self.embed_positions = None
        if not cfg.no_token_positional_embeddings:
            self.embed_positions = PositionalEmbedding(cfg.max_source_positions, embed_dim, pad_idx, learned=cfg.learned_pos)
        self.layernorm_embedding = nn.LayerNorm(embed_dim) if cfg.layernorm_embedding else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens):
        x = self.embed_scale * self.embed_tokens(tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(tokens)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout(x)


class TextEncoder(ModalityEncoder):
    """Needs the task's dictionary: its size and padding index shape the embeddings."""

    def __init__(self, cfg: TextConfig, embed_dim: int, make_block, norm_layer, layer_norm_first: bool, dictionary):
        super().__init__(cfg, embed_dim, make_block, norm_layer, layer_norm_first)
        if dictionary is None:
            raise ValueError("the text modality needs a task with a source dictionary")
        self.pad_idx = dictionary.pad()
        self.local_encoder = TextLocalEncoder(cfg, len(dictionary), embed_dim, self.pad_idx)
        self.decoder = ConvDecoder(cfg.decoder, embed_dim, dims=1) if cfg.decoder is not None else None
