"""A ``Sequential`` split into pipeline stages over ranks, trained with ``torch.distributed.pipelining``.

Every rank builds the whole model (from the same config and seed), then keeps the contiguous
group of top-level stages of its pipeline stage: :class:`PipelineStageModule`, itself a
``Sequential`` of those stages under their own names, so parameter names, ``state_dict`` keys
and the guard's report read as in the single-process model. :class:`Pipeline` runs a step
through one of PyTorch's schedules (GPipe, 1F1B, interleaved 1F1B).

What passes between pipeline stages is what ``Sequential`` would pass: a tensor, a tuple, or a
mapping (a Hugging Face ``ModelOutput``), or what ``Sequential(outputs=...)`` picks of it. Its
tensors are sent flat; its structure (found from one microbatch, the first time a batch size
is seen) goes to the next stage once, with the tensors' shapes, so the stages are built with
static shapes and no forward runs on placeholder tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..modules import Sequential
from ..modules.sequential import as_call, describe_output
from .pipeline_split import balanced_split, check_split, stage_layout

SCHEDULES = ("gpipe", "1f1b", "interleaved")


class PipelineStageModule(Sequential):
    """One pipeline stage: a contiguous run of a ``Sequential``'s stages, with the hand-off to its neighbours.

    The first pipeline stage is called as the model is; a later one receives the previous
    stage's value flattened to its tensors and rebuilds it (a tuple is passed on positionally,
    a mapping by keyword, a value picked with ``outputs=`` as the one argument, as ``Sequential``
    does). A stage that is not the last returns its value's tensors as a flat tuple, which is
    what ``torch.distributed.pipelining`` sends.

    Args:
        model: the whole ``Sequential``.
        names: the names of the stages this pipeline stage holds, in order.
        index: this pipeline stage's index; ``n_stages``: how many there are.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = Sequential({"encoder": nn.Linear(4, 3), "head": nn.Linear(3, 2)})
        >>> first = PipelineStageModule(model, ["encoder"], 0, 2)
        >>> [name for name, _ in first.named_parameters()]
        ['encoder.weight', 'encoder.bias']
        >>> [t.shape for t in first(torch.zeros(5, 4))]
        [torch.Size([5, 3])]
    """

    def __init__(self, model: Sequential, names: Sequence[str], index: int, n_stages: int):
        picks = {n: model.stage_outputs[n] for n in names if n in model.stage_outputs}
        super().__init__({n: model.get_submodule(n) for n in names}, outputs=picks)
        self.pipeline_index, self.n_pipeline_stages = index, n_stages
        position = list(model.stage_names).index(names[0])
        previous = model.stage_names[position - 1] if position else None
        self.receives_picked = previous is not None and previous in model.stage_outputs
        self.sends_from = names[-1]  # the stage whose output this pipeline stage sends
        self.input_spec: Any = None  # the structure the previous pipeline stage sends (set by the hand-shake)
        self.output_spec: Any = None
        self.handoff = HandOffRecord()

    @property
    def is_first(self) -> bool:
        return self.pipeline_index == 0

    @property
    def is_last(self) -> bool:
        return self.pipeline_index == self.n_pipeline_stages - 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.is_first:
            self.handoff.watch_received(args)
            value = tree_unflatten(list(args), self.input_spec)
            args, kwargs = ((value,), {}) if self.receives_picked else as_call(value)
        out = super().forward(*args, **kwargs)
        if self.is_last:
            return out
        leaves, spec = self.flatten_output(out)
        if self.output_spec is None:  # the hand-shake's microbatch: what every later one sends
            self.output_spec = spec
        elif spec != self.output_spec:
            raise RuntimeError(
                f"pipeline stage {self.pipeline_index}: stage '{self.sends_from}' returned {describe_output(out)}, "
                "a different structure than in the first microbatch; a pipeline sends the same structure every time"
            )
        self.handoff.record_sent(leaves)
        return tuple(t.contiguous() for t in leaves)  # sent as they lie in memory: a slice is copied first

    def flatten_output(self, out: Any) -> tuple[list[Tensor], Any]:
        """``out``'s tensors and structure; a clear error naming the stage when something in it is not a tensor."""
        leaves, spec = tree_flatten(out)
        bad = [leaf for leaf in leaves if not isinstance(leaf, Tensor)]
        if bad or not leaves:
            what = f"holding a {type(bad[0]).__name__}" if bad else "holding no tensor"
            raise TypeError(
                f"pipeline stage {self.pipeline_index}: the output of stage '{self.sends_from}' cannot be sent to the "
                f"next pipeline stage: it is {describe_output(out)}, {what}; only tensors, or tuples, lists and "
                "mappings of tensors, cross a pipeline boundary. Pick what goes on with "
                f"Sequential(..., outputs={{'{self.sends_from}': <field name, index or function>}}), or move the "
                "boundary with the pipeline's split"
            )
        return leaves, spec


class HandOffRecord:
    """What crossed this pipeline stage's boundaries since the last :meth:`take`: for the guard's boundary check.

    ``sent_without_grad``: a floating tensor this stage sent did not require grad (its output was
    detached before it was sent). ``received`` / ``grads_back``: how many received tensors
    required grad, and how many of them got a gradient back in backward.
    """

    def __init__(self) -> None:
        self.sent_without_grad = False
        self.received = 0
        self.grads_back = 0
        self.recording = True
        self._handles: list[Any] = []

    def record_sent(self, leaves: Sequence[Tensor]) -> None:
        if self.recording and torch.is_grad_enabled():
            self.sent_without_grad |= any(t.is_floating_point() and not t.requires_grad for t in leaves)

    def watch_received(self, args: Sequence[Any]) -> None:
        if not (self.recording and torch.is_grad_enabled()):
            return
        for t in args:
            if isinstance(t, Tensor) and t.requires_grad:
                self.received += 1
                self._handles.append(t.register_hook(self._arrived))

    def _arrived(self, grad: Tensor) -> None:
        self.grads_back += 1

    def take(self) -> tuple[bool, bool]:
        """(sent without grad, a received tensor got no gradient back) since the last call; then forget."""
        for handle in self._handles:
            handle.remove()
        facts = (self.sent_without_grad, self.grads_back < self.received)
        self._handles.clear()
        self.sent_without_grad, self.received, self.grads_back = False, 0, 0
        return facts


class LocalStages(nn.Module):
    """The stages a rank holds under an interleaved schedule (several pipeline stages), under their own names."""

    def __init__(self, stages: Sequence[PipelineStageModule]):
        super().__init__()
        for stage in stages:
            for name in stage.stage_names:
                self.add_module(name, stage.get_submodule(name))


class _ScaledLoss:
    """The loss of one microbatch weighted by its share of the batch: the microbatch losses sum to the batch's mean loss."""

    def __init__(self, loss_fn: Callable[[Any, Any], Tensor]):
        self.loss_fn, self.batch_size = loss_fn, 1

    def __call__(self, output: Any, target: Tensor) -> Tensor:
        return self.loss_fn(output, target) * (len(target) / self.batch_size)


class _Failed(RuntimeError):
    """An earlier pipeline stage failed in the hand-shake (its message, passed on)."""


@dataclass
class _Run:
    """The torch stages and schedule for one batch size (the stages' buffers have static shapes)."""

    schedule: Any
    n_microbatches: int


def _example(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Tensors for ``PipelineStage``'s static shapes: detached, but saying whether they require grad."""
    return tuple(t.detach().requires_grad_(t.requires_grad) for t in tensors)


def _batch_size(x: Any) -> int:
    leaves = [t for t in tree_flatten(x)[0] if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError(f"pipeline: the batch input {type(x).__name__} holds no tensor to split into microbatches")
    return leaves[0].shape[0]


def microbatch_count(batch: int, wanted: int) -> int:
    """The most microbatches, at most ``wanted``, that split ``batch`` samples evenly (shapes are static per stage).

    >>> microbatch_count(64, 4), microbatch_count(30, 4), microbatch_count(7, 4)
    (4, 3, 1)
    """
    return max(m for m in range(1, min(wanted, batch) + 1) if batch % m == 0)


def pipeline_groups(pipeline_size: int) -> tuple[Any, Any, int]:
    """Process groups for PP x DP: ``(pipeline group, data-parallel group, replica index)`` of this rank.

    The world is ``pipeline_size * D`` ranks; pipeline ``d`` is ranks ``d*P .. d*P+P-1`` (stage ``s`` on
    rank ``d*P+s``), and the data-parallel group of stage ``s`` is ranks ``s, P+s, 2P+s, ...``, whose
    gradients are averaged. Every rank must call it (creating a group is a collective).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if pipeline_size < 1 or world % pipeline_size:
        raise ValueError(
            f"pipeline: {world} ranks cannot hold whole pipelines of {pipeline_size} stages each; use a number of "
            f"ranks that is a multiple of the pipeline size (PP x DP), or pipeline size {world}"
        )
    replicas = world // pipeline_size
    pipeline_group = replica_group = None
    for d in range(replicas):
        group = dist.new_group(list(range(d * pipeline_size, (d + 1) * pipeline_size)))
        if rank // pipeline_size == d:
            pipeline_group = group
    for s in range(pipeline_size):
        group = dist.new_group(list(range(s, world, pipeline_size)))
        if rank % pipeline_size == s:
            replica_group = group
    return pipeline_group, replica_group, rank // pipeline_size


class Pipeline:
    """A ``Sequential`` trained as a pipeline over the ranks of ``group``: this rank's part and the schedule.

    Call :meth:`step` on every rank of the pipeline with the same batch (only the first stage
    reads the input, only the last the target): it runs forward and backward of all
    microbatches, leaving each stage's gradients on its own parameters, scaled so that they
    equal the single-process model's on the whole batch for a mean-reduced loss.

    Args:
        model: the whole ``Sequential`` (every rank builds it the same way).
        loss_fn: ``(output, target) -> scalar`` mean over the batch, as in single-process training.
        split: the stage names of each pipeline stage (``[["encoder", "proj"], ["head"]]``);
            ``None``: balanced by parameter count.
        n_microbatches: microbatches per batch (fewer when the batch does not split evenly).
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved"`` (two pipeline stages per rank).
        group: the ranks of this pipeline, in stage order (``None``: every rank).
        replica_group: the data-parallel copies of this rank's stage (PP x DP, see
            :func:`pipeline_groups`): gradients are averaged over them after each step, each
            copy having run its own share of the data. ``None``: no copies.
        device: where this rank's stage runs (default: CPU).

    Example (one rank: the pipeline is the whole model)::

        pipeline = Pipeline(model, nn.MSELoss(), n_microbatches=4, schedule="1f1b")
        loss, output = pipeline.step(x, y)   # the loss and output on the last stage's rank, else None
        optimizer = torch.optim.SGD(pipeline.module.parameters(), lr=0.1)
    """

    def __init__(
        self,
        model: Sequential,
        loss_fn: Callable[[Any, Any], Tensor],
        *,
        split: Sequence[Sequence[str]] | None = None,
        n_microbatches: int = 4,
        schedule: str = "1f1b",
        group: Any = None,
        replica_group: Any = None,
        device: torch.device | str | None = None,
    ):
        if not isinstance(model, Sequential):
            raise TypeError(
                f"pipeline parallelism splits a composites.Sequential into stages; got {type(model).__name__}: "
                "use +composite=sequential (or wrap the model's parts in Sequential({...}))"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
        if int(n_microbatches) < 1:
            raise ValueError(f"pipeline n_microbatches={n_microbatches}: give at least 1")
        self.group = group if group is not None else dist.group.WORLD
        self.replica_group = replica_group
        self.replicas = dist.get_world_size(replica_group) if replica_group is not None else 1
        self.size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.per_rank = 2 if schedule == "interleaved" else 1
        n_stages = self.size * self.per_rank
        self.split = check_split(model, split, n_stages) if split is not None else balanced_split(model, n_stages)
        self.schedule_name, self.n_microbatches = schedule, int(n_microbatches)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.n_stages = n_stages
        self.local_indices = [self.rank + k * self.size for k in range(self.per_rank)]
        self.stages = [PipelineStageModule(model, self.split[i], i, n_stages) for i in self.local_indices]
        self.module: nn.Module = self.stages[0] if self.per_rank == 1 else LocalStages(self.stages)
        self.loss = _ScaledLoss(loss_fn)
        self._runs: dict[tuple[int, bool], _Run] = {}

    # ---------------------------------------------------------------- who holds what
    def global_rank(self, stage_index: int) -> int:
        """The global rank that holds pipeline stage ``stage_index`` of this pipeline."""
        if self.group is None or self.group == dist.group.WORLD:
            return stage_index % self.size
        return dist.get_global_rank(self.group, stage_index % self.size)

    def layout(self) -> str:
        """One line: which stages sit on which rank (of this pipeline)."""
        return stage_layout(self.split, [[self.global_rank(i)] for i in range(self.n_stages)])

    def boundary(self, index: int) -> str:
        """Names the boundary after pipeline stage ``index``: the sending stage and the receiving one, with ranks."""
        return (
            f"between stage '{self.split[index][-1]}' (rank {self.global_rank(index)}) and stage "
            f"'{self.split[index + 1][0]}' (rank {self.global_rank(index + 1)})"
        )

    @property
    def has_first(self) -> bool:
        return 0 in self.local_indices

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.local_indices

    # ---------------------------------------------------------------- a step
    def step(self, x: Any, target: Tensor, train: bool = True) -> tuple[Tensor | None, Any]:
        """Forward (and, with ``train``, backward) of one batch through the pipeline.

        Returns:
            ``(loss, output)`` on the rank of the last stage: the batch's mean loss (detached)
            and the model's output; ``(None, None)`` on the other ranks.
        """
        n = _batch_size(x) if x is not None else len(target)
        run = self._runs.get((n, train))
        if run is None:
            run = self._runs[(n, train)] = self._build(x, target, n, train)
        self.loss.batch_size = n
        for module in self.stages:  # what crossed the boundaries in an earlier step (no guard read it): forgotten
            module.handoff.take()
        losses: list[Tensor] = []
        args = (x,) if self.has_first else ()
        kwargs: dict[str, Any] = {"target": target, "losses": losses} if self.has_last else {}
        if train:
            out = run.schedule.step(*args, **kwargs)
            if self.replicas > 1:  # PP x DP: the mean over the copies, as DDP gives
                for p in self.module.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad, group=self.replica_group)
                        p.grad.div_(self.replicas)
        else:
            out = run.schedule.eval(*args, **kwargs)
        if not self.has_last:
            return None, None
        return torch.stack([loss.detach() for loss in losses]).sum(), out

    def _build(self, x: Any, target: Tensor, n: int, train: bool) -> _Run:
        from torch.distributed.pipelining import PipelineStage

        m = microbatch_count(n, self.n_microbatches)
        first_x = tree_map(lambda t: t[: n // m] if isinstance(t, Tensor) else t, x) if self.has_first else None
        examples = self._handshake(first_x, train)
        stages = [
            PipelineStage(
                module,
                module.pipeline_index,
                self.n_stages,
                self.device,
                input_args=inputs,
                output_args=outputs,
                group=self.group,
            )
            for module, (inputs, outputs) in zip(self.stages, examples)
        ]
        return _Run(self._schedule(stages, m), m)

    def _schedule(self, stages: list[Any], m: int) -> Any:
        from torch.distributed.pipelining import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
            ScheduleLoopedBFS,
        )

        loss, name = self.loss, self.schedule_name
        if name == "interleaved":
            rounds = max(1, m // self.size)
            if m % rounds == 0 and m >= self.size:
                return ScheduleInterleaved1F1B(stages, m, loss_fn=loss, scale_grads=False)
            return ScheduleLoopedBFS(stages, m, loss_fn=loss, scale_grads=False)  # same numbers, another order
        if name == "1f1b" and m >= self.n_stages:
            return Schedule1F1B(stages[0], m, loss_fn=loss, scale_grads=False)
        return ScheduleGPipe(stages[0], m, loss_fn=loss, scale_grads=False)  # 1F1B needs a microbatch per stage

    def _handshake(self, first_x: Any, train: bool) -> list[tuple[Any, Any]]:
        """Run one microbatch through the stages, in order, to find each boundary's structure and shapes.

        Each rank runs its stages on what the previous stage sends it (the real tensors of the
        first microbatch), under the step's grad mode, with the random state and buffers put back
        afterwards: the step itself draws and updates as the single-process model would. A stage
        that fails (an output that cannot be sent, say) tells the stages after it, and every rank
        of the pipeline raises the same error instead of waiting for the others.
        Returns, per local stage, the example inputs and outputs ``PipelineStage`` is built with.
        """
        examples: list[tuple[Any, Any]] = []
        failure: str | None = None
        grad = torch.enable_grad() if train and not torch.is_inference_mode_enabled() else torch.no_grad()
        p2p_device = self.device if self.device.type == "cuda" else None
        for module in self.stages:
            try:
                if module.is_first:
                    inputs: tuple = (first_x,)
                else:
                    box: list[Any] = [None]
                    dist.recv_object_list(
                        box, src=self.global_rank(module.pipeline_index - 1), group=self.group, device=p2p_device
                    )
                    if box[0][0] == "failed":
                        raise _Failed(box[0][1])
                    _, spec, metas = box[0]
                    module.input_spec = spec
                    inputs = tuple(
                        t.to(self.device).requires_grad_(train and rg and t.is_floating_point()) for t, rg in metas
                    )
                out = self._probe(module, inputs, grad)
                if module.is_last:
                    leaves = tree_flatten(out)[0]
                    outputs = _example(leaves) if leaves and all(isinstance(t, Tensor) for t in leaves) else None
                else:  # ``out`` is the flat tuple of tensors; forward kept its structure in output_spec
                    outputs = _example(out)
                    message = ("sent", module.output_spec, [(t.detach().cpu(), t.requires_grad) for t in out])
                    dist.send_object_list(
                        [message], dst=self.global_rank(module.pipeline_index + 1), group=self.group, device=p2p_device
                    )
                examples.append((_example(inputs) if all(isinstance(t, Tensor) for t in inputs) else None, outputs))
            except Exception as error:
                failure = str(error) if isinstance(error, _Failed) else f"{type(error).__name__}: {error}"
                if not module.is_last:
                    dist.send_object_list(
                        [("failed", failure)],
                        dst=self.global_rank(module.pipeline_index + 1),
                        group=self.group,
                        device=p2p_device,
                    )
                if module is not self.stages[-1]:  # an interleaved rank's later stage waits for the same news
                    continue
        verdicts: list[str | None] = [None] * self.size
        dist.all_gather_object(verdicts, failure, group=self.group)  # one answer on every rank of the pipeline
        first_failure = next((v for v in verdicts if v is not None), None)
        if first_failure is not None:
            raise RuntimeError(f"pipeline: setting up the stages from the first microbatch failed: {first_failure}")
        return examples

    def _probe(self, module: PipelineStageModule, inputs: tuple, grad: Any) -> Any:
        """``module(*inputs)`` leaving no trace: random state, buffers and the hand-off record as they were."""
        buffers = [(b, b.detach().clone()) for b in module.buffers()]
        module.handoff.recording = False
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), grad:
                return module(*inputs)
        finally:
            module.handoff.recording = True
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)

    # ---------------------------------------------------------------- what the guard asks
    def boundary_facts(self) -> dict[int, str]:
        """The boundaries this rank saw cut since the last call: boundary index -> why (its side of it)."""
        cuts: dict[int, str] = {}
        for module in self.stages:
            sent_without_grad, no_grad_back = module.handoff.take()
            if sent_without_grad and not module.is_last:
                cuts[module.pipeline_index] = (
                    f"the output of '{module.sends_from}' was sent without gradient (detached before it is sent)"
                )
            if no_grad_back and not module.is_first:
                cuts.setdefault(
                    module.pipeline_index - 1,
                    f"'{module.stage_names[0]}' received it with gradient but no gradient came back from it "
                    f"(cut inside pipeline stage {module.pipeline_index})",
                )
        return cuts
