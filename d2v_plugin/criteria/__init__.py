"""Criteria registered with fairseq."""

from . import data2vec_criterion  # noqa: F401
