"""d2v_plugin: data2vec 1.0 and 2.0 for fairseq, as a ``--user-dir`` plugin.

Importing the package registers its models, tasks and criteria with fairseq and lets
``torch.load(weights_only=True)`` read fairseq checkpoints (see :mod:`d2v_plugin.safe_load`).
"""

from . import safe_load

safe_load.allow_fairseq_checkpoints()
safe_load.register_config_resolvers()

from . import criteria, models, optim, tasks  # noqa: E402,F401
from . import checkpoint_io, training_stop  # noqa: E402  (crash-safe checkpoints, complete stop messages)

checkpoint_io.install(), training_stop.install()
from .checkpoints import load_encoder, load_pretraining_model  # noqa: E402,F401
from .encoder import Encoder, EncoderOutput  # noqa: E402,F401
from .predict import load_model  # noqa: E402,F401

__all__ = ["load_encoder", "load_pretraining_model", "load_model", "Encoder", "EncoderOutput"]
