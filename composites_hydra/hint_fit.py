"""Whether a config value fits a type hint, judged only where YAML could have given the right type.

``int`` for ``float`` fits; a quoted number for a number does not; a class YAML cannot produce
(``torch.device``, ``Path``) is left to the target, which converts or complains itself.
"""

from __future__ import annotations

import collections.abc as abc
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from .locate import is_target_node, locate

UNJUDGED = object()  # a hint this module does not judge: any value passes
_YAML_SCALARS = (bool, int, float, str, type(None))


class Misfit(NamedTuple):
    """Where inside a value (``""``: the value itself, ``.head``, ``[0]``) it does not fit, what was wanted, what came."""

    path: str
    value: Any
    wanted: Any
    got: str


def fits(value: Any, hint: Any) -> Literal[True] | Misfit | None:
    """``True`` when the value fits, ``None`` when the hint cannot be judged, else where and how it misfits.

    >>> fits(1, float), fits("x", typing.Any), fits(["a"], list[int]).got
    (True, None, "the str 'a'")
    """
    if hint is UNJUDGED or hint is Any or isinstance(hint, (typing.TypeVar, typing.ForwardRef, str)):
        return None
    if is_target_node(value):
        return _built_misfit(value, hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    misfit = Misfit("", value, hint, _got(value))
    if origin in (typing.Union, types.UnionType):
        verdicts = [fits(value, option) for option in args]
        if True in verdicts:
            return True
        if all(v is None for v in verdicts):
            return None
        judged = [option for option, v in zip(args, verdicts) if v is not None]
        if not _producible(judged) and any(v is None for v in verdicts):
            return None  # only a class YAML cannot produce is left: the target converts it
        deeper = [v for v in verdicts if isinstance(v, Misfit) and (v.path or v.got.startswith("._target_="))]
        return deeper[0] if deeper else misfit
    if origin is typing.Literal:
        return True if any(value == a and type(value) is type(a) for a in args) else misfit
    if hint is type(None):
        return True if value is None else misfit
    if hint is bool:
        return True if isinstance(value, bool) else misfit
    if hint is int:
        return True if isinstance(value, int) and not isinstance(value, bool) else misfit
    if hint is float:  # an int is a fine float
        return True if isinstance(value, (int, float)) and not isinstance(value, bool) else misfit
    if hint is str:
        return True if isinstance(value, str) else misfit
    container = origin or hint
    if container in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return None if isinstance(value, Mapping) and container in (abc.Iterable, typing.Iterable) else misfit
        if container in (tuple, typing.Tuple) and args and args[-1] is not Ellipsis:  # noqa: UP006
            if len(args) != len(value):
                return Misfit("", value, hint, f"{len(value)} items, not {len(args)}")
            items = list(zip(value, args))
        else:
            items = [(v, args[0] if args else UNJUDGED) for v in value]
        for i, (item, item_hint) in enumerate(items):
            inner = fits(item, item_hint)
            if isinstance(inner, Misfit):
                return inner._replace(path=f"[{i}]{inner.path}")
        return True
    if container in _MAPPINGS:
        if not isinstance(value, Mapping):
            return misfit
        item_hint = args[1] if len(args) == 2 else UNJUDGED
        for name, item in value.items():
            inner = fits(item, item_hint)
            if isinstance(inner, Misfit):
                return inner._replace(path=f".{name}{inner.path}")
        return True
    if isinstance(hint, type) and issubclass(hint, _YAML_SCALARS + (list, dict)):
        return True if isinstance(value, hint) else misfit
    if isinstance(hint, type) and isinstance(value, Mapping) and not issubclass(hint, Mapping):
        return misfit._replace(
            got="a mapping without _target_ (a node that builds an object names its class with _target_)"
        )
    return None  # a class YAML cannot produce, Callable, a protocol: the target converts or complains


_SEQUENCES = (
    tuple,
    list,
    abc.Sequence,
    abc.MutableSequence,
    abc.Iterable,
    abc.Collection,
    typing.Sequence,
    typing.List,  # noqa: UP006 (what an older library writes)
    typing.Tuple,  # noqa: UP006
    typing.Iterable,
)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping, typing.Mapping, typing.Dict)  # noqa: UP006


def _producible(options: list[Any]) -> bool:
    """Whether some option is a type a YAML value can be (a scalar, a list, a mapping, a Literal)."""
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is typing.Literal or origin in _YAML_SCALARS or origin in (list, tuple, dict):
            return True
        if isinstance(origin, type) and issubclass(origin, (abc.Sequence, abc.Mapping, abc.Iterable)):
            return True
    return False


def _built_misfit(node: Mapping, hint: Any) -> Misfit | None:
    """A misfit when a ``_target_`` node builds an object the hint does not allow, else ``None`` (fits or not judged)."""
    if node.get("_partial_") is True:
        return None
    name = str(node["_target_"])
    target, _ = locate(name)
    if isinstance(target, type):
        if any("__new__" in vars(k) for k in target.__mro__[:-1]):
            return None  # its __new__ may return another type: not judged
        built = target
    elif inspect.isroutine(target):
        built = _return_class(target)
        if built is None:
            return None  # a factory function without a return hint: not judged
    else:
        return None
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    classes = []
    for option in options:
        origin = typing.get_origin(option) or option
        if not isinstance(origin, type) or origin in (abc.Callable,) or getattr(origin, "_is_protocol", False):
            return None  # Callable, Any, a TypeVar, a protocol: not judged
        classes.append(origin)
    if any(issubclass(built, c) or _same_lightning_class(built, c) for c in classes):
        return None
    wanted = " | ".join(c.__name__ for c in classes)
    if isinstance(target, type):
        return Misfit(
            "", node, hint, f"._target_={name} builds an object of class {built.__name__}; a {wanted} is wanted here"
        )
    fix = " (torch.nn.ReLU for torch.nn.functional.relu)" if built is _torch_tensor() else ""
    return Misfit(
        "",
        node,
        hint,
        f"._target_={name} is a function, not a class: it returns a {built.__name__} where a {wanted} is "
        f"wanted. Use a class{fix} or wrap the function in one",
    )


_LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}


def _same_lightning_class(built: type, wanted: type) -> bool:
    """A Lightning class of the other package counts: build() swaps in the Trainer's package's classes."""
    if wanted.__module__.split(".")[0] not in _LIGHTNING:
        return False
    return any(
        k.__qualname__ == wanted.__qualname__ and k.__module__.split(".")[0] in _LIGHTNING for k in built.__mro__
    )


def _return_class(function: Any) -> type | None:
    try:
        returned = typing.get_type_hints(function).get("return")
    except Exception:
        return None
    return returned if isinstance(returned, type) else None


def _torch_tensor() -> type | None:
    """``torch.Tensor`` when torch is imported (it always is here), for the hint on tensor functions."""
    import sys

    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else None


def _got(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return f"the str {value!r}"
        return f"the str {value!r} (write a number without quotes)"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"the {type(value).__name__} {shown(value)}"


def shown(value: Any) -> str:
    """A config value as the command line writes it, cut at 60 characters.

    >>> shown("0.001"), shown(None), shown([1, 2])
    ("'0.001'", 'null', '[1, 2]')
    """
    text = repr(value) if isinstance(value, str) else "null" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def hint_name(hint: Any) -> str:
    """A type hint as a user reads it: ``int``, ``list[int]``, ``float | None``, ``one of 'a', 'b'``.

    >>> hint_name(typing.Optional[typing.Sequence[int]]), hint_name(typing.Literal["a", "b"])
    ('Sequence[int] | None', "one of 'a', 'b'")
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        literals = [v for a in options if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
        others = [hint_name(a) for a in options if typing.get_origin(a) is not typing.Literal]
        return " | ".join(others + (["one of " + ", ".join(map(repr, literals))] if literals else []))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if hint is type(None):
        return "None"
    if origin is not None:
        args = typing.get_args(hint)
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{', '.join('...' if a is Ellipsis else hint_name(a) for a in args)}]" if args else base
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))
