"""See the gradient flow of a composite: one training batch, the guard, a table and a PNG of the tree.

    python scripts/diagnose.py +composite=parallel               # or sequential, conditional
    python scripts/diagnose.py +composite=parallel optimizer=sgd  # any train.py override works

Builds the data and the module exactly as ``scripts/train.py`` does (same configs), runs ONE
forward/backward with the configured loss on ONE training batch (on the CPU, nothing steps),
checks it with the gradient guard, prints a table per sub-model (parameters, trainable,
frozen, inactive, gradient norm, status), writes ``gradient_flow.png`` (the composite's tree,
each sub-model coloured by status) to the run directory and prints its path. The exit status
is 1 when the guard found a problem, 2 when the config cannot run (the message says why).

``diagnose(cfg)`` does the work and is importable for tests; ``main`` is the thin Hydra entry.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from composites_hydra import ConfigError, build, check_composite, register_configs

register_configs()

PNG_NAME = "gradient_flow.png"


def diagnose(cfg: DictConfig) -> int:
    """Check one training step of the configured run; return the exit status (1: a problem).

    Raises:
        NoCompositeError: no ``+composite=NAME`` was given.
    """
    check_composite(cfg)  # before Lightning loads (seconds): the commonest mistake exits at once
    import pytorch_lightning as pl

    from composites.guard import format_table
    from composites.views import check_gradient_flow, draw_flow_tree, format_flow

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    cfg = cfg.copy()
    with open_dict(cfg):  # one step, no training: nothing to log or checkpoint
        cfg.logger = None
        cfg.callbacks = {}
    datamodule, module, _ = build(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = module.configure_optimizers()  # the guard also checks that it holds every parameter
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    module.guard = None  # configure_optimizers hooked its own guard (the setter removes it); ours runs the check
    model = module.model
    tree, report = check_gradient_flow(model, module.loss_fn, batch, optimizer)

    print(f"gradient flow of {type(model).__name__} after one backward on one training batch ({len(batch[1])} samples)")
    print(format_flow(tree))
    if report.ok:
        print(
            f"\nguard: ok, all {report.checked} trainable parameters got a gradient "
            f"({report.frozen} frozen, {report.inactive} in routed-out branches)"
        )
    else:
        print(f"\nguard: {len(report.problems)} problem(s):\n{format_table(report.problems)}")
    png = draw_flow_tree(tree, Path(cfg.paths.output_dir) / PNG_NAME)
    print(f"gradient flow plot: {png.resolve()}")
    return 0 if report.ok else 1


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        status = diagnose(cfg)
    except ConfigError as error:  # a clean message, no traceback; status 2 tells it from "a problem found" (1)
        print(f"error: {str(error).replace('scripts/train.py', 'scripts/diagnose.py')}", file=sys.stderr)
        raise SystemExit(2) from None
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
