"""Fine-tuning models: heads on top of a pretrained data2vec encoder."""

from ..._autoimport import import_submodules

import_submodules(__name__, __path__)
