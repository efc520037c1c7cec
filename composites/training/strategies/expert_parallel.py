"""Expert parallelism through Lightning: DDP for everything but the experts, which are spread over ranks.

The behaviour is written once, in :class:`ExpertParallelStrategyBase` (no Lightning import); the real
strategies are that base over each package's ``DDPStrategy``: ``composites.training.ExpertParallelStrategy``
(``pytorch_lightning``) and ``composites.training.lightning.ExpertParallelStrategy``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ...parallelism import ExpertParallel, shard_experts
from .prepare import cpu_state

_SAVED = "expert_parallel"  # the key under which an optimizer state holds every rank's own


class ExpertParallelStrategyBase:
    """Spread each per-sample-routed ``Conditional``'s experts over an expert-parallel group; DDP for the rest.

    Before DDP wraps the model, every rank drops the experts it does not hold
    (:func:`~composites.parallelism.shard_experts`) and DDP is told to ignore the experts it
    keeps: their gradients come from every rank through the all-to-all and are averaged over
    copies of the shard only. The optimizer and the gradient guard are built after, on what
    this rank holds. One line at start says which Conditionals, experts per rank, group sizes.

    Checkpoints hold the full single-process model (every expert, gathered), so the file loads
    into the model trained without expert parallelism, and resuming at any size restores the
    weights. The optimizer state is per rank (each holds its own experts' moments): resuming it
    needs the same world size and ``expert_parallel_size``, else a clear error.

    Args:
        expert_parallel_size: ranks that share one copy of the experts (``None``: all ranks);
            it must divide the world size and every routed Conditional's number of experts.
        **kwargs: ``DDPStrategy`` arguments.

    Example:
        >>> from composites.training import ExpertParallelStrategy  # over pytorch_lightning's DDPStrategy
        >>> ExpertParallelStrategy(expert_parallel_size=2).expert_parallel_size
        2
    """

    def __init__(self, expert_parallel_size: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.expert_parallel_size = expert_parallel_size
        self.expert_parallel: ExpertParallel | None = None

    def spread(self) -> ExpertParallel:
        """Spread the module's experts over the ranks, once (resuming loads the weights before ``setup``)."""
        if self.expert_parallel is None:  # fit then test reuse the spread model
            module = self.lightning_module
            self.expert_parallel = shard_experts(module, self.expert_parallel_size)
            ignored = sorted(self.expert_parallel.expert_parameter_names)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
            if self.global_rank == 0:
                print(self.expert_parallel.summary(), flush=True)
        return self.expert_parallel

    def setup(self, trainer: Any) -> None:
        self.spread()
        super().setup(trainer)
        wrapped = getattr(self.model, "parameters_to_ignore", None)  # DDP's, when it wrapped the module
        if wrapped is not None and not self.expert_parallel.expert_parameter_names <= set(wrapped):
            raise RuntimeError(
                "trainer=expert_parallel: DDP did not take the expert parameters out of its all-reduce (it wraps "
                f"{type(self.model.module).__name__}, not the LightningModule?); the experts would be averaged "
                "across ranks that hold different ones"
            )

    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        self.expert_parallel.reduce_replica_grads(self.lightning_module)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # every rank takes part (the experts are gathered); rank 0 writes the file
        return self.expert_parallel.full_state_dict(self.lightning_module)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        module.load_state_dict(self.spread().local_state_dict(checkpoint["state_dict"], module), strict=strict)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        own = cpu_state(super().optimizer_state(optimizer))  # unpickled on the sender's device otherwise
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, own)
        groups = self.expert_parallel.groups
        return {_SAVED: {"world_size": groups.world_size, "expert_parallel_size": groups.ep_size, "ranks": every}}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        groups = self.expert_parallel.groups
        states = []
        for state in checkpoint["optimizer_states"]:
            saved = state.get(_SAVED) if isinstance(state, Mapping) else None
            if saved is None:
                raise ValueError(
                    "resuming with trainer=expert_parallel: the checkpoint's optimizer state was not saved under "
                    "expert parallelism (each rank holds its own experts' state); resume it with the strategy it was "
                    "trained with, or load only the weights (its state_dict is the full model)"
                )
            if (saved["world_size"], saved["expert_parallel_size"]) != (groups.world_size, groups.ep_size):
                raise ValueError(
                    f"resuming with trainer=expert_parallel: the checkpoint was saved on {saved['world_size']} ranks "
                    f"with expert_parallel_size={saved['expert_parallel_size']}, this run has {groups.world_size} ranks "
                    f"with expert_parallel_size={groups.ep_size}; the optimizer state of each rank's experts cannot be "
                    "moved to other ranks: resume with the same trainer.devices * trainer.num_nodes and "
                    "trainer.strategy.expert_parallel_size, or start a new run from the weights only (the checkpoint's "
                    "state_dict is the full single-process model)"
                )
            states.append(saved["ranks"][dist.get_rank()])
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})
