"""Train a composite, configured by Hydra: compose -> instantiate -> fit -> test the best checkpoint.

    python scripts/train.py +composite=parallel                  # or sequential, conditional
    python scripts/train.py +composite=sequential trainer=cpu optimizer=sgd seed=1
    python scripts/train.py -m +composite=sequential,parallel seed=0,1   # a sweep
    python scripts/train.py +composite=parallel ckpt_path=<run dir>/checkpoints/last.ckpt

``train(cfg)`` does the work and is importable for tests; ``main`` is the thin Hydra entry.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))  # schema.py sits next to this file
from schema import TrainConfig, register_configs  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
register_configs()


class ConfigError(ValueError):
    """A composed config that cannot run; ``main`` prints the message and exits with status 1."""


class NoCompositeError(ConfigError):
    """No ``+composite=NAME`` was given; the message lists the choices."""


def available_composites() -> list[str]:
    """The names ``+composite=`` accepts: the files in configs/composite/."""
    return sorted(p.stem for p in (CONFIG_DIR / "composite").glob("*.yaml"))


def _build(node: Any, **kwargs: Any) -> Any:
    # "all": plain dicts/lists reach the objects, so nothing keeps config objects (checkpoints
    # are read with weights_only=True, which refuses them).
    return instantiate(node, _convert_="all", **kwargs)


def build(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """Instantiate ``(datamodule, module, trainer)`` from a composed config.

    Raises:
        NoCompositeError: ``cfg.model`` is not set because no composite was chosen.
        ConfigError: a top-level key the schema does not know was added with ``+``.
    """
    if OmegaConf.is_missing(cfg, "model"):
        raise NoCompositeError(
            "no composite chosen: add +composite=NAME, one of: " + ", ".join(available_composites())
            + f"\n  e.g. python scripts/train.py +composite={available_composites()[0]}"
        )
    # `+key=value` adds keys even to a structured config; at the top level that is a typo.
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)}; the keys are those of TrainConfig in scripts/schema.py")
    if cfg.monitor_mode is None:  # a loss is best low, anything else (accuracy, F1) high
        cfg.monitor_mode = "min" if "loss" in cfg.monitor else "max"
    # Resolve once, enums as plain strings ("raise", "max"), so objects get ordinary values.
    conf = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    if conf["logger"] and cfg.ckpt_path is not None:
        keep_earlier_csv_logs(conf["logger"])
    datamodule = _build(conf["data"])
    model = _build(conf["model"])
    scheduler = _build(conf["scheduler"]) if conf["scheduler"] else None
    module = _build(conf["module"], model=model, optimizer=_build(conf["optimizer"]), scheduler=scheduler)
    callbacks = [_build(c) for c in conf["callbacks"].values() if c]
    logger = _build(conf["logger"]) if conf["logger"] else False
    trainer = _build(conf["trainer"], callbacks=callbacks, logger=logger)
    if trainer.logger is not None:
        trainer.logger.log_hyperparams({"config": conf})  # the whole run, next to the metrics
    return datamodule, module, trainer


def keep_earlier_csv_logs(logger: dict[str, Any]) -> None:
    """A resumed run that logs CSV where its first run did gets a fresh version folder.

    Lightning's CSVLogger deletes a ``metrics.csv`` it finds in its log directory, so resuming
    in the same run directory would wipe the earlier epochs' rows. The resumed run writes
    ``<name>/resume-<n>/metrics.csv`` instead; every earlier file stays.

    >>> conf = {"_target_": "pytorch_lightning.loggers.CSVLogger", "save_dir": "/nonexistent", "name": "logs", "version": ""}
    >>> keep_earlier_csv_logs(conf); conf["version"]
    ''
    """
    if not str(logger.get("_target_", "")).endswith("CSVLogger"):
        return
    logs = Path(logger["save_dir"]) / str(logger.get("name") or "")
    version = logger.get("version")
    if version is None or not (logs / str(version) / "metrics.csv").exists():
        return
    n = 1
    while (logs / f"resume-{n}").exists():
        n += 1
    logger["version"] = f"resume-{n}"


def _print_table(metrics: dict[str, float]) -> None:
    width = max([len("test metric"), *map(len, metrics)])
    print(f"{'test metric':<{width}}  value")
    for key in sorted(metrics):
        print(f"{key:<{width}}  {metrics[key]:.4f}")


def resume_path(ckpt_path: str | None, run_dir: str) -> str | None:
    """``ckpt_path=auto`` resumes whatever the run directory holds (a requeued cluster job).

    Lightning itself resumes from the ``hpc_ckpt_*.ckpt`` its SLURM plugin writes before a time
    limit (with ``ckpt_path=None``); without one (a node failure, a submitit requeue), the
    newest ``last.ckpt``; in a fresh directory, nothing.

    >>> resume_path("auto", "/nonexistent") is None
    True
    """
    if ckpt_path != "auto":
        return ckpt_path
    run = Path(run_dir)
    if any(run.glob("hpc_ckpt_*.ckpt")):
        return None
    return "last" if any(run.glob("**/last*.ckpt")) else None


def train(cfg: DictConfig) -> float:
    """Fit, test the best checkpoint, print the test metrics; return the best monitored value.

    The monitored value (``cfg.monitor``, ``val/acc`` by default) is what a ``-m`` sweep
    compares: a validation score, so the test split stays untouched by model selection.
    """
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg.ckpt_path, trainer.default_root_dir))
    checkpoint = trainer.checkpoint_callback
    # "best" only from a checkpoint that tracked the monitored metric: a monitor-less one
    # (the user dropped ours, Lightning added its own) keeps the newest epoch, not the best
    has_best = (
        checkpoint is not None and getattr(checkpoint, "monitor", None) == cfg.monitor
        and bool(getattr(checkpoint, "best_model_path", "")) and checkpoint.best_model_score is not None
    )
    # Read before testing, which replaces callback_metrics (no checkpoint under fast_dev_run).
    best = checkpoint.best_model_score if has_best else trainer.callback_metrics.get(cfg.monitor)
    results = trainer.test(module, datamodule=datamodule, ckpt_path="best" if has_best else None, verbose=False)
    if trainer.is_global_zero:  # one table per job, not one per rank
        _print_table({k: float(v) for k, v in results[0].items()})
        print(f"run directory: {Path(cfg.paths.output_dir).resolve()}")
    return float(best) if best is not None else float("nan")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None  # a clean message and exit status 1, no traceback


if __name__ == "__main__":
    main()
