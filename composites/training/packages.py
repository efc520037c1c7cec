"""The two Lightning packages: which one an object belongs to, and where each keeps its classes.

``lightning`` (``import lightning as L``) and ``pytorch_lightning`` ship the same Trainer twice, with
two unrelated ``LightningModule``/``Callback``/``LightningDataModule`` classes, and each Trainer takes
only its own. composites writes each of its Lightning classes once as a base class that imports no
Lightning (``CompositeModuleBase``, ``GradientGuardCallbackBase``, ...) and declares a real subclass
per package, chosen by import path:

- ``composites.training.pytorch_lightning`` (also ``composites.training.<Name>`` and
  ``composites.CompositeModule``): subclasses of ``pytorch_lightning``'s classes;
- ``composites.training.lightning``: subclasses of ``lightning.pytorch``'s classes.

A base class that needs a package-specific thing asks the instance (:func:`package_of`), never a
global choice. This module is the one map of the two packages.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ..modules import is_under

PACKAGES = ("pytorch_lightning", "lightning")  # composites' own dependency first
API = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}  # where each keeps its classes
# composites' Lightning classes: each declared in composites.training.pytorch_lightning and .lightning
LIGHTNING_CLASSES = (
    "CompositeModule",
    "GradientGuardCallback",
    "GradNormPlot",
    "DigitsDataModule",
    "TerminalProgress",
    "StepCheckpoint",
    "SignalCheckpoint",
    "ResumeState",
    "FreezeSubmodels",
    "FSDP2Strategy",
    "ExpertParallelStrategy",
    "PipelineStrategy",
)


def package_name(name: str) -> str:
    """The Lightning package of a dotted name (``"lightning.Trainer"`` -> ``"lightning"``).

    Raises:
        ValueError: the name is under neither package (the message names both).

    >>> package_name("lightning.pytorch.Trainer"), package_name("pytorch_lightning")
    ('lightning', 'pytorch_lightning')
    """
    top = name.split(".")[0]
    if top not in PACKAGES:
        raise ValueError(f"unknown Lightning package '{name}': use one of {', '.join(PACKAGES)}")
    return top


def lightning_api(package: str) -> ModuleType:
    """The module holding ``package``'s Trainer, LightningModule and Callback.

    >>> lightning_api("pytorch_lightning").__name__
    'pytorch_lightning'
    """
    return importlib.import_module(API[package_name(package)])


def composites_classes(package: str) -> ModuleType:
    """composites' own classes for ``package``: ``composites.training.lightning`` or ``...pytorch_lightning``.

    >>> composites_classes("pytorch_lightning").__name__
    'composites.training.pytorch_lightning'
    """
    return importlib.import_module(f"{__package__}.{package_name(package)}")


def package_of(obj: Any) -> str | None:
    """The Lightning package an object (a Trainer, a strategy, a class) belongs to, or ``None``.

    >>> import pytorch_lightning as pl
    >>> package_of(pl.Trainer), package_of(3)
    ('pytorch_lightning', None)
    """
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in cls.__mro__:
        for package, api in API.items():
            if is_under(klass.__module__, api):
                return package
    return None


def trainer_package(target: str) -> str:
    """The Lightning package of a Trainer's dotted path (a config's ``trainer._target_``).

    The top-level package when it is one of the two, else the package of the Trainer the named class
    derives from (a user's ``my_project.MyTrainer``).

    Raises:
        ValueError: ``target`` cannot be imported, or is not a Lightning Trainer (the message says which).

    >>> trainer_package("lightning.Trainer"), trainer_package("pytorch_lightning.Trainer")
    ('lightning', 'pytorch_lightning')
    """
    top = target.split(".")[0]
    if top in PACKAGES:
        return top
    module, _, name = target.rpartition(".")
    try:
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


def spans_processes(strategy: Any) -> bool:
    """Whether a Lightning strategy is a parallel one (DDP, FSDP, ...) of its own package, else single-device.

    >>> from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
    >>> spans_processes(DDPStrategy()), spans_processes(SingleDeviceStrategy("cpu"))
    (True, False)
    """
    package = package_of(strategy)
    return package is not None and isinstance(strategy, lightning_api(package).strategies.ParallelStrategy)


def check_same_package(obj: Any, trainer: Any) -> None:
    """Raise a ``TypeError`` naming the import to use when ``obj`` and ``trainer`` are of different packages.

    Our callbacks call it in ``setup``, the first hook that sees the Trainer, and ``DigitsDataModule``
    when the Trainer attaches it. A ``CompositeModule`` (or ``FSDP2Strategy``) of the other package
    never gets that far: the Trainer refuses it first, with Lightning's own message
    (``TypeError: `model` must be a `LightningModule` or `torch._dynamo.OptimizedModule`, got
    `CompositeModule```; ``ValueError: You selected an invalid strategy name: ...``).

    >>> import lightning as L
    >>> from composites.training.pytorch_lightning import ResumeState
    >>> check_same_package(ResumeState(), L.Trainer(logger=False))
    Traceback (most recent call last):
      ...
    TypeError: ResumeState is pytorch_lightning's but the Trainer is lightning's: use `from composites.training.lightning import ResumeState`
    """
    mine, theirs = package_of(obj), package_of(trainer)
    if mine is None or theirs is None or mine == theirs:
        return
    name = type(obj).__name__
    raise TypeError(
        f"{name} is {mine}'s but the Trainer is {theirs}'s: use `from composites.training.{theirs} import {name}`"
    )
