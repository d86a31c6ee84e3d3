"""Optimizers registered with fairseq: every module in this package is imported."""

from .._autoimport import import_submodules

import_submodules(__name__, __path__)
