"""The public inference API: a data2vec encoder whose call returns a typed output."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn


@dataclass
class EncoderOutput:
    """What :class:`Encoder` returns.

    ``last_hidden_state``: (B, T, C) encoder output (after the final LayerNorm of pre-norm
    models). ``padding_mask``: (B, T) bool, True at padded steps (speech: at frame rate), or
    None. ``hidden_states``: with ``output_hidden_states=True``, one (B, T, C) tensor per
    block, bottom to top (the block outputs, not data2vec's pre-residual targets).
    Extra tokens (the image CLS token) are removed from all three unless
    ``keep_extra_tokens=True``; ``cls`` then holds (B, C) of the first extra token, if any.
    """

    last_hidden_state: torch.Tensor
    padding_mask: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    cls: Optional[torch.Tensor] = None

    @classmethod
    def from_sequence(cls, x, padding_mask, hidden, num_extra_tokens: int, keep_extra_tokens: bool, output_hidden_states: bool):
        """The output of a model whose sequences start with ``num_extra_tokens`` extra tokens."""
        n = num_extra_tokens
        first = x[:, 0] if n else None
        if n and not keep_extra_tokens:
            x = x[:, n:]
            padding_mask = padding_mask[:, n:] if padding_mask is not None else None
            hidden = [h[:, n:] for h in hidden]
        return cls(last_hidden_state=x, padding_mask=padding_mask, hidden_states=tuple(hidden) if output_hidden_states else None, cls=first)


class Encoder(nn.Module):
    """A data2vec student encoder (1.0 or 2.0) for feature extraction (see :func:`d2v_plugin.load_encoder`).

    ``encoder(source, padding_mask=None)``: token ids (B, T) for text, 16 kHz waveforms
    (B, S) for speech, images (B, C, H, W). Eval mode on creation; the module is an
    ``nn.Module`` (``.to(device)``, ``.half()``, ``.parameters()``), ``model`` is the
    underlying model (``Data2VecMultiModel`` or a 1.0 model; teacher, decoder and head removed).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.eval()

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def modality(self) -> str:
        return self.model.mode

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    def forward(self, source, padding_mask=None, output_hidden_states: bool = False, keep_extra_tokens: bool = False) -> EncoderOutput:
        return self.model.encode(source, padding_mask, output_hidden_states=output_hidden_states, keep_extra_tokens=keep_extra_tokens)

    def extract_features(self, source, padding_mask=None, **kwargs):
        """Meta's dict output (``x``, ``padding_mask``, ``layer_results``): see ``Data2VecMultiModel.extract_features``."""
        return self.model.extract_features(source, padding_mask=padding_mask, **kwargs)
