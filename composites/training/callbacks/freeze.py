"""Freeze sub-models for the first epochs of training (a pretrained encoder), then train them too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning_utilities.core.rank_zero import rank_zero_info
from torch import nn

from ..packages import check_same_package

if TYPE_CHECKING:
    import pytorch_lightning as pl


class FreezeSubmodelsBase:
    """Keep the named sub-models frozen until epoch ``unfreeze_at_epoch`` (or for good), then train them.

    The sub-models' parameters are in the ONE optimizer from the start (this callback makes
    them trainable in ``setup``, before ``configure_optimizers``, and freezes them when fit
    starts; frozen for good, ``unfreeze_at_epoch=None``, they are left out), so unfreezing needs no new parameter group: they train under the group their
    name puts them in (``param_groups: [{prefix: encoder, lr: 1e-4}]`` gives a pretrained
    encoder a smaller learning rate), and a resumed run's optimizer state fits as saved. A
    frozen parameter gets no gradient, so the optimizer leaves it as it is. Should a
    ``LightningModule`` of your own build its optimizer from trainable parameters only, the
    unfrozen ones are added as a group named after the sub-model, with the optimizer's
    defaults.

    The gradient guard follows: frozen parameters are not problems (the report counts them
    as ``frozen``), and from the first backward after unfreezing they are checked like any
    other. Under DDP the model is wrapped while they are trainable, with
    ``find_unused_parameters=True``, so their gradients are reduced once they train.
    Only gradients are frozen: BatchNorm running statistics still update in train mode.
    The callback is ``composites.training.FreezeSubmodels`` (``pytorch_lightning``) or
    ``composites.training.lightning.FreezeSubmodels``.

    Args:
        names: qualified sub-model names (``"encoder"``, ``"fuse.image"``), looked up in the
            LightningModule's ``model`` when it has one (:class:`CompositeModule`), else in
            the LightningModule itself.
        unfreeze_at_epoch: the first epoch (0-based) in which they train; ``None``: never.

    Example:
        >>> from functools import partial
        >>> import torch
        >>> from torch import nn
        >>> import pytorch_lightning as pl
        >>> from composites import CompositeModule, Sequential
        >>> from composites.training import FreezeSubmodels
        >>> model = Sequential({"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 2)})
        >>> module = CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
        >>> trainer = pl.Trainer(max_epochs=2, callbacks=[FreezeSubmodels(["encoder"], unfreeze_at_epoch=1)],
        ...                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(module, train_dataloaders=data)
        >>> model.encoder.weight.requires_grad  # trained in epoch 1
        True
    """

    def __init__(self, names: Sequence[str] | str, unfreeze_at_epoch: int | None = None):
        super().__init__()
        self.names = [names] if isinstance(names, str) else [str(n) for n in names]
        if not self.names:
            raise ValueError("FreezeSubmodels(names=...) is empty: name the sub-models to freeze, e.g. ['encoder']")
        if unfreeze_at_epoch is not None and (
            not isinstance(unfreeze_at_epoch, int) or isinstance(unfreeze_at_epoch, bool) or unfreeze_at_epoch < 0
        ):
            raise ValueError(f"unfreeze_at_epoch={unfreeze_at_epoch!r} must be an epoch number >= 0, or None (never)")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.frozen = False

    def submodels(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        """The named sub-models, looked up in ``pl_module.model`` (or ``pl_module``); an unknown name is an error."""
        root = pl_module.model if isinstance(getattr(pl_module, "model", None), nn.Module) else pl_module
        found = []
        for name in self.names:
            try:
                found.append((name, root.get_submodule(name)))
            except AttributeError:
                children = ", ".join(n for n, _ in root.named_children()) or "(none)"
                raise ValueError(
                    f"FreezeSubmodels: no sub-model '{name}' in the {type(root).__name__}; its top-level "
                    f"sub-models are: {children} (nested ones by dotted name, e.g. 'encoder.layers')"
                ) from None
        return found

    def _set(self, pl_module: pl.LightningModule, trainable: bool) -> None:
        for _, module in self.submodels(pl_module):
            module.requires_grad_(trainable)
        self.frozen = not trainable

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_same_package(self, trainer)
        if stage != "fit":
            return
        if self.unfreeze_at_epoch is None:  # frozen for good: the optimizer and DDP never see them
            self._set(pl_module, False)
            return
        self._set(pl_module, True)  # so the optimizer (and DDP) are built holding them
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)  # DDPStrategy of either package, before it wraps
        if isinstance(ddp_kwargs, dict):
            ddp_kwargs["find_unused_parameters"] = True  # frozen epochs leave them unused in backward

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(pl_module, False)
        rank_zero_info(
            f"FreezeSubmodels: {', '.join(self.names)} frozen"
            + (f" until epoch {self.unfreeze_at_epoch}" if self.unfreeze_at_epoch is not None else "")
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.frozen or self.unfreeze_at_epoch is None or trainer.current_epoch < self.unfreeze_at_epoch:
            return
        self._set(pl_module, True)
        for optimizer in trainer.optimizers:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for name, module in self.submodels(pl_module):
                new = [p for p in module.parameters() if id(p) not in held]
                if new:
                    optimizer.add_param_group({"params": new, "name": name})
                    held.update(id(p) for p in new)
        rank_zero_info(f"FreezeSubmodels: {', '.join(self.names)} unfrozen at epoch {trainer.current_epoch}")
