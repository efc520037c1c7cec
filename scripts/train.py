"""Train a composite, configured by Hydra: compose -> instantiate -> fit -> test the best checkpoint.

    python scripts/train.py +composite=parallel                  # or sequential, conditional
    python scripts/train.py +composite=sequential trainer=cpu optimizer=sgd seed=1
    python scripts/train.py -m +composite=sequential,parallel seed=0,1   # a sweep
    python scripts/train.py +composite=parallel ckpt_path=<run dir>/checkpoints/last.ckpt

``train(cfg)`` does the work and is importable for tests; ``main`` is the thin Hydra entry.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from composites.training.logs import quiet_lightning, route_lightning_logs
from composites.views import text_table
from composites_hydra import ConfigError, build, check_composite, register_configs, resume_command, resume_path
from composites_hydra.checks import check_seed
from composites_hydra.ranks import stop_together

register_configs()


def _print_table(metrics: dict[str, float]) -> None:
    print(text_table(("test metric", "value"), [(key, f"{metrics[key]:.4f}") for key in sorted(metrics)]))


def train(cfg: DictConfig) -> float:
    """Fit, test the best checkpoint, print the test metrics; return the best monitored value.

    The monitored value (``cfg.monitor``, ``val/acc`` by default) is what a ``-m`` sweep
    compares: a validation score, so the test split stays untouched by model selection.
    """
    check_composite(cfg)  # before Lightning loads (seconds): the commonest mistake exits at once
    check_seed(cfg.seed)  # seeding comes before build(), which checks the rest
    import pytorch_lightning as pl  # here, not at import: a mistake Hydra reports while composing exits without it

    from composites.training.callbacks.signal_checkpoint import SignalCheckpointBase

    quiet_lightning()  # before the Trainer is built: its tips and hints come then
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module, trainer = build(cfg)
    for callback in trainer.callbacks:  # a signal's message names the command that resumes this run
        if isinstance(callback, SignalCheckpointBase) and callback.resume_hint is None:  # either package's
            callback.resume_hint = resume_command(cfg.paths.output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg.ckpt_path, trainer.default_root_dir))
    checkpoint = trainer.checkpoint_callback
    # "best" only from a checkpoint that tracked the monitored metric: a monitor-less one
    # (the user dropped ours, Lightning added its own) keeps the newest epoch, not the best
    has_best = (
        checkpoint is not None
        and getattr(checkpoint, "monitor", None) == cfg.monitor
        and bool(getattr(checkpoint, "best_model_path", ""))
        and checkpoint.best_model_score is not None
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
    route_lightning_logs()  # Hydra has set up logging: Lightning's records go to the run's train.log too
    with stop_together():  # a rank that stops before the process group is up stops the others, with its message
        try:
            return train(cfg)
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None  # a clean message and exit status 1, no traceback


if __name__ == "__main__":
    main()
