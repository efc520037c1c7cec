"""Sequential composite: stage i's output is stage i+1's input."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from .children import StageError, describe, named_modules_from, refuse_class, register_children, run_child
from .parallel import Parallel

Pick = Union[str, int, Callable[[Any], Any]]  # noqa: UP007 (a runtime alias: Python 3.10 has no `str | Callable[...]` here)


def as_call(value: Any) -> tuple[tuple, dict]:
    """How one stage's output feeds the next: a tuple positionally, a mapping by keyword."""
    if isinstance(value, tuple):
        return value, {}
    if isinstance(value, Mapping):
        return (), dict(value)
    return (value,), {}


def fields_of(value: Any) -> list[str]:
    """The field names a stage's output offers: a mapping's keys (a Hugging Face ``ModelOutput``
    holds only the fields that are not ``None``), a dataclass's fields, a named tuple's fields.

    >>> fields_of({"last_hidden_state": 1, "pooler_output": 2})
    ['last_hidden_state', 'pooler_output']
    """
    if isinstance(value, Mapping):
        return [str(k) for k in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [f.name for f in dataclasses.fields(value)]
    return list(getattr(value, "_fields", ()))


def pick_output(stage: str, value: Any, pick: Pick) -> Any:
    """What of stage ``stage``'s output ``value`` goes on: a field/key by name, an item by index, or ``pick(value)``.

    Raises:
        ValueError: the field or index does not exist; the message names the stage and lists what does.

    >>> pick_output("encoder", {"last_hidden_state": 1, "pooler_output": 2}, "pooler_output")
    2
    >>> pick_output("rnn", ("out", "state"), 0)
    'out'
    """
    if isinstance(pick, str):
        if isinstance(value, Mapping):
            if pick in value:
                return value[pick]
        elif pick in fields_of(value):  # a dataclass, a named tuple
            return getattr(value, pick)
        offered = fields_of(value)
        raise ValueError(
            f"Sequential outputs['{stage}']='{pick}': stage '{stage}' returned {describe_output(value)}"
            + (f" with fields {', '.join(offered)}; pick one of them" if offered else ", which has no named fields")
            + " (a Hugging Face ModelOutput holds only the fields that are not None: ask the model for the one you need)"
        )
    if isinstance(pick, int) and not isinstance(pick, bool):
        if isinstance(value, (tuple, list)) and -len(value) <= pick < len(value):
            return value[pick]
        raise ValueError(
            f"Sequential outputs['{stage}']={pick}: stage '{stage}' returned {describe_output(value)}; "
            "an index picks an item of a tuple or list within its length (use a field name for a mapping)"
        )
    return pick(value)


def _keyword_hint(error: StageError, stage: str, previous: str) -> StageError:
    """A stage that choked on the keyword arguments made from the previous stage's mapping: say how to pick one."""
    if error.stage != stage or not isinstance(error.cause, TypeError):
        return error
    cause = TypeError(
        f"{error.cause} (stage '{previous}' returned a mapping, passed on as keyword arguments; to pass one field, "
        f"use Sequential(..., outputs={{'{previous}': '<field name>'}}))"
    )
    hinted = StageError(error.stage, error.module, error.received, cause, error.role)
    hinted.failing = error.failing
    return hinted


def _combine_blame(error: StageError, producer: str, parallel: nn.Module, stage: nn.Module, args: tuple) -> StageError:
    """A stage that failed on exactly what a user's combine returned: name the combine, and what the stage takes."""
    if len(args) != 1 or error.received != describe(args[0]):
        return error  # it failed on something else, made inside the stage
    return error.blaming(producer, parallel, expected_input(stage))


def expected_input(module: nn.Module) -> str:
    """What a module's first layer takes, when it says (``in_features``, ``in_channels``); else ``""``.

    >>> expected_input(nn.Sequential(nn.Linear(16, 3), nn.ReLU())), expected_input(nn.Conv2d(3, 8, 1)), expected_input(nn.ReLU())
    ('16 features on the last dimension (Linear)', '3 channels on dimension 1 (Conv2d)', '')
    """
    for layer in module.modules():
        features, channels = getattr(layer, "in_features", None), getattr(layer, "in_channels", None)
        if isinstance(features, int):
            return f"{features} features on the last dimension ({type(layer).__name__})"
        if isinstance(channels, int):
            return f"{channels} channels on dimension 1 ({type(layer).__name__})"
    return ""


def describe_output(value: Any) -> str:
    kind = type(value).__name__
    shapes = describe(value)
    return kind if shapes == kind else f"{kind} {shapes}"


class Sequential(nn.Module):
    """Chain sub-models: the output of stage i is the input of stage i+1.

    Stages are registered under the user's names, so parameters are ``encoder.weight``,
    ``head.bias``, ... By default a stage that returns a tuple feeds the next one positionally,
    a mapping (a Hugging Face ``ModelOutput`` is one) feeds it by keyword, anything else (a
    tensor, a dataclass) is passed as the one argument. ``outputs`` chooses instead, per stage,
    what goes on: a field name (a mapping key, a ``ModelOutput`` or dataclass field), an index
    into a tuple, or a function of the output; the chosen value is passed as the one argument
    (and is the composite's output when the stage is the last one). When a stage raises (a
    shape mismatch, say), a :class:`StageError` (a ``RuntimeError``) names the stage and the
    shapes it received.

    Args:
        stages: mapping name -> ``nn.Module``, or a sequence (named ``"0"``, ``"1"``, ...).
        outputs: mapping stage name -> what of its output goes on: a field/key name (``str``),
            an index (``int``), or a callable taking the output (e.g. a pooling function; a
            module with parameters belongs in a stage of its own). Stages not named pass their
            output on as above.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = Sequential({"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 2)})
        >>> model(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
        >>> [name for name, _ in model.named_parameters()]
        ['encoder.weight', 'encoder.bias', 'head.weight', 'head.bias']
        >>> class Encoder(nn.Module):  # returns several things, like a Hugging Face model
        ...     def forward(self, x):
        ...         return {"last_hidden_state": x.unsqueeze(1).repeat(1, 5, 1), "pooler_output": x}
        >>> picked = Sequential({"encoder": Encoder(), "head": nn.Linear(4, 2)}, outputs={"encoder": "pooler_output"})
        >>> picked(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
        >>> pooled = Sequential({"encoder": Encoder(), "head": nn.Linear(4, 2)},
        ...                     outputs={"encoder": lambda out: out["last_hidden_state"].mean(dim=1)})
        >>> pooled(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        stages: Mapping[str, nn.Module] | Sequence[nn.Module],
        outputs: Mapping[str, Pick] | None = None,
    ):
        super().__init__()
        self.stage_names = register_children(
            self, named_modules_from(stages, "stage"), "stage", reserved=("stage_names", "stage_outputs")
        )
        picks = {str(k): v for k, v in (outputs or {}).items()}
        unknown = [name for name in picks if name not in self.stage_names]
        if unknown:
            raise ValueError(
                f"outputs names stage(s) {', '.join(map(repr, unknown))} that Sequential does not have; "
                f"its stages are {', '.join(map(repr, self.stage_names))}"
            )
        for name, pick in picks.items():
            refuse_class(pick, f"outputs['{name}']")
            if isinstance(pick, nn.Module) or not (isinstance(pick, (str, int)) or callable(pick)):
                raise TypeError(
                    f"outputs['{name}'] must be a field name (str), an index (int) or a function of the output, "
                    f"got {type(pick).__name__}"
                    + (
                        "; a module with parameters belongs in a stage of its own"
                        if isinstance(pick, nn.Module)
                        else ""
                    )
                )
        self.stage_outputs: dict[str, Pick] = picks

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        value = None
        picks = self.stage_outputs
        previous = None  # the stage whose mapping output is being passed on by keyword
        combined = None  # the stage before, when it is a Parallel whose combine is the user's
        for name in self.stage_names:
            if (previous is None and combined is None) or torch.compiler.is_compiling():
                value = run_child(name, self._modules[name], args, kwargs)
            else:
                try:
                    value = run_child(name, self._modules[name], args, kwargs)
                except StageError as error:
                    if previous is not None:
                        raise _keyword_hint(error, name, previous) from error.cause
                    raise _combine_blame(
                        error, combined, self._modules[combined], self._modules[name], args
                    ) from error.cause
            previous = name if name not in picks and isinstance(value, Mapping) else None
            stage = self._modules[name]
            combined = name if name not in picks and isinstance(stage, Parallel) and stage.custom_combine else None
            if name in picks:
                value = pick_output(name, value, picks[name])
                args, kwargs = (value,), {}
            else:
                args, kwargs = as_call(value)
        return value

    def extra_repr(self) -> str:
        picks = getattr(self, "stage_outputs", {})
        shown = {k: (v if isinstance(v, (str, int)) else getattr(v, "__name__", "callable")) for k, v in picks.items()}
        return f"outputs={shown}" if shown else ""
