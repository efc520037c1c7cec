"""One class, both Lightning packages: behaviour written once, made concrete for ``lightning`` or ``pytorch_lightning``.

``lightning`` (``import lightning as L``) and ``pytorch_lightning`` ship the same Trainer twice, with
two unrelated ``LightningModule``/``Callback``/``LightningDataModule`` classes, and each Trainer takes
only its own. So composites writes each of its Lightning classes once, as a :class:`Flavoured` class
that is not yet a Lightning class, and makes it one when it is instantiated:

- ``composites.training.lightning.X`` and ``composites.training.pytorch_lightning.X`` are the concrete
  classes of each package (for a program that imports both, or for ``isinstance`` checks);
- ``composites.X(...)`` (what Hydra's ``_target_: composites.X`` calls) builds the concrete class of
  the Lightning package the PROGRAM has imported when the object is created: ``lightning`` if only
  it is imported, ``pytorch_lightning`` if only that one is. Once an object was built that way, the
  program keeps that package even when the other one is imported later (by a library, say). When
  both or neither are imported before any object is built: ``pytorch_lightning`` (composites' own
  dependency). :func:`using_lightning` pins the choice for a block; the classes in
  ``composites.training.lightning`` / ``composites.training.pytorch_lightning`` are fixed.
- A user's subclass of ``composites.X`` follows the same rule.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType
from typing import Any, ClassVar

from ..modules import is_under

PACKAGES = ("pytorch_lightning", "lightning")  # the default first
_API = {"pytorch_lightning": "pytorch_lightning", "lightning": "lightning.pytorch"}  # where each keeps its classes
_pinned: ContextVar[str | None] = ContextVar("composites_lightning", default=None)
_first: str | None = None  # the package the first object was built for while only it was imported
# Every class written once for both packages: name -> module. composites.training.lightning and
# composites.training.pytorch_lightning hold a concrete class of each.
WRITTEN_ONCE = {
    "CompositeModule": "composites.training.module",
    "GradientGuardCallback": "composites.training.guard_callback",
    "GradNormPlot": "composites.training.grad_norm_callback",
    "DigitsDataModule": "composites.presets.data",
    "TerminalProgress": "composites.training.run_output",
    "StepCheckpoint": "composites.training.checkpoints",
    "SignalCheckpoint": "composites.training.signals",
    "ResumeState": "composites.training.resume_state",
    "FreezeSubmodels": "composites.training.freeze",
    "FSDP2Strategy": "composites.training.fsdp2_strategy",
}
_concrete: dict[tuple[type, str], type] = {}  # (written-once class, package) -> concrete class
_dynamic: dict[type, tuple[type, str]] = {}  # concrete classes made for user subclasses -> (their class, package)


def _package_name(package: str) -> str:
    top = package.split(".")[0]  # "lightning.pytorch.Trainer" -> "lightning"
    if top not in PACKAGES:
        raise ValueError(f"unknown Lightning package '{package}': use one of {', '.join(PACKAGES)}")
    return top


def lightning_api(package: str) -> ModuleType:
    """The module holding ``package``'s Trainer, LightningModule and Callback.

    >>> lightning_api("pytorch_lightning").__name__
    'pytorch_lightning'
    """
    return importlib.import_module(_API[_package_name(package)])


def package_of(obj: Any) -> str | None:
    """The Lightning package an object (a Trainer, a strategy, a class) belongs to, or ``None``.

    >>> import pytorch_lightning as pl
    >>> package_of(pl.Trainer), package_of(3)
    ('pytorch_lightning', None)
    """
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in cls.__mro__:
        for package, api in _API.items():
            if is_under(klass.__module__, api):
                return package
    return None


def spans_processes(strategy: Any) -> bool:
    """Whether a Lightning strategy is a parallel one (DDP, FSDP, ...) of its own package, else single-device.

    >>> from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
    >>> spans_processes(DDPStrategy()), spans_processes(SingleDeviceStrategy("cpu"))
    (True, False)
    """
    package = package_of(strategy)
    return package is not None and isinstance(strategy, lightning_api(package).strategies.ParallelStrategy)


def chosen_package() -> str:
    """The package a ``composites.X(...)`` call builds for now (see the module docstring for the rule).

    >>> with using_lightning("lightning"):
    ...     chosen_package()
    'lightning'
    """
    global _first
    pinned = _pinned.get()
    if pinned is not None:
        return pinned
    imported = [p for p in PACKAGES if _API[p] in sys.modules]
    if len(imported) == 1:
        _first = _first or imported[0]
        return imported[0]
    if _first is not None:  # the other one came in later (a library, a strategy module): the program's stays
        return _first
    installed = [p for p in PACKAGES if importlib.util.find_spec(p) is not None]
    if not installed:
        raise ImportError("composites' Lightning classes need Lightning: pip install pytorch-lightning (or lightning)")
    return installed[0]


@contextmanager
def using_lightning(package: str) -> Iterator[None]:
    """Build composites' Lightning classes for ``package`` inside the block (a program importing both).

    ``package`` may be a dotted path such as a Trainer's ``_target_`` (``"lightning.Trainer"``).

    >>> from composites import GradNormPlot
    >>> with using_lightning("lightning.Trainer"):
    ...     plot = GradNormPlot()
    >>> package_of(plot)
    'lightning'
    """
    token = _pinned.set(_package_name(package))
    try:
        yield
    finally:
        _pinned.reset(token)


def _rebuild(cls: type, package: str) -> Any:
    concrete = concrete_class(cls, package)
    return concrete.__new__(concrete)


def concrete_class(cls: type, package: str | None = None) -> type:
    """``cls`` made a class of ``package``'s Lightning (the chosen package by default).

    A class that already derives from a Lightning class is returned as it is.
    """
    if package_of(cls) is not None:
        return cls
    package = _package_name(package or chosen_package())
    key = (cls, package)
    if key not in _concrete:
        importlib.import_module(f"{__package__}.{package}")  # composites' own concrete classes register there
    if key not in _concrete:  # a user's subclass: made here, pickled through _rebuild
        _concrete[key] = made = _make(cls, package, cls.__module__)
        _dynamic[made] = key
    return _concrete[key]


def _make(cls: type, package: str, module: str) -> type:
    base = functools.reduce(getattr, cls.lightning_base.split("."), lightning_api(package))
    doc = f"{cls.__name__} as a {package} {cls.lightning_base}: see :class:`{cls.__module__}.{cls.__qualname__}`."
    namespace = {"__module__": module, "__qualname__": cls.__qualname__, "__doc__": doc}  # no doctest run twice
    return _metaclass(type(cls), type(base))(cls.__name__, (cls, base), namespace)


@functools.cache
def _metaclass(ours: type, theirs: type) -> type:
    """A metaclass deriving from both: Lightning's strategies are ABCs (``ABCMeta``)."""
    if issubclass(ours, theirs) or issubclass(theirs, ours):
        return ours if issubclass(ours, theirs) else theirs
    return type(f"{ours.__name__}{theirs.__name__}", (ours, theirs), {})


def materialise(package: str, module: str) -> dict[str, type]:
    """The concrete classes of ``package`` for every class in :data:`WRITTEN_ONCE`, as attributes of ``module``."""
    made = {}
    for name, where in WRITTEN_ONCE.items():
        cls = getattr(importlib.import_module(where), name)
        made[name] = _concrete[(cls, package)] = _make(cls, package, module)
    return made


class _Forwarding(type):
    """Class attributes a written-once class lacks (``load_from_checkpoint``, ...) come from its concrete class."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") or package_of(cls) is not None:
            raise AttributeError(f"type object '{cls.__name__}' has no attribute '{name}'")
        return getattr(concrete_class(cls), name)


class Flavoured(metaclass=_Forwarding):
    """Base of a class written once for both Lightning packages; instances are of the chosen package's class.

    Class attributes of the Lightning class come through the chosen package's concrete class too:
    ``composites.CompositeModule.load_from_checkpoint(path, model=...)``.

    A subclass names the Lightning class it becomes in ``lightning_base`` (``"LightningModule"``,
    ``"Callback"``, ``"LightningDataModule"``, ``"strategies.ModelParallelStrategy"``) and must not
    import Lightning at module level.

    Example:
        >>> class Hello(Flavoured):
        ...     lightning_base = "Callback"
        >>> with using_lightning("lightning"):
        ...     package_of(Hello())
        'lightning'
    """

    lightning_base: ClassVar[str]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(concrete_class(cls))

    @classmethod
    def for_lightning(cls, package: str) -> type:
        """This class for ``package`` (``"lightning"`` or ``"pytorch_lightning"``), e.g. to ``load_from_checkpoint``."""
        return concrete_class(cls, package)

    def __reduce_ex__(self, protocol: Any) -> Any:
        key = _dynamic.get(type(self))
        if key is None:  # a class reachable by name pickles as usual
            return super().__reduce_ex__(protocol)
        return _rebuild, key, dict(self.__dict__)

    def check_trainer(self, trainer: Any) -> None:
        """Raise a clear error when ``trainer`` is of the other Lightning package than this object."""
        mine, theirs = package_of(self), package_of(trainer)
        if trainer is None or theirs is None or mine == theirs:
            return
        name = type(self).__name__
        raise TypeError(
            f"{name} is the {mine} class but the Trainer is {theirs}'s: create it while only {theirs} is "
            f"imported, inside composites.training.using_lightning('{theirs}'), or import it from "
            f"composites.training.{theirs}"
        )
