"""Composed config -> ``(datamodule, module, trainer)``: the chain of instantiations of a run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from composites.training.packages import trainer_package

from .checks import check_built, check_config, check_targets, function_target_error
from .errors import ConfigError, NoCompositeError
from .run_settings import metric_direction
from .runs import check_resume, checkpoint_to_resume, decided, keep_earlier_csv_logs, refuse_to_overwrite
from .schema import TrainConfig
from .targets import for_package

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def available_composites() -> list[str]:
    """The names ``+composite=`` accepts: the ``composite`` group on Hydra's search path.

    Under a running Hydra (the script, the compose API) that includes a user's ``--config-dir``
    and ``hydra.searchpath``; otherwise the files in this repository's ``configs/composite/``.

    >>> available_composites()
    ['conditional', 'parallel', 'sequential']
    """
    if GlobalHydra.instance().is_initialized():
        return sorted(GlobalHydra.instance().config_loader().get_group_options("composite"))
    return sorted(p.stem for p in (CONFIG_DIR / "composite").glob("*.yaml"))


def check_composite(cfg: DictConfig) -> None:
    """Refuse a config in which no composite was chosen (``cfg.model`` left unset), naming the choices.

    :func:`build` checks it first; the scripts check it before they import Lightning, so the
    commonest mistake (no ``+composite=``) exits at once.

    >>> check_composite(OmegaConf.create({"model": "???"}))
    Traceback (most recent call last):
      ...
    composites_hydra.errors.NoCompositeError: no composite chosen: add +composite=NAME, one of: conditional, parallel, sequential
      e.g. python scripts/train.py +composite=conditional

    Raises:
        NoCompositeError: no composite was chosen.
    """
    if OmegaConf.is_missing(cfg, "model"):
        choices = available_composites()
        raise NoCompositeError(
            "no composite chosen: add +composite=NAME, one of: "
            + ", ".join(choices)
            + (f"\n  e.g. python scripts/train.py +composite={choices[0]}" if choices else "")
        )


def build_node(node: Any, **kwargs: Any) -> Any:
    """Instantiate one config node; plain dicts and lists reach the objects.

    Nothing built keeps config objects, so checkpoints stay loadable with ``weights_only=True``.

    >>> build_node({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}).weight.shape
    torch.Size([3, 2])
    """
    return instantiate(node, _convert_="all", **kwargs)


def build(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """Instantiate ``(datamodule, module, trainer)`` from a composed config.

    Raises:
        NoCompositeError: ``cfg.model`` is not set because no composite was chosen.
        ConfigError: a top-level key the schema does not know was added with ``+``.
    """
    check_composite(cfg)
    # `+key=value` adds keys even to a structured config; at the top level that is a typo.
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(
            f"unknown top-level key(s) {', '.join(unknown)}; the keys are those of TrainConfig in composites_hydra/schema.py"
        )
    if not decided(cfg.paths.output_dir):  # rank 0 decided for the whole run (KeepEarlierRuns)
        refuse_to_overwrite(cfg.paths.output_dir, cfg.ckpt_path)  # never delete what an earlier run wrote
    check_config(cfg, _command_line())
    try:
        package = trainer_package(cfg.trainer._target_)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.monitor_mode is None:  # a loss is best low, anything else (accuracy, F1) high
        cfg.monitor_mode = metric_direction(cfg.monitor) or "max"
    # Resolve once, enums as plain strings ("raise", "max"), so objects get ordinary values.
    conf = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    check_targets(conf)  # every value against its target's signature, before anything is built
    checkpoint = None if decided(cfg.paths.output_dir) else checkpoint_to_resume(cfg.ckpt_path, cfg.paths.output_dir)
    if checkpoint is not None:  # under the script, KeepEarlierRuns checked before Hydra wrote anything
        check_resume(checkpoint, conf["model"], conf["data"], conf["seed"])
    if conf["logger"] and cfg.ckpt_path is not None:
        keep_earlier_csv_logs(conf["logger"])
    # composites' own Lightning classes of the Trainer's package; Lightning's own come from configs that
    # name them ${lightning:...} (composites_hydra/targets.py)
    built = for_package(conf, package)
    datamodule = build_node(built["data"])
    try:
        model = build_node(built["model"])
    except InstantiationException as error:
        raise (function_target_error(error) or error) from error
    compile_model(model, built["compile"])
    scheduler = build_node(built["scheduler"]) if built["scheduler"] else None
    optimizer = build_node(built["optimizer"])
    module = build_node(built["module"], model=model, optimizer=optimizer, scheduler=scheduler)
    check_built(cfg, module)
    callbacks = [build_node(c) for c in built["callbacks"].values() if c]
    logger = build_node(built["logger"]) if built["logger"] else False
    trainer = build_node(built["trainer"], callbacks=callbacks, logger=logger)
    if trainer.logger is not None:
        trainer.logger.log_hyperparams({"config": conf})  # the whole run, next to the metrics
    return datamodule, module, trainer


def compile_model(model: Any, setting: Any) -> None:
    """Apply the ``compile`` key: ``false`` nothing, ``true`` ``torch.compile``'s defaults, a mapping its arguments.

    Compiled in place (``nn.Module.compile``), so the state_dict keys stay free of ``_orig_mod.``.

    >>> import torch
    >>> model = torch.nn.Linear(2, 3)
    >>> compile_model(model, {"backend": "eager"})
    >>> list(model.state_dict())
    ['weight', 'bias']
    """
    if setting is False or setting is None:
        return
    if setting is not True and not isinstance(setting, dict):
        raise ConfigError(
            f"compile={setting!r}: use true, false or a mapping of torch.compile arguments, "
            "e.g. compile='{backend: eager}' or compile='{mode: max-autotune}'"
        )
    try:
        model.compile(**(setting if isinstance(setting, dict) else {}))
    except TypeError as error:  # an argument torch.compile does not take
        raise ConfigError(f"compile={setting!r}: {error}") from None


def _command_line() -> list[str]:
    """The run's command-line overrides under the Hydra app; none under the compose API."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
