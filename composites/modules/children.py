"""A composite's children: registered under the user's names, called so that a failure names them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def named_modules_from(
    modules: Mapping[str, nn.Module] | Sequence[nn.Module], what: str
) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` pairs from a mapping, or a sequence named "0", "1", ...

    Raises a ``TypeError`` naming the entry when something is not an ``nn.Module``.
    """
    if isinstance(modules, (Mapping, nn.ModuleDict)):
        items = [(str(k), v) for k, v in modules.items()]
    elif isinstance(modules, (nn.ModuleList, nn.Sequential)):
        items = list(modules.named_children())
    elif isinstance(modules, Sequence) and not isinstance(modules, str):
        items = [(str(i), v) for i, v in enumerate(modules)]
    else:
        raise TypeError(
            f"{what} must be a mapping name -> nn.Module or a sequence of nn.Module, got {type(modules).__name__}"
        )
    if not items:
        raise ValueError(f"{what} is empty: give at least one sub-model")
    for name, module in items:
        refuse_class(module, f"{what} entry '{name}'")
        if not isinstance(module, nn.Module):
            hint = (
                ": a function is not a sub-model; use a module class (torch.nn.ReLU, not torch.nn.functional.relu) "
                "or wrap the function in an nn.Module"
                if callable(module) and not isinstance(module, type)
                else ""
            )
            raise TypeError(f"{what} entry '{name}' is a {type(module).__name__}, not an nn.Module{hint}")
    return items


def refuse_class(value: Any, what: str) -> None:
    """Refuse a class where an object is wanted (``nn.Linear`` for ``nn.Linear(4, 2)``): called, it would build one.

    >>> refuse_class(nn.Identity, "combine")
    Traceback (most recent call last):
    ...
    TypeError: combine is the class Identity, not an object of it: pass Identity(...), an instance
    """
    if isinstance(value, type):
        raise TypeError(
            f"{what} is the class {value.__name__}, not an object of it: pass {value.__name__}(...), an instance"
        )


def require_bool(value: Any, what: str) -> None:
    """Refuse anything but ``True``/``False`` for a switch (``"yes"`` or ``"false"`` would count as on).

    >>> require_bool("false", "streams")
    Traceback (most recent call last):
    ...
    TypeError: streams='false' must be True or False, got a str
    """
    if not isinstance(value, bool):
        raise TypeError(f"{what}={value!r} must be True or False, got a {type(value).__name__}")


def register_children(
    owner: nn.Module, items: list[tuple[str, nn.Module]], what: str, reserved: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """Register each module as a direct child under the user's own name.

    Direct children keep parameter names short and the user's own (``encoder.weight``), as in
    ``nn.Sequential``. A name that clashes with an attribute of the composite is refused here,
    with the fix, rather than shadowing a method. ``reserved`` names the attributes the
    composite sets only after registering its children (``mode``, ``router``, ...): a child
    under such a name would be overwritten, or would break ``__init__``, so it is refused too.
    """
    for name, module in items:
        clashes = name in reserved or (hasattr(owner, name) and name not in owner._modules)
        if "." in name or name == "" or clashes:
            raise ValueError(
                f"{what} name '{name}' cannot be used: it is empty, has a '.', or clashes with "
                f"an attribute of {type(owner).__name__}; rename it (e.g. '{name.replace('.', '_')}_')"
            )
        if name in owner._modules:
            raise ValueError(f"{what} name '{name}' is given twice")
        owner.add_module(name, module)
    return tuple(name for name, _ in items)


def join_name(prefix: str, name: str) -> str:
    """The qualified name of ``name`` inside the module at ``prefix`` (``""`` is the model itself).

    >>> join_name("encoder", "weight"), join_name("", "head")
    ('encoder.weight', 'head')
    """
    return f"{prefix}.{name}" if prefix else name


def is_under(name: str, prefix: str) -> bool:
    """Whether a qualified name is ``prefix`` itself or lies inside it (``""`` holds every name).

    The one test for "this parameter or module belongs to that sub-model": a plain
    ``startswith(prefix)`` would put ``encoder2.weight`` inside ``encoder``.

    >>> is_under("encoder.0.weight", "encoder"), is_under("encoder", "encoder"), is_under("encoder2.w", "encoder")
    (True, True, False)
    >>> is_under("head.bias", "")
    True
    """
    return not prefix or name == prefix or name.startswith(prefix + ".")


def enclosing(name: str) -> list[str]:
    """The module paths that hold a parameter (or attribute) name, innermost first; ``""`` is left out.

    >>> enclosing("encoder.layers.0.weight")
    ['encoder.layers.0', 'encoder.layers', 'encoder']
    """
    parts = name.split(".")[:-1]
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)]


def describe(value: Any) -> str:
    """A short description of what flows between sub-models: shapes, not values.

    >>> import torch
    >>> describe((torch.zeros(2, 3), {"a": torch.zeros(4)}))
    '(Tensor[2, 3], {a: Tensor[4]})'
    """
    if isinstance(value, Tensor):
        return f"Tensor[{', '.join(str(s) for s in value.shape)}]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in value) + ")"
    return type(value).__name__


class StageError(RuntimeError):
    """A stage of a :class:`Sequential`, a branch, or a :class:`Parallel`'s own combine raised.

    The message names it and what it received. ``stage`` is the dotted path of the failing
    sub-model (each enclosing composite extends it), ``role`` says ``"stage"``, ``"branch"`` or
    ``"combine"`` (then ``stage`` is the path of the Parallel whose combine raised), ``received``
    the shapes it was given, ``cause`` the original exception. ``producer`` is set when the input
    came from a user's combine of the Parallel at that path, the likelier culprit: the message
    names it, and ``expects`` says what the failing stage takes (``"16 features on the last
    dimension"``) when that can be read from its first layer.

    Example:
        >>> from composites import Sequential
        >>> model = Sequential({"encoder": nn.Linear(4, 8), "head": nn.Linear(3, 2)})
        >>> try:
        ...     model(torch.zeros(2, 4))
        ... except StageError as error:
        ...     print(error.stage, error.role, error.received)
        head stage Tensor[2, 8]
    """

    def __init__(
        self,
        stage: str,
        module: str,
        received: str,
        cause: BaseException,
        role: str = "stage",
        producer: str | None = None,
        expects: str = "",
    ):
        self.stage = stage
        self.module = module
        self.received = received
        self.cause = cause
        self.role = role
        self.producer = producer
        self.expects = expects
        self.failing: nn.Module | None = None  # the sub-model that raised (not pickled)
        self.producing: nn.Module | None = None  # the Parallel whose combine made the input (not pickled)
        if role == "combine":
            where = f"combine of '{stage}'" if stage else "combine of the Parallel"
            text = f"{where} ({module}) failed on the branch outputs {received}"
        elif producer is not None:
            takes = f", but '{stage}' takes {expects}" if expects else ""
            text = (
                f"combine of '{producer}' returned {received}{takes}: check that combine. "
                f"{role} '{stage}' ({module}) failed on it"
            )
        else:
            text = f"{role} '{stage}' ({module}) failed on input {received}"
        super().__init__(f"{text}: {type(cause).__name__}: {cause}")

    def __reduce__(self):  # pickle (multiprocessing, DDP spawn) rebuilds it from all its fields
        fields = (self.stage, self.module, self.received, self.cause, self.role, self.producer, self.expects)
        return type(self), fields

    @classmethod
    def wrap(cls, name: str, child: nn.Module, received: str, error: Exception, role: str = "stage") -> StageError:
        if isinstance(error, StageError):  # nested: keep the innermost failure, under its full path
            # found by identity, so plain modules in between (a user's block holding a
            # composite) and branches picked by a router appear in the path as well
            inner = _path_in(child, error.failing, error.stage)
            producer = (
                None if error.producer is None else _joined(name, _path_in(child, error.producing, error.producer))
            )
            wrapped = cls(
                _joined(name, inner), error.module, error.received, error.cause, error.role, producer, error.expects
            )
            wrapped.failing, wrapped.producing = error.failing, error.producing
            return wrapped
        wrapped = cls(name, type(child).__name__, received, error, role)
        wrapped.failing = child
        return wrapped

    def blaming(self, producer: str, producing: nn.Module, expects: str) -> StageError:
        """The same failure, with its input blamed on the combine of the Parallel at ``producer``."""
        blamed = type(self)(self.stage, self.module, self.received, self.cause, self.role, producer, expects)
        blamed.failing, blamed.producing = self.failing, producing
        return blamed


def _joined(name: str, inner: str) -> str:
    return f"{name}.{inner}" if inner else name


def _path_in(owner: nn.Module, module: nn.Module | None, fallback: str) -> str:
    """The path of ``module`` inside ``owner`` (``""``: ``owner`` itself), else ``fallback``."""
    if module is owner:
        return ""
    return next((path for path, m in owner.named_modules() if m is module and path), fallback)


def run_child(name: str, child: nn.Module, args: tuple, kwargs: dict, role: str = "stage") -> Any:
    """Call a composite's sub-model; when it raises, re-raise naming it and what it received."""
    if torch.compiler.is_compiling():  # no try/except in traced code: one graph, no breaks
        return child(*args, **kwargs)
    try:
        return child(*args, **kwargs)
    except Exception as error:
        received = describe(args[0]) if len(args) == 1 and not kwargs else describe(args + tuple(kwargs.values()))
        raise StageError.wrap(name, child, received, error, role) from error
