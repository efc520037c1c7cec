"""The trainer's `_target_` picks the package of composites' classes: one spelling in the configs, swapped for lightning."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from composites.training import lightning as for_lightning
from composites_hydra.targets import for_package
from tests.scripts.train_helpers import compose_train


def targets(node) -> list[str]:
    if isinstance(node, list):
        return [t for v in node for t in targets(v)]
    if not isinstance(node, dict):
        return []
    own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
    return own + [t for v in node.values() for t in targets(v)]


def composed(tmp_path, *overrides: str) -> dict:
    cfg = compose_train(tmp_path, ["+composite=conditional", "trainer=fsdp", *overrides])
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def test_the_configs_spell_each_of_our_lightning_classes_one_way(tmp_path):
    ours = sorted(t for t in targets(composed(tmp_path)) if t.rpartition(".")[2] in for_lightning.__all__)
    assert ours == [
        "composites.CompositeModule",
        "composites.presets.DigitsDataModule",
        "composites.training.FSDP2Strategy",
        "composites.training.GradNormPlot",
        "composites.training.ResumeState",
        "composites.training.SignalCheckpoint",
        "composites.training.StepCheckpoint",
        "composites.training.TerminalProgress",
    ]


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_a_trainers_package_picks_the_module_of_our_classes(tmp_path, package):
    conf = composed(tmp_path, f"trainer._target_={package}.Trainer")
    swapped = targets(for_package(conf, package))
    ours = [t for t in swapped if t.rpartition(".")[2] in for_lightning.__all__]
    assert len(ours) == 8
    if package == "lightning":
        assert all(t.startswith("composites.training.lightning.") for t in ours)
        assert "lightning.pytorch.callbacks.ModelCheckpoint" in swapped  # Lightning's own, through ${lightning:...}
    else:
        assert swapped == targets(conf)  # the configs' spelling is the pytorch_lightning classes
