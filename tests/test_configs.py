"""Every shipped config composes, and its model / task / criterion sections are valid for
the registered dataclasses (a misspelt or removed key fails here, not after a GPU job starts)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import d2v_plugin  # noqa: F401  (registers models, tasks, criteria and the resolver)
from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
from fairseq.dataclass.initialize import hydra_init
from fairseq.dataclass.utils import merge_with_parent
from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_DATACLASS_REGISTRY
from fairseq.tasks import TASK_DATACLASS_REGISTRY

from helpers import CONFIG_DIR

CONFIGS = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in Path(CONFIG_DIR).rglob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def fairseq_schemas():
    hydra_init()  # fairseq's structured groups (common, dataset, ...) the configs' defaults pull in
    yield
    GlobalHydra.instance().clear()


@pytest.mark.parametrize("name", CONFIGS)
def test_config_composes_and_matches_the_dataclasses(name):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name=name, overrides=["task.data=/data"])
    assert cfg.common.user_dir == str(Path(d2v_plugin.__file__).parent)
    for section, registry in (("model", MODEL_DATACLASS_REGISTRY), ("task", TASK_DATACLASS_REGISTRY), ("criterion", CRITERION_DATACLASS_REGISTRY)):
        node = cfg[section]
        if section == "model" and node._name in ARCH_MODEL_REGISTRY and node._name not in registry:
            continue  # fairseq's own argparse-style architectures (roberta: the MLM baseline of compare/)
        dc = registry.get(node._name)
        assert dc is not None, f"{name}: {section} {node._name!r} is not registered"
        merged = merge_with_parent(dc(), node, remove_missing=False)  # raises on unknown keys
        assert merged._name == node._name


def test_every_documented_config_exists():
    expected = {f"pretraining/{m}_{s}" for m in ("text", "audio", "image") for s in ("base", "tiny")}
    expected |= {f"finetuning/glue/{t}" for t in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst_2", "sts_b", "wnli", "tiny")}
    expected |= {f"finetuning/squad/{v}" for v in ("v1", "v2", "tiny")}
    assert expected <= set(CONFIGS), sorted(expected - set(CONFIGS))
