"""Every ``_target_`` node checked against its target's signature before anything is built.

A config value of the wrong type (a list key given a number, a number given as a quoted string)
otherwise fails deep inside torch or Lightning, or not at all until a step runs. Here each node
is read as the call Hydra will make: its ``_target_`` must import, each key must be an argument
of the target, required arguments must be there (unless ``_partial_: true``), and each value
must fit the argument's type hint. Hints this cannot judge (a class YAML cannot produce, a
forward reference that does not resolve, no hint at all) are left to the target: no false alarm.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .hint_fit import UNJUDGED, fits, hint_name, shown
from .locate import is_target_node, locate, near_names

# Keys Hydra reads itself; never arguments of the target.
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


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
                near = near_names(str(name), named)[:1]
                problems.append(
                    f"{where}: not an argument of {target_name}"
                    + (f"; did you mean {near[0]}?" if near else "")
                    + f" (its arguments: {', '.join(named)})"
                )
            _walk(value, where, problems)
            continue
        if recursive:
            _check_value(value, hints.get(name, UNJUDGED), where, f"{target_name}'s {name}", parameters[name], problems)
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


def _check_value(
    value: Any, hint: Any, key: str, argument: str, parameter: inspect.Parameter, problems: list[str]
) -> None:
    if value is None and parameter.default is None:
        return  # `x: int = None` is common: the default itself is always fine
    misfit = fits(value, hint)
    if misfit is True or misfit is None:
        _walk(value, key, problems)
    elif misfit.got.startswith("._target_="):  # a node that builds the wrong kind of object: the sentence is whole
        problems.append(f"{key}{misfit.path}{misfit.got}")
    else:
        wanted = (
            f"{argument} wants {hint_name(misfit.wanted)}" if not misfit.path else f"{argument} wants {hint_name(hint)}"
        )
        if misfit.path:
            wanted += f", so {key}{misfit.path} must be {hint_name(misfit.wanted)}"
        problems.append(f"{key}{misfit.path}={shown(misfit.value)}: {wanted}, got {misfit.got}")


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
