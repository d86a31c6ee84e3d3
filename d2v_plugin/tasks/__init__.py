"""Tasks registered with fairseq."""

from . import text_pretraining  # noqa: F401
