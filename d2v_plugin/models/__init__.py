"""Models registered with fairseq: data2vec 2.0 (``data2vec_multi``)."""

from . import data2vec2  # noqa: F401
