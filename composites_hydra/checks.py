"""Mistakes in a composed config caught before training starts, each named by its key with the fix.

Errors (``ConfigError``) for what cannot run or would fail late (after a full epoch, or deep in
torch); warnings for what runs but does nothing useful. Lightning's, torch's and Hydra's own
clear messages are left as they are.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .locate import is_target_node
from .run_settings import check_run_settings
from .signatures import iter_problems


def check_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """Checks on the composed config alone; ``overrides`` are the command line's (``key=value``).

    >>> check_config(OmegaConf.create({"trainer": {"accumulate_grad_batches": 0}, "scheduler": None}))
    Traceback (most recent call last):
    ...
    composites_hydra.errors.ConfigError: trainer.accumulate_grad_batches=0: it must be a positive integer (1: no accumulation)
    """
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate < 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate}: it must be a positive integer (1: no accumulation)"
        )
    scheduler = OmegaConf.select(cfg, "scheduler")
    if isinstance(scheduler, str):
        raise ConfigError(
            f"scheduler={scheduler}: a scheduler is a config node with a _target_, not a name, e.g. "
            f"scheduler='{{_target_: torch.optim.lr_scheduler.{scheduler}, _partial_: true, T_max: 10}}'"
        )
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if isinstance(lr, (int, float)) and lr == 0:
        warnings.warn("optimizer.lr=0: the optimizer will not change any weight", stacklevel=2)
    check_run_settings(cfg)
    for override in overrides:
        key, _, value = override.partition("=")
        if value.strip() == "{}" and not key.startswith(("+", "~")):
            node = OmegaConf.select(cfg, key, default=None)
            if isinstance(node, DictConfig) and len(node):
                warnings.warn(
                    f"{key}={{}} has no effect: a mapping given on the command line merges into the one there "
                    f"({', '.join(map(str, node))}); drop one entry with ~{key}.<name>",
                    stacklevel=2,
                )


def check_seed(seed: Any) -> None:
    """Refuse a ``seed`` that torch, numpy and Python cannot all take (checked before anything is seeded).

    >>> check_seed(-1)
    Traceback (most recent call last):
      ...
    composites_hydra.errors.ConfigError: seed=-1: use a whole number from 0 to 4294967295 (numpy's seeds), e.g. seed=1
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r}: use a whole number from 0 to {2**32 - 1} (numpy's seeds), e.g. seed=1")


def check_targets(conf: Mapping[str, Any]) -> None:
    """Every ``_target_`` node of a resolved config against its target's signature, before anything is built.

    Keys that are not arguments, missing required arguments, values of the wrong type,
    ``_target_`` names that do not import, a missing ``_target_``, and an optimizer or
    scheduler without ``_partial_: true``: all named at once, each with its key.

    >>> check_targets({"optimizer": {"_target_": "torch.optim.Adam", "lr": "0.001"}})
    Traceback (most recent call last):
    ...
    composites_hydra.errors.ConfigError: 2 config values do not fit:
      optimizer: add _partial_: true (optimizer._partial_=true): CompositeModule calls torch.optim.Adam with the parameter groups it builds; without it Hydra calls it now, without them
      optimizer.lr='0.001': torch.optim.Adam's lr wants float | Tensor, got the str '0.001' (write a number without quotes)
    """
    problems = []
    nodes: dict[str, tuple[Any, tuple[str, ...]]] = {}
    for key in ("data", "model", "optimizer", "module", "trainer"):
        if key in conf:
            node = conf[key]
            if not is_target_node(node):
                problems.append(
                    f"{key}: no _target_ (got {_described(node)}): this node builds an object, so it names its class, "
                    f"e.g. {key}._target_={_EXAMPLE_TARGETS[key]}"
                )
                continue
            nodes[key] = (node, _PASSED.get(key, ()))
    scheduler = conf.get("scheduler")
    if isinstance(scheduler, Mapping) and not is_target_node(scheduler):  # Lightning's {scheduler: ..., interval: ...}
        if not is_target_node(scheduler.get("scheduler")):
            problems.append(
                "scheduler: a mapping without _target_ must hold the scheduler node under 'scheduler' "
                "(Lightning's {scheduler: ..., interval: step}), e.g. "
                "scheduler='{scheduler: {_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 10}}'"
            )
        else:
            nodes["scheduler.scheduler"] = (scheduler["scheduler"], ())
    elif scheduler is not None:
        nodes["scheduler"] = (scheduler, ())
    for name, callback in (conf.get("callbacks") or {}).items():
        if callback and not is_target_node(callback):
            problems.append(f"callbacks.{name}: no _target_: a callback node names its class (or is null to drop it)")
        elif callback:
            nodes[f"callbacks.{name}"] = (callback, ())
    if conf.get("logger"):
        nodes["logger"] = (conf["logger"], ())
    for key in ("optimizer", "scheduler", "scheduler.scheduler"):
        node = nodes.get(key, (None,))[0]
        if is_target_node(node) and node.get("_partial_") is not True:
            given = "the parameter groups" if key == "optimizer" else "the optimizer"
            problems.append(
                f"{key}: add _partial_: true ({key}._partial_=true): CompositeModule calls {node['_target_']} with "
                f"{given} it builds; without it Hydra calls it now, without them"
            )
            nodes[key] = ({**node, "_partial_": True}, ())
    problems += iter_problems(nodes)
    if problems:
        count = f"{len(problems)} config values do not fit" if len(problems) > 1 else "a config value does not fit"
        raise ConfigError(f"{count}:\n  " + "\n  ".join(problems))


def _described(node: Any) -> str:
    return f"a mapping with keys {', '.join(map(str, node))}" if isinstance(node, Mapping) else repr(node)


# What build() passes to each node itself, and a class to name when a node has no _target_.
_PASSED = {"module": ("model", "optimizer", "scheduler"), "trainer": ("callbacks", "logger")}
_EXAMPLE_TARGETS = {
    "data": "composites.presets.DigitsDataModule",
    "model": "composites.Sequential",
    "optimizer": "torch.optim.Adam",
    "module": "composites.CompositeModule",
    "trainer": "pytorch_lightning.Trainer",
}


def function_target_error(error: Exception, node: str = "model") -> Exception | None:
    """A clear error when Hydra called a function where a module class was wanted (``_target_: torch.nn.functional.relu``)."""
    text = str(error)
    target = re.search(r"Error in call to target '([^']+)'", text)
    key = re.search(r"full_key: (\S+)", text)
    if not target or "required positional argument" not in text:
        return None
    from hydra.utils import get_object

    try:
        obj = get_object(target.group(1))
    except Exception:
        return None
    if isinstance(obj, type):
        return None
    where = f"{node}.{key.group(1)}" if key else node
    return ConfigError(
        f"{where}._target_={target.group(1)} is a function, not a module class: a stage or branch must be an "
        "nn.Module. Use a module class (torch.nn.ReLU for torch.nn.functional.relu) or wrap the function in one"
    )


def logged_names(module: Any) -> set[str] | None:
    """The metric names a ``CompositeModule`` logs per epoch (what ``monitor`` can name); ``None`` for another module."""
    stages = {"train": "train_metrics", "val": "val_metrics", "test": "test_metrics"}
    if not all(hasattr(module, a) for a in stages.values()) or not hasattr(module, "epoch_means"):
        return None
    names = set()
    for attribute in stages.values():
        metrics = getattr(module, attribute)
        if metrics is not None:
            names |= set(metrics.keys())
    for key in module.epoch_means:
        stage, _, name = key.partition("_")
        names |= {f"train/{name}_epoch", f"train/{name}"} if stage == "train" else {f"{stage}/{name}"}
    return names


def check_built(cfg: DictConfig, module: Any) -> None:
    """Checks that need the built module: the monitored metric exists, metrics fit the model's output width."""
    names = logged_names(module)
    monitor = cfg.monitor
    if names is not None and monitor not in names and not monitor.startswith(("lr/", "grad_norm/")):
        raise ConfigError(
            f"monitor={monitor}: the module logs no such metric (it logs {', '.join(sorted(names))}); set monitor= "
            "one of them, or add the metric under module.metrics.metrics"
        )
    width = _output_width(getattr(module, "model", None))
    for name, metric in _metrics(module):
        classes = getattr(metric, "num_classes", None)
        if width is not None and isinstance(classes, int) and classes != width:
            raise ConfigError(
                f"module.metrics: {name} has num_classes={classes} but the model's last layer gives {width} "
                f"outputs; set num_classes: {width} (or the head's out_features to {classes})"
            )
    if getattr(module, "load_balancing", 0) and not getattr(module, "gates", True):
        warnings.warn(
            f"module.load_balancing={module.load_balancing} has no effect: the model has no Conditional", stacklevel=2
        )


def _metrics(module: Any) -> list[tuple[str, Any]]:
    metrics = getattr(module, "val_metrics", None)
    return list(metrics.items()) if metrics is not None else []


def _output_width(model: Any) -> int | None:
    """The width of a :class:`~composites.Sequential`'s last stage's last linear layer, or ``None``."""
    from torch import nn

    from composites import Sequential

    if not isinstance(model, Sequential):
        return None
    last = getattr(model, model.stage_names[-1])
    linears = [m for m in last.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
