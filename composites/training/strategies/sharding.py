"""FSDP2 sharding of a composite: one ``fully_shard`` unit per sub-model, then the root."""

from __future__ import annotations

import fnmatch
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ...modules import Parallel, Sequential

# a policy: the model -> groups of module paths, each group one unit (``fully_shard([a, b])``)
Policy = Callable[[nn.Module], list[list[str]]]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def composite_units(model: nn.Module, may_skip: Sequence[str] = ()) -> list[list[str]]:
    """The default policy: every stage of a ``Sequential`` and branch of a ``Parallel`` is a unit, and
    a ``Conditional`` (its router and all its branches, experts) is one unit; nested composites recurse.

    A branch of a ``Conditional`` is not a unit of its own: FSDP2 all-gathers, prefetches and
    reduce-scatters per unit in the order the units ran, so a unit that one rank routes samples to
    and another does not (or a grouped unit that ran in full on one rank and in part on another)
    puts the ranks' collectives out of step: a size mismatch or a hang. As one unit the
    ``Conditional`` runs on every rank, and a branch a rank left unused is reduce-scattered as zeros
    (``set_reduce_scatter_unused_params(True)``). For the same reason a module all of whose
    parameters match ``may_skip`` patterns (a layer LayerDrop may skip) stays in its parent's unit.

    Example:
        >>> from composites import Conditional, Parallel, Sequential
        >>> model = Sequential({"encoder": nn.Linear(2, 4), "mix": Parallel({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)}),
        ...                     "moe": Conditional({"x": nn.Linear(4, 4), "y": nn.Linear(4, 4)}, router=lambda h: "x")})
        >>> composite_units(model)
        [['encoder'], ['mix'], ['mix.a'], ['mix.b'], ['moe']]
    """

    def skippable(path: str, module: nn.Module) -> bool:
        # a module all of whose parameters may be skipped: LayerDrop's layer, not the encoder around it
        return bool(may_skip) and all(
            any(fnmatch.fnmatchcase(f"{path}.{name}", pattern) for pattern in may_skip)
            for name, _ in module.named_parameters()
        )

    units: list[list[str]] = []

    def visit(path: str, module: nn.Module) -> None:
        if not isinstance(module, (Sequential, Parallel)):  # a Conditional is a unit whole, with its branches
            return
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if not _has_params(child) or skippable(child_path, child):
                continue
            units.append([child_path])
            visit(child_path, child)

    visit("", model)
    return units


def units_matching(patterns: Sequence[str]) -> Policy:
    """A policy from glob patterns over module paths (``"encoder.layers.*"``): each match is a unit.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
        >>> units_matching(["*"])(model)
        [['0'], ['1'], ['1.0']]
    """

    def policy(model: nn.Module) -> list[list[str]]:
        return [
            [path]
            for path, module in model.named_modules()
            if path and _has_params(module) and any(fnmatch.fnmatchcase(path, p) for p in patterns)
        ]

    return policy


def shard_composite(
    model: nn.Module,
    mesh: Any,
    policy: Policy | Sequence[str] | None = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
    may_skip: Sequence[str] = (),
) -> list[list[str]] | None:
    """``fully_shard`` each unit the policy picks, innermost first, then ``model`` itself; return the units.

    Returns ``None`` (and does nothing) when ``model`` is sharded already.

    Args:
        model: the composite (not yet sharded).
        mesh: a 1-D device mesh over the data-parallel ranks.
        policy: ``None`` for :func:`composite_units`, a list of glob patterns over module paths
            (:func:`units_matching`), or a callable ``model -> [[path, ...], ...]``.
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (or ``None``).
        reshard_after_forward: free the gathered parameters after each unit's forward.
        may_skip: glob patterns over parameter names of parameters that may get no gradient.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):  # configure_model runs again for trainer.test: already sharded
        return None
    if policy is None:
        units = composite_units(model, may_skip)
    elif callable(policy):
        units = policy(model)
    else:
        units = units_matching(list(policy))(model)
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    kwargs["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    for group in sorted(units, key=lambda g: -max(p.count(".") for p in g)):  # children before parents
        modules = [model.get_submodule(p) for p in group]
        fully_shard(modules if len(modules) > 1 else modules[0], **kwargs)
    fully_shard(model, **kwargs)
    return units


def full_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A sharded checkpoint folder (``FSDP2Strategy``, ``save_distributed_checkpoint=True``) as one ordinary
    Lightning checkpoint with whole tensors, read in this process alone (no process group).

    ``torch.save(full_checkpoint(folder), "full.ckpt")`` gives a file that ``CompositeModule.load_from_checkpoint``,
    a single-device run, or an inspection reads like any other (Lightning's ``consolidate_checkpoint``
    expects Fabric's layout, not this one).
    """
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(folder, Path(tmp) / "full.pt")
        shards = torch.load(Path(tmp) / "full.pt", weights_only=False)
    checkpoint = torch.load(folder / "meta.pt", weights_only=False)  # everything but the tensors
    checkpoint["state_dict"] = shards.pop("state_dict")
    count = sum(1 for key in shards if key.startswith("optimizer_"))
    checkpoint["optimizer_states"] = [shards[f"optimizer_{i}"] for i in range(count)]
    return checkpoint
