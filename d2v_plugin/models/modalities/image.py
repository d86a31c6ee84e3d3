"""Image modality (placeholder: being implemented for issue 3)."""

from dataclasses import dataclass

from .base import ModalityConfig, ModalityEncoder


@dataclass
class ImageConfig(ModalityConfig):
    pass


class ImageEncoder(ModalityEncoder):
    def __init__(self, cfg: ImageConfig, embed_dim: int, make_block, norm_layer, layer_norm_first: bool):
        raise NotImplementedError("the image modality is not implemented yet")
