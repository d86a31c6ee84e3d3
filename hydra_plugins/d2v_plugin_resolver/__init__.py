"""Hydra loads every module under ``hydra_plugins`` when it starts, before it composes the
config. We use that moment to register the ``${d2v_plugin_dir:}`` resolver, so that our
configs can say ``common.user_dir: ${d2v_plugin_dir:}`` and work from any directory.

Only the package location is looked up here; importing d2v_plugin (and torch) waits
until fairseq imports the user dir.
"""

import importlib.util
import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf


def _plugin_dir() -> str:
    spec = importlib.util.find_spec("d2v_plugin")
    if spec is None or spec.origin is None:
        raise ImportError("d2v_plugin is not installed in this Python environment (pip install -e .)")
    return os.path.dirname(os.path.abspath(spec.origin))


if not OmegaConf.has_resolver("d2v_plugin_dir"):
    OmegaConf.register_new_resolver("d2v_plugin_dir", _plugin_dir)


class D2vPluginSearchPath(SearchPathPlugin):
    """Makes the repository's configs reachable without --config-dir when run from a checkout."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        config_dir = os.path.join(os.path.dirname(_plugin_dir()), "config")
        if os.path.isdir(config_dir):
            search_path.append(provider="d2v_plugin", path=f"file://{config_dir}")
