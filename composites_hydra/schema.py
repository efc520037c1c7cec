"""Structured-config schema of configs/train.yaml: typos and wrong types in framework keys fail at compose time.

Hydra merges every YAML file of the run into these dataclasses, so ``seedd=1``,
``guard=rase``, ``seed=abc`` or ``trainer.max_epoch=3`` stop with an error naming the key
before anything is built. The user's own objects (model, data, module, optimizer, ...)
stay free-form ``_target_`` nodes. The library (``composites/``) never sees this module:
Hydra lives at the edge.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from composites.training import GuardMode  # the one list of guard modes (composites.training.GUARD_MODES)

MonitorMode = Enum("MonitorMode", [(m, m) for m in ("min", "max")], type=str)

# Trainer arguments that arrive as objects from other groups, not as YAML values.
_FROM_OTHER_GROUPS = {"self", "logger", "callbacks", "plugins"}
_SIMPLE = {int, float, bool, str} | {Optional[t] for t in (int, float, bool, str)}  # noqa: UP045 (OmegaConf reads typing.Optional)


def _trainer_schema() -> type:
    """One field per ``pytorch_lightning.Trainer`` argument, with Lightning's own default.

    Read from the installed Lightning (its source, so that building the schema imports no
    Lightning), so the schema never drifts from it: an unknown key is
    an error and simple-typed keys (``max_epochs: Optional[int]``, ...) are type-checked;
    union-typed ones (``devices``, ``precision``, ...) accept any value and Lightning checks them.
    """
    arguments = _trainer_arguments_from_source()
    if arguments is None:  # no source to read (a zipped or compiled install): ask Lightning itself
        arguments = _trainer_arguments_from_lightning()
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default="pytorch_lightning.Trainer"))]
    for name, kind, default in arguments:
        if name in _FROM_OTHER_GROUPS or not isinstance(default, (type(None), bool, int, float, str)):
            continue
        fields.append((name, kind if kind in _SIMPLE else Any, field(default=default)))
    return dataclasses.make_dataclass("TrainerConfig", fields)


def _trainer_arguments_from_lightning() -> list[tuple[str, Any, Any]]:
    """``(name, type hint, default)`` of each argument of ``Trainer.__init__``, from the imported class."""
    from pytorch_lightning import Trainer

    try:
        hints = typing.get_type_hints(Trainer.__init__)
    except Exception:  # an annotation this Python cannot resolve: fall back to Any everywhere
        hints = {}
    parameters = inspect.signature(Trainer.__init__).parameters.items()
    return [(name, hints.get(name, Any), p.default) for name, p in parameters if name != "self"]


def _trainer_arguments_from_source() -> list[tuple[str, Any, Any]] | None:
    """As :func:`_trainer_arguments_from_lightning`, parsed from Lightning's source without importing it.

    Importing ``pytorch_lightning`` takes seconds (torchmetrics, Dynamo, ...), and the schema is
    registered before Hydra composes: a mistake Hydra reports (``+composite=bogus``,
    ``guard=rase``, ``trainer.max_epoch=3``) would wait for it. A default that is not a literal
    reads as not YAML-able (left out, as an object default is); an annotation naming more than
    ``Optional``/``Union`` of ``int``/``float``/``bool``/``str`` reads as ``Any`` (as a union does).
    ``None`` when the source is not there to read.
    """
    spec = importlib.util.find_spec("pytorch_lightning")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations)), "trainer", "trainer.py")
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    init = next(
        (
            node
            for cls in tree.body
            if isinstance(cls, ast.ClassDef) and cls.name == "Trainer"
            for node in cls.body
            if isinstance(node, ast.FunctionDef) and node.name == "__init__"
        ),
        None,
    )
    if init is None:
        return None
    args = init.args
    positional = args.posonlyargs + args.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = [*zip(positional, defaults), *zip(args.kwonlyargs, args.kw_defaults)]
    return [(arg.arg, _simple_hint(arg.annotation), _literal(default)) for arg, default in pairs if arg.arg != "self"]


_HINT_NAMES = {"int": int, "float": float, "bool": bool, "str": str}
_NOT_LITERAL = object()  # a default written as an expression (``timedelta(...)``): not a YAML value


def _simple_hint(node: ast.expr | None) -> Any:
    """The annotation as a type when it is built of ``Optional``/``Union``/``|``/``None`` and :data:`_HINT_NAMES`, else ``Any``.

    ``Any`` also for a union holding a name of Lightning's own (``Optional[_PRECISION_INPUT]``):
    such a key is not type-checked either way.
    """
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    if isinstance(node, ast.Name) and node.id in _HINT_NAMES:
        return _HINT_NAMES[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        parts = [_simple_hint(node.left), _simple_hint(node.right)]
        return Any if Any in parts else Union[tuple(parts)]  # noqa: UP007 (built from parts, as typing reads it)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in ("Optional", "Union"):
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        parts = [_simple_hint(item) for item in items]
        if Any in parts:
            return Any
        return Optional[parts[0]] if node.value.id == "Optional" else Union[tuple(parts)]  # noqa: UP007, UP045
    return Any


def _literal(default: ast.expr | None) -> Any:
    if default is None:
        return inspect.Parameter.empty
    try:
        return ast.literal_eval(default)
    except (ValueError, TypeError, SyntaxError):
        return _NOT_LITERAL


TrainerConfig = _trainer_schema()


@dataclass
class PathsConfig:
    output_dir: str = MISSING  # the run directory (checkpoints, logs); Hydra's output dir by default


@dataclass
class TrainConfig:
    """Top-level keys of a training run (see configs/train.yaml for what each does)."""

    seed: int = 0
    guard: GuardMode = GuardMode["raise"]
    monitor: str = "val/acc"
    monitor_mode: MonitorMode | None = None  # None: min for a loss, max otherwise
    ckpt_path: str | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # type: ignore[valid-type]
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: Any = MISSING
    data: Any = MISSING
    module: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    callbacks: Any = field(default_factory=dict)
    logger: Any = None
    compile: Any = False  # false | true | a mapping of torch.compile arguments, e.g. {backend: eager}


def register_configs() -> None:
    """Register the schema as ``train_schema`` (train.yaml lists it first in its defaults).

    >>> register_configs()
    >>> "train_schema.yaml" in ConfigStore.instance().list("")
    True
    """
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
