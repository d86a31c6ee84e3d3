"""Keep fairseq checkpoints loadable under ``torch.load(weights_only=True)`` (torch >= 2.6).

Checkpoints written by fairseq may hold an ``argparse.Namespace`` (``args``); we allow
exactly the types fairseq stores instead of switching the safety check off.
"""

import argparse
import os


def allow_fairseq_checkpoints() -> None:
    import torch.serialization

    torch.serialization.add_safe_globals([argparse.Namespace])


def plugin_dir() -> str:
    """The directory of the installed package: what ``common.user_dir`` must point at."""
    return os.path.dirname(os.path.abspath(__file__))


def register_config_resolvers() -> None:
    """``${d2v_plugin_dir:}`` in configs resolves to :func:`plugin_dir`."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("d2v_plugin_dir"):
        OmegaConf.register_new_resolver("d2v_plugin_dir", plugin_dir)
