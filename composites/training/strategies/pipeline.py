"""Pipeline parallelism through Lightning: a ``Sequential``'s stages spread over ranks (``trainer=pipeline``).

:class:`PipelineStrategyBase` is written once, with no Lightning import at module level; the
concrete strategies (a ``DDPStrategy`` of each Lightning package) are declared in
:mod:`composites.training.pytorch_lightning` and :mod:`composites.training.lightning`.

How it fits Lightning: the strategy launches and connects the processes as DDP does, but
instead of wrapping the model in DDP it splits the module's ``Sequential`` (``module.model``)
and keeps this rank's pipeline stage, before the optimizer is built, so each rank's optimizer
holds, and steps, its own stage. ``CompositeModule``'s step asks the strategy for
:meth:`pipeline_step`: the schedule runs forward and backward of every microbatch; the loss
(from the last stage, sent to every rank of the pipeline so it is logged once, as the number
it is) comes back as a leaf tensor, whose ``backward`` in Lightning's loop adds nothing. The
guard callback builds a :class:`~composites.parallelism.pipeline_guard.PipelineGuard`.
Checkpoints gather every stage into one full state dict (the single-process model's keys) and
every rank's optimizer state; a rank loads its own part back.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.rank_zero import rank_zero_info
from torch import Tensor

from ...parallelism.pipeline import Pipeline, pipeline_groups
from ...parallelism.pipeline_split import stage_layout
from .prepare import cpu_state


class PipelineStrategyBase:
    """The pipeline strategy's behaviour, mixed into a Lightning ``DDPStrategy`` (see the module docstring).

    Args:
        split: stage names per pipeline stage (``[[encoder, proj], [head]]``); ``None``: balanced
            by parameter count.
        n_microbatches: microbatches per batch (fewer when the batch does not split evenly).
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved"`` (two pipeline stages per rank).
        pipeline_size: ranks per pipeline; ``None``: every rank (pipeline only). Fewer: PP x DP,
            ``world / pipeline_size`` data-parallel copies of the pipeline, each fed its own
            share of the data, their gradients averaged.
        **kwargs: the ``DDPStrategy`` arguments (``process_group_backend``, ...).
    """

    def __init__(
        self,
        split: Sequence[Sequence[str]] | None = None,
        n_microbatches: int = 4,
        schedule: str = "1f1b",
        pipeline_size: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.split = [list(group) for group in split] if split is not None else None
        self.n_microbatches, self.schedule, self.pipeline_size = int(n_microbatches), str(schedule), pipeline_size
        self.pipeline: Pipeline | None = None
        self.pipeline_group: Any = None
        self.replica_group: Any = None
        self.replicas, self.replica = 1, 0

    # ---------------------------------------------------------------- the split, before the optimizer exists
    def setup(self, trainer: Any) -> None:
        # DDPStrategy.setup without its two steps that assume every rank holds the same model: the DDP
        # wrapper, and (outside fit) broadcasting rank 0's weights to every rank
        if self.pipeline is None:
            self.split_model()
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if str(getattr(trainer.state.fn, "value", trainer.state.fn)) == "fit":
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def configure_ddp(self) -> None:
        """No DDP wrapper: each rank holds a different stage; copies (PP x DP) average gradients in :meth:`pipeline_step`."""

    def split_model(self) -> None:
        """Split the module's ``Sequential`` and keep this rank's stage as ``module.model``."""
        module = self.lightning_module
        world = dist.get_world_size()
        size = self.pipeline_size or world
        self.pipeline_group, self.replica_group, self.replica = pipeline_groups(int(size))
        self.replicas = world // int(size)
        loss_fn = getattr(module, "loss_fn", None)
        if loss_fn is None or not isinstance(getattr(module, "model", None), torch.nn.Module):
            raise TypeError(
                "trainer=pipeline trains a CompositeModule (module.model a composites.Sequential, module.loss_fn the "
                f"loss); got {type(module).__name__}"
            )
        self.pipeline = Pipeline(
            module.model,
            loss_fn,
            split=self.split,
            n_microbatches=self.n_microbatches,
            schedule=self.schedule,
            group=self.pipeline_group,
            replica_group=self.replica_group,
            device=self.root_device,
        )
        module.model = self.pipeline.module  # this rank keeps its stage (named as in the whole model)
        if not self.pipeline.has_last:  # metrics are updated where the output is; the sum over ranks is the value
            warnings.filterwarnings("ignore", message=r"The ``compute`` method of metric .* before the ``update``")
        size, p = int(size), self.pipeline
        holders = [
            [d * size + i % size for d in range(self.replicas)] for i in range(p.n_stages)
        ]  # pipeline_groups' layout
        copies = f"; {self.replicas} data-parallel copies (PP x DP)" if self.replicas > 1 else ""
        rank_zero_info(
            f"{stage_layout(p.split, holders)}; schedule {self.schedule}, up to {self.n_microbatches} microbatches{copies}"
        )

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every rank of a pipeline reads the same batches; the copies read different ones
        return {"num_replicas": self.replicas, "rank": self.replica}

    # ---------------------------------------------------------------- a step
    def pipeline_step(self, x: Any, target: Tensor, train: bool = True) -> tuple[Tensor, Any]:
        """Run the batch through the pipeline; return the batch's loss (on every rank of the pipeline) and the output.

        The output is the model's on the last stage's rank, ``None`` elsewhere. With ``train``,
        every stage's gradients are in place afterwards (averaged over the data-parallel copies).
        """
        pipeline = self.pipeline
        params = list(pipeline.module.parameters())
        earlier = [p.grad for p in params]  # an accumulation window's earlier batches: Lightning decides their fate
        if train:
            for p in params:
                p.grad = None
        loss, out = pipeline.step(x, target, train=train)
        handover = _GradsBack(params) if train else None  # this batch's gradients, off the parameters until backward
        if train:
            for p, grad in zip(params, earlier):
                p.grad = grad
        value = loss if loss is not None else torch.zeros((), device=self.root_device)
        value = value.to(self.root_device, torch.get_default_dtype()).clone()
        dist.broadcast(value, src=pipeline.global_rank(pipeline.n_stages - 1), group=self.pipeline_group)
        if handover is not None:
            value.requires_grad_()
            value.register_hook(handover)
        return value, out

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip every stage's gradients by their global L2 norm (over all stages, as in a single process)."""
        grads = [p.grad for p in self.pipeline.module.parameters() if p.grad is not None]
        local = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
        local = local.to(self.root_device)
        dist.all_reduce(local, group=self.pipeline_group)
        total = local.sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.device, g.dtype))
        return total

    # ---------------------------------------------------------------- checkpoints: every stage, one file
    def lightning_module_state_dict(self) -> dict[str, Any]:
        own = super().lightning_module_state_dict()
        if self.pipeline is None:
            return own
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, cpu_state(own))
        full: dict[str, Any] = {}
        for state in gathered:  # the stages in rank order: the last stage's metric states win
            full.update(state)
        return full

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        own = set(module.state_dict())
        module.load_state_dict({k: v for k, v in checkpoint["state_dict"].items() if k in own}, strict=strict)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        own = super().optimizer_state(optimizer)
        if self.pipeline is None:
            return own
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, cpu_state(own))
        return {"pipeline_ranks": gathered}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        states = [
            state["pipeline_ranks"][dist.get_rank()] if "pipeline_ranks" in state else state
            for state in checkpoint["optimizer_states"]
        ]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})


class _GradsBack:
    """Hands the schedule's gradients to Lightning's backward of the returned loss.

    Lightning zeroes gradients between the training step and its backward (at the start of an
    accumulation window), and scales the loss it backpropagates (``1 / accumulate_grad_batches``,
    an AMP scaler's factor). So the schedule's gradients (computed on parameters without any)
    are taken off when the step ends, and added, times the gradient that reaches the loss, when
    Lightning calls ``backward`` on it, as a backward of the loss would have.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = [p for p in params if p.grad is not None]
        self.grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    def __call__(self, scale: Tensor) -> None:
        with torch.no_grad():
            for p, grad in zip(self.params, self.grads):
                grad.mul_(scale.to(grad.device, grad.dtype))
                p.grad = grad if p.grad is None else p.grad.add_(grad)
        self.params, self.grads = [], []
