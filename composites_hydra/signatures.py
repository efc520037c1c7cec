"""Every ``_target_`` node checked against its target's signature before anything is built.

A config value of the wrong type (a list key given a number, a number given as a quoted string)
otherwise fails deep inside torch or Lightning, or not at all until a step runs. Here each node
is read as the call Hydra will make: its ``_target_`` must import, each key must be an argument
of the target, required arguments must be there (unless ``_partial_: true``), and each value
must fit the argument's type hint. Hints this cannot judge (a class YAML cannot produce, a
forward reference that does not resolve, no hint at all) are left to the target: no false alarm.
"""

from __future__ import annotations

import collections.abc as abc
import difflib
import importlib
import inspect
import pkgutil
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal, NamedTuple

# Keys Hydra reads itself; never arguments of the target.
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
_UNJUDGED = object()  # a hint this module does not judge: any value passes
_YAML_SCALARS = (bool, int, float, str, type(None))


def target_problems(node: Any, key: str, passed: Iterable[str] = ()) -> list[str]:
    """Every mistake in the ``_target_`` node at ``key`` and the nodes inside it, one sentence each.

    ``passed`` names the arguments the caller adds when it instantiates the node (they need no key).

    >>> for problem in target_problems({"_target_": "torch.nn.Linear", "in_features": "4", "out_feature": 2}, "head"):
    ...     print(problem)
    head.in_features='4': torch.nn.Linear's in_features wants int, got the str '4' (write a number without quotes)
    head.out_feature: not an argument of torch.nn.Linear; did you mean out_features? (its arguments: in_features, out_features, bias, device, dtype)
    head: torch.nn.Linear needs out_features (missing)
    """
    problems: list[str] = []
    _check_node(node, key, set(passed), problems)
    return problems


def locate(target: str) -> tuple[Any, str | None]:
    """``(object, None)`` for an importable dotted name, else ``(None, why, with near names)``.

    >>> locate("torch.nn.Linaer")[1]
    "torch.nn has no 'Linaer'; did you mean torch.nn.Linear or torch.nn.Bilinear or torch.nn.LazyLinear?"
    >>> locate("composites.preset.models.MLP")[1]
    "composites has no 'preset'; did you mean composites.presets?"
    """
    parts = target.split(".")
    obj, index = None, 0
    for index in range(len(parts), 0, -1):  # the longest importable module prefix
        name = ".".join(parts[:index])
        try:
            obj = importlib.import_module(name)
            break
        except ModuleNotFoundError as error:
            if error.name is not None and not name.startswith(error.name):
                return None, f"importing {name} failed: {error}"  # the module exists; something it imports does not
        except Exception as error:  # the module exists but raised while importing
            return None, f"importing {name} failed: {type(error).__name__}: {error}"
    if obj is None:
        return None, f"no module named {parts[0]}"
    for position in range(index, len(parts)):
        part = parts[position]
        if not hasattr(obj, part):
            where = ".".join(parts[:position])
            last = position == len(parts) - 1  # a target is called: no module there
            names = {
                n for n in dir(obj) if not n.startswith("_") and not (last and inspect.ismodule(getattr(obj, n, None)))
            }
            if hasattr(obj, "__path__") and not last:
                names |= {m.name for m in pkgutil.iter_modules(obj.__path__)}
            near = _near(part, sorted(names))
            return None, f"{where} has no '{part}'" + (
                f"; did you mean {' or '.join(f'{where}.{n}' for n in near)}?" if near else ""
            )
        obj = getattr(obj, part)
    return obj, None


def _near(name: str, names: list[str]) -> list[str]:
    """Up to three of ``names`` close to ``name``: same letters in another case first, then by similarity."""
    lower = {n.lower(): n for n in names}
    same = [n for n in names if n.lower() == name.lower()]
    close = [lower[n] for n in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)]
    return list(dict.fromkeys(same + close))[:3]


def is_target_node(value: Any) -> bool:
    return isinstance(value, Mapping) and "_target_" in value


def _check_node(node: Mapping, key: str, passed: set[str], problems: list[str]) -> None:
    target_name = node["_target_"]
    if not isinstance(target_name, str):
        problems.append(f"{key}._target_={target_name!r}: a _target_ is a dotted import path, e.g. torch.nn.Linear")
        return
    target, why = locate(target_name)
    if why is not None:
        problems.append(f"{key}._target_={target_name} cannot be imported: {why}")
        return
    partial = node.get("_partial_") is True
    recursive = node.get("_recursive_", True) is not False
    arguments = {k: v for k, v in node.items() if k not in HYDRA_KEYS}
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: only look inside the values
        for name, value in arguments.items():
            _walk(value, f"{key}.{name}", problems)
        return
    parameters = signature.parameters
    takes_any_key = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    hints = _hints(target, parameters)
    named = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name, value in arguments.items():
        where = f"{key}.{name}"
        if name not in parameters or parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL,):
            if not takes_any_key:
                near = _near(str(name), named)[:1]
                problems.append(
                    f"{where}: not an argument of {target_name}"
                    + (f"; did you mean {near[0]}?" if near else "")
                    + f" (its arguments: {', '.join(named)})"
                )
            _walk(value, where, problems)
            continue
        if recursive:
            _check_value(
                value, hints.get(name, _UNJUDGED), where, f"{target_name}'s {name}", parameters[name], problems
            )
    if not partial:
        given = set(arguments) | passed
        positional = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        given |= set(positional[: len(node.get("_args_") or ())])
        missing = [
            n
            for n, p in parameters.items()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in given
        ]
        if missing:
            problems.append(f"{key}: {target_name} needs {', '.join(missing)} (missing)")


def _walk(value: Any, key: str, problems: list[str]) -> None:
    """Look for ``_target_`` nodes inside a value no hint speaks for."""
    if is_target_node(value):
        _check_node(value, key, set(), problems)
    elif isinstance(value, Mapping):
        for name, item in value.items():
            _walk(item, f"{key}.{name}", problems)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, f"{key}[{i}]", problems)


def _hints(target: Any, parameters: Mapping[str, inspect.Parameter]) -> dict[str, Any]:
    """The resolved type hint of each parameter; one that does not resolve is left out (not judged)."""
    function = _signature_function(target)
    try:
        return typing.get_type_hints(function)
    except Exception:  # one unresolvable annotation: resolve the others one by one
        pass
    namespace = getattr(inspect.unwrap(function), "__globals__", {})
    hints = {}
    for name, p in parameters.items():
        annotation = p.annotation
        if annotation is p.empty:
            continue
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, dict(namespace))  # noqa: S307 (the target's own annotation)
            except Exception:
                continue
        hints[name] = annotation
    return hints


def _signature_function(target: Any) -> Any:
    """The function whose parameters ``inspect.signature`` reports for ``target`` (a class: its ``__new__`` or ``__init__``)."""
    if not isinstance(target, type):
        return target
    for klass in target.__mro__:
        if klass is object:
            break
        for name in ("__new__", "__init__"):
            if name in vars(klass) and inspect.isfunction(inspect.unwrap(vars(klass)[name])):
                return vars(klass)[name]
    return target.__init__


class Misfit(NamedTuple):
    """Where inside a value (``""``: the value itself, ``.head``, ``[0]``) it does not fit, what was wanted, what came."""

    path: str
    value: Any
    wanted: Any
    got: str


def _check_value(
    value: Any, hint: Any, key: str, argument: str, parameter: inspect.Parameter, problems: list[str]
) -> None:
    if value is None and parameter.default is None:
        return  # `x: int = None` is common: the default itself is always fine
    misfit = _fits(value, hint)
    if misfit is True or misfit is None:
        _walk(value, key, problems)
    elif misfit.got.startswith("._target_="):  # a node that builds the wrong kind of object: the sentence is whole
        problems.append(f"{key}{misfit.path}{misfit.got}")
    else:
        wanted = f"{argument} wants {_name(misfit.wanted)}" if not misfit.path else f"{argument} wants {_name(hint)}"
        if misfit.path:
            wanted += f", so {key}{misfit.path} must be {_name(misfit.wanted)}"
        problems.append(f"{key}{misfit.path}={_show(misfit.value)}: {wanted}, got {misfit.got}")


def _fits(value: Any, hint: Any) -> Literal[True] | Misfit | None:
    """``True`` when the value fits, ``None`` when the hint cannot be judged, else where and how it misfits."""
    if hint is _UNJUDGED or hint is Any or isinstance(hint, (typing.TypeVar, typing.ForwardRef, str)):
        return None
    if is_target_node(value):
        return _built_misfit(value, hint)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    misfit = Misfit("", value, hint, _got(value))
    if origin in (typing.Union, types.UnionType):
        verdicts = [_fits(value, option) for option in args]
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
            items = [(v, args[0] if args else _UNJUDGED) for v in value]
        for i, (item, item_hint) in enumerate(items):
            inner = _fits(item, item_hint)
            if isinstance(inner, Misfit):
                return inner._replace(path=f"[{i}]{inner.path}")
        return True
    if container in _MAPPINGS:
        if not isinstance(value, Mapping):
            return misfit
        item_hint = args[1] if len(args) == 2 else _UNJUDGED
        for name, item in value.items():
            inner = _fits(item, item_hint)
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
    if any(issubclass(built, c) for c in classes):
        return None
    wanted = " | ".join(c.__name__ for c in classes)
    if isinstance(target, type):
        return Misfit(
            "", node, hint, f"._target_={name} builds an object of class {built.__name__}; a {wanted} is wanted here"
        )
    fix = " (torch.nn.ReLU for torch.nn.functional.relu)" if built is torch_tensor() else ""
    return Misfit(
        "",
        node,
        hint,
        f"._target_={name} is a function, not a class: it returns a {built.__name__} where a {wanted} is "
        f"wanted. Use a class{fix} or wrap the function in one",
    )


def _return_class(function: Any) -> type | None:
    try:
        returned = typing.get_type_hints(function).get("return")
    except Exception:
        return None
    return returned if isinstance(returned, type) else None


def torch_tensor() -> type | None:
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
    return f"the {type(value).__name__} {_show(value)}"


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else "null" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _name(hint: Any) -> str:
    """A type hint as a user reads it: ``int``, ``list[int]``, ``float | None``, ``one of 'a', 'b'``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        literals = [v for a in options if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)]
        others = [_name(a) for a in options if typing.get_origin(a) is not typing.Literal]
        return " | ".join(others + (["one of " + ", ".join(map(repr, literals))] if literals else []))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if hint is type(None):
        return "None"
    if origin is not None:
        args = typing.get_args(hint)
        base = getattr(origin, "__name__", str(origin))
        return f"{base}[{', '.join('...' if a is Ellipsis else _name(a) for a in args)}]" if args else base
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def iter_problems(nodes: Mapping[str, tuple[Any, Iterable[str]]]) -> Iterator[str]:
    """The problems of several top-level nodes: ``{key: (node, passed arguments)}``; ``None`` nodes are skipped."""
    for key, (node, passed) in nodes.items():
        if node is None or node is False:
            continue
        if is_target_node(node):
            yield from target_problems(node, key, passed)
        else:
            problems: list[str] = []
            _walk(node, key, problems)
            yield from problems
