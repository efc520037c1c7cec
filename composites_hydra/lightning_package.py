"""The Lightning package of a run: the one its Trainer comes from, for every Lightning class the configs name.

``lightning`` and ``pytorch_lightning`` ship ``ModelCheckpoint``, ``CSVLogger``, ... twice, and a Trainer
takes only its own package's callbacks and loggers. So the configs name Lightning's classes through the
``lightning`` resolver, which follows the run's ``trainer._target_``::

    _target_: ${lightning:callbacks.ModelCheckpoint}
    # pytorch_lightning.callbacks.ModelCheckpoint, or with trainer._target_=lightning.Trainer:
    # lightning.pytorch.callbacks.ModelCheckpoint

composites' own Lightning classes follow the same package through
:func:`composites.training.using_lightning` around the builds (:func:`composites_hydra.build`).
Importing ``composites_hydra`` registers the resolver.
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import OmegaConf

from composites.training import package_of

API = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}  # where each keeps its classes
DEFAULT = "pytorch_lightning"  # composites' own dependency: a node resolved without a trainer in its config


def trainer_package(target: str) -> str:
    """The Lightning package of a Trainer ``_target_``: its top-level package, or that of the class it names.

    Raises:
        ValueError: ``target`` cannot be imported, or is not a Lightning Trainer (the message says which).

    >>> trainer_package("lightning.Trainer"), trainer_package("pytorch_lightning.Trainer")
    ('lightning', 'pytorch_lightning')
    """
    top = target.split(".")[0]
    if top in API:
        return top
    module, _, name = target.rpartition(".")
    try:  # a user's Trainer subclass: the package of the Trainer it derives from
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"trainer._target_={target} cannot be imported: {error}") from None
    package = package_of(cls)
    if package is not None:
        return package
    raise ValueError(
        f"trainer._target_={target} is not a Lightning Trainer: use pytorch_lightning.Trainer, "
        "lightning.Trainer or a subclass of one"
    )


def lightning_class(name: str, _root_: Any = None) -> str:
    """The ``lightning`` resolver: ``name`` (``callbacks.ModelCheckpoint``) in the package of the config's trainer.

    >>> cfg = OmegaConf.create({"trainer": {"_target_": "lightning.Trainer"}, "ckpt": "${lightning:callbacks.ModelCheckpoint}"})
    >>> cfg.ckpt
    'lightning.pytorch.callbacks.ModelCheckpoint'
    """
    target = OmegaConf.select(_root_, "trainer._target_", default=None) if _root_ is not None else None
    try:
        package = trainer_package(str(target)) if target else DEFAULT
    except ValueError:  # build() names the bad trainer._target_; the resolver only has to return a name
        package = DEFAULT
    return f"{API[package]}.{name}"


def register_resolver() -> None:
    """Register ``${lightning:NAME}`` with OmegaConf (once; importing ``composites_hydra`` does it)."""
    if not OmegaConf.has_resolver("lightning"):
        OmegaConf.register_new_resolver("lightning", lightning_class)


register_resolver()
