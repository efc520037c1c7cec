"""Parallel composite: every branch sees the input (or its own entry), outputs are combined."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .children import StageError, describe, named_modules_from, refuse_class, register_children, require_bool, run_child
from .streams import cuda_device_of, run_on_streams

COMBINES = ("concat", "sum", "mean", "stack", "dict")


class Parallel(nn.Module):
    """Run branches side by side on the same input and combine their outputs.

    Every branch gets the same input; when the input is a mapping whose keys include every
    branch name (passed as one argument or as keyword arguments), each branch gets its own
    entry. ``combine`` says how outputs are merged:

    - ``"concat"``: along the last dimension; ``"stack"``: along a new dimension 1;
    - ``"sum"`` / ``"mean"``: elementwise (shapes must match);
    - ``"dict"``: the mapping ``{branch name: output}`` itself;
    - an ``nn.Module`` (registered as ``combiner``, so it trains) or any callable taking that
      mapping.

    Subclasses override :meth:`combine` instead.

    Args:
        branches: mapping name -> ``nn.Module``.
        combine: one of ``"concat"``, ``"sum"``, ``"mean"``, ``"stack"``, ``"dict"``, or a
            module/callable given the mapping of branch outputs.
        streams: on CUDA, run each branch on its own CUDA stream so small branches overlap on
            the GPU (eager mode only; on CPU, and under ``torch.compile``, branches run one
            after the other as usual). Off by default: it pays only when the branches are
            too small to fill the GPU on their own.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = Parallel({"a": nn.Identity(), "b": nn.Identity()}, combine="concat")
        >>> model(torch.ones(2, 3)).shape
        torch.Size([2, 6])
        >>> model({"a": torch.ones(2, 3), "b": torch.zeros(2, 1)}).tolist()
        [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    """

    def __init__(
        self,
        branches: Mapping[str, nn.Module],
        combine: str | nn.Module | Callable[[dict[str, Any]], Any] = "concat",
        streams: bool = False,
    ):
        super().__init__()
        self.branch_names = register_children(
            self,
            named_modules_from(branches, "branch"),
            "branch",
            reserved=("branch_names", "combiner", "mode", "_combine_fn", "streams"),
        )
        refuse_class(combine, "Parallel combine")
        require_bool(streams, "Parallel streams")
        if isinstance(combine, str) and combine not in COMBINES:
            raise ValueError(
                f"unknown combine '{combine}': choose one of {', '.join(COMBINES)}, or pass a module/callable"
            )
        if isinstance(combine, nn.Module):
            self.combiner = combine
            self.mode = "module"
        elif callable(combine):
            self._combine_fn = combine
            self.mode = "callable"
        elif isinstance(combine, str):
            self.mode = combine
        else:
            raise TypeError(f"combine must be a string, an nn.Module or a callable, got {type(combine).__name__}")
        self.streams = streams

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        per_branch = self._per_branch_inputs(args, kwargs)
        calls = {
            name: ((per_branch[name],), {}) if per_branch is not None else (args, kwargs) for name in self.branch_names
        }
        device = cuda_device_of(args, kwargs) if self.streams and not torch.compiler.is_compiling() else None
        if device is not None:
            jobs = {
                name: partial(run_child, name, self._modules[name], *call, role="branch")
                for name, call in calls.items()
            }
            return self._combined(run_on_streams(jobs, (args, kwargs), device))
        if torch.compiler.is_compiling():  # no try/except in traced code
            return self.combine({name: self._modules[name](*call[0], **call[1]) for name, call in calls.items()})
        try:
            outputs = {name: run_child(name, self._modules[name], *call, role="branch") for name, call in calls.items()}
        except StageError as error:
            if per_branch is None and len(args) == 1 and isinstance(args[0], Mapping):
                error.add_note(
                    f"The input is a mapping whose keys ({', '.join(map(str, args[0]))}) are not the branch names "
                    f"({', '.join(self.branch_names)}), so every branch got the whole mapping: name the branches "
                    "after the keys to give each its own entry."
                )
            raise
        return self._combined(outputs)

    def _combined(self, outputs: dict[str, Any]) -> Any:
        """:meth:`combine`; a user's combine that raises is named as the culprit (a StageError of role ``combine``)."""
        if not self.custom_combine:
            return self.combine(outputs)
        try:
            return self.combine(outputs)
        except Exception as error:
            failed = StageError("", f"Parallel, combine={self.combine_name}", describe(outputs), error, role="combine")
            failed.failing = self
            raise failed from error

    @property
    def custom_combine(self) -> bool:
        """Whether the user's code merges the branch outputs: a module, a callable, or an overridden :meth:`combine`.

        >>> Parallel({"a": nn.Identity()}).custom_combine, Parallel({"a": nn.Identity()}, combine=sum).custom_combine
        (False, True)
        """
        return self.mode in ("module", "callable") or type(self).combine is not Parallel.combine

    def _per_branch_inputs(self, args: tuple, kwargs: dict) -> Mapping[str, Any] | None:
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            candidate = args[0]
        elif not args and kwargs:
            candidate = kwargs
        else:
            return None
        present = [name for name in self.branch_names if name in candidate]
        if len(present) < len(self.branch_names):
            return None  # not every branch named: every branch gets the whole mapping
        extra = [str(k) for k in candidate if k not in self.branch_names]
        if extra and not torch.compiler.is_compiling() and not getattr(self, "_warned_extra", False):
            self._warned_extra = True
            warnings.warn(
                f"Parallel ignores input entries {', '.join(extra)}: no branch has that name "
                f"(branches: {', '.join(self.branch_names)})",
                stacklevel=3,
            )
        return candidate

    def combine(self, outputs: dict[str, Any]) -> Any:
        """Merge the mapping of branch outputs into the composite's output (override point)."""
        mode = self.mode
        if mode == "dict":
            return outputs
        if mode == "module":
            return self.combiner(outputs)
        if mode == "callable":
            return self._combine_fn(outputs)
        values = list(outputs.values())
        self._check_shapes(outputs, values)
        if mode == "concat":
            return torch.cat(values, dim=-1)  # (..., sum of branch widths)
        if mode == "stack":
            return torch.stack(values, dim=1)  # (batch, branches, ...)
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total if mode == "sum" else total / len(values)

    def _check_shapes(self, outputs: dict[str, Any], values: list[Any]) -> None:
        if not all(isinstance(v, Tensor) for v in values):
            kinds = ", ".join(f"'{n}': {describe(v)}" for n, v in outputs.items())
            raise TypeError(
                f"Parallel combine='{self.mode}' needs a tensor from every branch, got {kinds}; use combine='dict' or a callable"
            )
        shapes = [v.shape[:-1] if self.mode == "concat" else v.shape for v in values]
        if any(s != shapes[0] for s in shapes[1:]):
            part = "all but the last dimension" if self.mode == "concat" else "the same shape"
            found = ", ".join(f"'{n}': {tuple(v.shape)}" for n, v in outputs.items())
            raise ValueError(f"Parallel combine='{self.mode}' needs {part} from every branch; got {found}")

    @property
    def combine_name(self) -> str:
        """How the branch outputs are merged, in words: a mode (``'concat'``), a function's name, or ``module``."""
        if self.mode == "callable":
            return getattr(self._combine_fn, "__name__", "callable")
        return self.mode if self.mode == "module" else repr(self.mode)

    def extra_repr(self) -> str:
        parts = [] if self.mode == "module" else [f"combine={self.combine_name}"]
        if getattr(self, "streams", False):
            parts.append("streams=True")
        return ", ".join(parts)
