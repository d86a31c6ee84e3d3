"""Models registered with fairseq: every module and subpackage here is imported."""

from .._autoimport import import_submodules

import_submodules(__name__, __path__)
