"""The Lightning package of a run, the one its Trainer comes from, for every class the configs name.

``lightning`` and ``pytorch_lightning`` ship their classes twice, and a Trainer takes only its own
package's. The configs name each class once, and the run's ``trainer._target_`` picks the package:

- composites' own classes are spelled ``composites.training.<Name>`` (``composites.CompositeModule``,
  ``composites.presets.DigitsDataModule``), the ``pytorch_lightning`` classes; with a ``lightning``
  Trainer, :func:`for_package` swaps in ``composites.training.lightning.<Name>`` before anything is built;
- Lightning's own classes are spelled through the ``lightning`` resolver::

    _target_: ${lightning:callbacks.ModelCheckpoint}
    # pytorch_lightning.callbacks.ModelCheckpoint, or with trainer._target_=lightning.Trainer:
    # lightning.pytorch.callbacks.ModelCheckpoint

Importing ``composites_hydra`` registers the resolver. The package map is
:mod:`composites.training.packages`'s.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from composites.training.packages import API, PACKAGES, composites_classes, trainer_package

DEFAULT = PACKAGES[0]  # composites' own dependency: a node resolved without a trainer in its config
# the modules whose names give the pytorch_lightning classes
SPELLINGS = ("composites", "composites.training", "composites.presets")


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


def for_package(node: Any, package: str) -> Any:
    """``node`` (a resolved config: dicts and lists) with composites' classes those of ``package``.

    Every ``_target_`` that spells one of composites' Lightning classes the default way
    (``composites.training.<Name>``, ``composites.<Name>``, ``composites.presets.<Name>``) names
    ``package``'s class instead.
    Explicit spellings (``composites.training.pytorch_lightning.<Name>``) and other targets stay.

    >>> for_package({"module": {"_target_": "composites.CompositeModule"},
    ...              "callbacks": [{"_target_": "composites.training.ResumeState"}, {"_target_": "torch.nn.Linear"}]},
    ...             "lightning")  # doctest: +NORMALIZE_WHITESPACE
    {'module': {'_target_': 'composites.training.lightning.CompositeModule'},
     'callbacks': [{'_target_': 'composites.training.lightning.ResumeState'}, {'_target_': 'torch.nn.Linear'}]}
    """
    if package == DEFAULT:
        return node
    classes = composites_classes(package)
    names = set(classes.__all__)

    def swap(value: Any) -> Any:
        if isinstance(value, list):
            return [swap(v) for v in value]
        if not isinstance(value, dict):
            return value
        swapped = {k: swap(v) for k, v in value.items()}
        module, _, name = str(swapped.get("_target_", "")).rpartition(".")
        if module in SPELLINGS and name in names:
            swapped["_target_"] = f"{classes.__name__}.{name}"
        return swapped

    return swap(node)


register_resolver()
