"""What routing adds to a CompositeModule step: the gates' load-balancing loss and the capacity-dropped fraction."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def routing_terms(module: Any, loss: Tensor, stage: str, n: int, log_step: bool) -> Tensor:
    """Add ``module.load_balancing`` times its gates' balancing loss to a training ``loss``; keep the epoch means.

    ``module`` is a :class:`~composites.CompositeModule`: ``gates`` (score-routed Conditionals,
    when ``load_balancing`` is on), ``capacity_gates`` (those with a capacity) and ``epoch_means``.
    The balancing loss is logged as ``train/load_balancing_step`` on ``log_step`` steps (so a
    collapsing gate shows); the dropped fraction is accumulated on the device (no host read).

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> plain = SimpleNamespace(gates=[], capacity_gates=[], epoch_means={})
        >>> routing_terms(plain, torch.tensor(1.5), "train", 4, log_step=False)
        tensor(1.5000)
    """
    if stage == "train" and module.gates:
        balance = [g.load_balancing_loss() for g in module.gates if g.last_gate is not None]
        if balance:
            mean_balance = sum(balance) / len(balance)
            module.epoch_means["train_load_balancing"].update(mean_balance, n)
            if log_step:
                module.log("train/load_balancing_step", mean_balance, on_step=True, on_epoch=False, batch_size=n)
            loss = loss + module.load_balancing * sum(balance)
    dropped = [g.dropped / max(1, g.last_gate[1].numel()) for g in module.capacity_gates if g.dropped is not None]
    if dropped:
        module.epoch_means[f"{stage}_dropped"].update(sum(dropped) / len(dropped), n)
    return loss
