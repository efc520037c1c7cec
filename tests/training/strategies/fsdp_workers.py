"""The two-rank gloo FSDP2 scenarios, run by ``tests.gloo_ranks``'s spawned ranks (so importable).

Each rank runs Lightning with ``FSDP2Strategy`` as a process Lightning did not start (the
environment names its rank and where the group meets, as torchrun or SLURM would). In the first
scenario Lightning starts the process group itself; the later ones run in the group the scenario got.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, Conditional, GradientFlowError, Parallel, Sequential
from composites.guard import submodel_grad_norms
from composites.training import FSDP2Strategy
from composites_hydra import resume_path


class Detaching(nn.Module):
    """Cuts its own output off the graph: its parameters never get a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).detach() + x


class Cuttable(nn.Module):
    """Detaches its output while ``cut`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.cut = nn.Linear(8, 8), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        return out.detach() if self.cut else out


def by_rank(x: torch.Tensor) -> str:
    """Branch 'a' on rank 0, 'b' on rank 1: each branch used on one rank only."""
    return "ab"[dist.get_rank()]


def build(scenario: str) -> nn.Module:
    torch.manual_seed(0)
    if scenario == "one_rank":
        experts = {name: nn.Linear(8, 8) for name in "abc"}
        return Sequential(
            {"encoder": nn.Linear(4, 8), "experts": Conditional(experts, by_rank), "head": nn.Linear(8, 3)}
        )
    middle = Detaching() if scenario == "detached" else Parallel({"a": nn.Linear(8, 4), "b": nn.Linear(8, 4)})
    return Sequential({"encoder": nn.Linear(4, 8), "middle": middle, "head": nn.Linear(8, 3)})


def whole(module: nn.Module) -> dict[str, float]:
    """Each parameter's full-tensor sum (a collective: every rank calls it)."""
    return {n: float(p.full_tensor().double().sum()) for n, p in module.named_parameters()}


class Weights(pl.Callback):
    """Whole parameters when training starts (after a resume has loaded) and when it ends."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = whole(pl_module.model)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.end = whole(pl_module.model)


class Said(logging.Handler):
    """The messages Lightning's rank-zero logger gave."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def fit(scenario: str, out: Path, steps: int, ckpt_path: str | None = None) -> tuple[CompositeModule, Any, Weights]:
    module = CompositeModule(build(scenario), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    weights = Weights()
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_train_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FSDP2Strategy(),
        max_steps=steps,
        accumulate_grad_batches=2,
        log_every_n_steps=1,
        logger=False,
        callbacks=[weights, checkpoint],
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 4, generator=generator), torch.randint(0, 3, (64,), generator=generator))
    trainer.fit(module, DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return module, trainer, weights


def guarded_steps(scenario: str) -> list:
    """The guard on a model sharded by hand (no Lightning): what each check says."""
    from torch.distributed.device_mesh import init_device_mesh

    from composites import GradientGuard
    from composites.training.strategies.sharding import shard_composite

    torch.manual_seed(0)
    model = Sequential({"encoder": nn.Linear(4, 8), "middle": Cuttable(), "head": nn.Linear(8, 3)})
    guard = GradientGuard(model)  # built before sharding: fully_shard replaces the parameters it hooked
    shard_composite(model, init_device_mesh("cpu", (2,)))
    guard.refresh_parameters()  # so it hooks the sharded ones
    x = torch.ones(2, 4)
    if scenario == "non_finite" and dist.get_rank() == 1:
        x[0, 0] = float("nan")  # one rank's data: the reduce-scatter spreads it to every shard
    outcome: list = []
    # accumulation: two micro-batches without the reduce-scatter; the second one cuts 'middle' off
    plan = [(False, False), (False, True)] if scenario == "accumulation" else [(True, False)]
    for sync, cut in plan:
        model.set_requires_gradient_sync(sync)
        model.middle.cut = cut
        model(x).sum().backward()
        try:
            guard.check()
            outcome.append("ok")
        except GradientFlowError as error:
            outcome.append([[p.parameter, p.module, p.cause] for p in error.problems])
            break
    return outcome


def verdict(scenario: str, out: Path) -> dict[str, Any]:
    if scenario in ("accumulation", "non_finite"):
        return {"checks": guarded_steps(scenario)}
    if scenario == "resume":  # ckpt_path=auto: from the sharded checkpoint (a folder) the healthy run left
        ckpt_path = resume_path("auto", str(out / "healthy"))
        module, trainer, weights = fit("healthy", out / "healthy", steps=4, ckpt_path=ckpt_path)
        saved = json.loads((out / "healthy_end.json").read_text())
        return {"ckpt_path": ckpt_path, "step": trainer.global_step, "restored": weights.start == saved}
    said = Said()
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addHandler(said)
    try:
        module, trainer, weights = fit(scenario, out / scenario, steps=2)  # a run directory each
    except GradientFlowError as error:
        return {"error": [[p.parameter, p.module, p.cause] for p in error.problems]}
    finally:
        logging.getLogger("pytorch_lightning.utilities.rank_zero").removeHandler(said)
    report = module.guard_callback.report if hasattr(module, "guard_callback") else module.report
    result = {
        "ok": report.ok,
        "checked": report.checked,
        "inactive": report.inactive_names,
        "grad_norms": sorted(report.grad_norms()),
        "step": trainer.global_step,
        "said": [line for line in said.lines if line.startswith("FSDP2:")],  # rank_zero_info: rank 0 only
    }
    if scenario == "healthy":  # the logged norms are those of whole gradients, not of this rank's shard
        full = {n: p.grad.full_tensor().flatten() for n, p in module.model.named_parameters()}
        norms = report.grad_norms()
        whole = {k: float(torch.cat([g for n, g in full.items() if n.startswith(k + ".")]).norm()) for k in norms}
        unguarded = submodel_grad_norms(module.model)  # what the gradient-norm plot reads with guard=off
        result["whole_norms"] = all(
            abs(norms[k] - whole[k]) < 1e-5 and abs(unguarded[k] - whole[k]) < 1e-5 for k in norms
        )
        last = out / "healthy" / "checkpoints" / "last.ckpt"
        result["sharded_checkpoint"] = last.is_dir() and len(list(last.glob("*.distcp"))) == 2
        if trainer.is_global_zero:
            (out / "healthy_end.json").write_text(json.dumps(weights.end))
    return result


def run(out_dir: str, scenario: str) -> dict[str, Any]:
    """This rank's verdict of ``scenario``, its runs under ``out_dir``; the environment says what torchrun would."""
    os.environ["OMP_NUM_THREADS"] = "1"
    return verdict(scenario, Path(out_dir))
