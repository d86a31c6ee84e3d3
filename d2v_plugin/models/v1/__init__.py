"""data2vec 1.0 models (``data2vec_text``, ``data2vec_audio``, ``data2vec_vision``).

They share the 2.0 pieces (blocks, EMA teacher, targets, masking, loss) through
:class:`~d2v_plugin.models.v1.base.Data2VecV1Model`; each modality file holds only what
differs: its input embedding, its mask, its prediction head and the names of Meta's keys.
"""

from ..._autoimport import import_submodules

import_submodules(__name__, __path__)
