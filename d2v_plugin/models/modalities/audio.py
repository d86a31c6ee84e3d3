"""Audio modality (placeholder: being implemented for issue 3)."""

from dataclasses import dataclass

from .base import ModalityConfig, ModalityEncoder


@dataclass
class AudioConfig(ModalityConfig):
    pass


class AudioEncoder(ModalityEncoder):
    def __init__(self, cfg: AudioConfig, embed_dim: int, make_block, norm_layer, layer_norm_first: bool):
        raise NotImplementedError("the audio modality is not implemented yet")
