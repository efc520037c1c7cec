"""Make a Lightning strategy fit the model before it wraps it: routing under DDP, FSDP refused."""

from __future__ import annotations

from torch import nn

from ..modules import Conditional


def prepare_strategy(strategy: object, model: nn.Module, guard_on: bool) -> str | None:
    """Adjust ``strategy`` for ``model`` before Lightning wraps it; return what was chosen and why.

    A :class:`Conditional` leaves branches unused on a rank, which plain DDP answers with
    "Expected to have finished reduction" (unused on every rank) or a hang (unused on some).
    So with a Conditional anywhere in the model, DDP is switched to
    ``find_unused_parameters=True``. The guard cannot see through FSDP's flattened
    parameters yet, so FSDP with the guard on is refused with the way out.

    Example:
        >>> from pytorch_lightning.strategies import DDPStrategy
        >>> from torch import nn
        >>> strategy = DDPStrategy()
        >>> model = Conditional({"a": nn.Identity(), "b": nn.Identity()}, router=None)
        >>> print(prepare_strategy(strategy, model, guard_on=True))
        DDP: find_unused_parameters=True, because the Conditional the model routes samples to a subset of its branches, so a rank can leave a branch unused
        >>> strategy._ddp_kwargs["find_unused_parameters"]
        True
    """
    from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy  # Lightning only when training

    if isinstance(strategy, FSDPStrategy) and guard_on:
        raise RuntimeError(
            "the gradient guard does not support FSDP yet (FSDP flattens parameters, so per-parameter "
            "gradients cannot be checked): use trainer=ddp, or turn the guard off with guard=off"
        )
    if not isinstance(strategy, DDPStrategy):
        return None
    routed = [path for path, module in model.named_modules() if isinstance(module, Conditional)]
    kwargs = strategy._ddp_kwargs  # read by DDPStrategy when it wraps the model in strategy.setup()
    if not routed or kwargs.get("find_unused_parameters"):
        return None
    kwargs["find_unused_parameters"] = True
    where = ", ".join(f"'{p}'" if p else "the model" for p in routed)
    return (
        f"DDP: find_unused_parameters=True, because the Conditional {where} routes samples to a subset "
        "of its branches, so a rank can leave a branch unused"
    )
