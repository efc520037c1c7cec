"""Conditional composite: a router picks which branch runs, for the batch or per sample."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .children import named_modules_from, refuse_class, register_children, run_child
from .routing import Dispatcher, dispatch_top_k, dispatch_with_capacity, load_balancing_loss

Router = Callable[..., "str | Tensor"]


class Conditional(nn.Module):
    """Route the input to one branch for the whole batch, or to the top-k branches per sample.

    The router is asked through :meth:`route` (the subclass override point), which returns
    either a branch name (the whole batch goes there) or per-sample scores of shape
    ``(batch, branches)``. With scores, each sample runs only through its ``top_k`` branches
    (gathered, run once per branch, scattered back) and each output is weighted by its softmax
    gate probability, so the gate learns. ``active_branches`` names the branches that ran in
    the last forward; the gradient guard treats the others as routed out on purpose.

    Args:
        branches: mapping name -> ``nn.Module``; all branches give outputs of one shape.
        router: a callable returning a branch name (a function, or an ``nn.Module`` such as a
            rule with parameters), an ``nn.Module`` returning scores ``(batch, branches)``, or
            ``None`` when the caller names the branch: ``model(x, route="small")``. A module
            router is registered as the child ``router``.
        top_k: branches per sample in score routing.
        capacity_factor: score routing into fixed-size slots of ``ceil(capacity_factor *
            batch * top_k / branches)`` rows per branch, with no host read: for GPUs and
            ``torch.compile(fullgraph=True)``. A sample past its branch's capacity gets nothing
            from it; ``dropped`` holds how many (sample, branch) pairs that was, as a device
            tensor; keep it rare when nothing else carries the sample (no residual path).
            Every branch runs on its slots, so all count as active. ``None`` (default)
            sizes each branch's chunk from the routing itself: one host read, nothing dropped.

    Extra call arguments go to the router (and, in batch routing, to the chosen branch); in
    per-sample routing the branches get only their samples of ``x``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> by_name = Conditional({"small": nn.Identity(), "big": nn.Linear(2, 2)}, router=None)
        >>> by_name(torch.ones(1, 2), route="small").tolist()
        [[1.0, 1.0]]
        >>> gate = nn.Linear(2, 2)
        >>> experts = Conditional({"a": nn.Linear(2, 3), "b": nn.Linear(2, 3)}, router=gate)
        >>> experts(torch.randn(5, 2)).shape
        torch.Size([5, 3])
        >>> sorted(experts.active_branches) == sorted(set(experts.active_branches))
        True
    """

    def __init__(
        self,
        branches: Mapping[str, nn.Module],
        router: Router | nn.Module | None,
        top_k: int = 1,
        capacity_factor: float | None = None,
    ):
        super().__init__()
        self.branch_names = register_children(
            self,
            named_modules_from(branches, "branch"),
            "branch",
            reserved=(
                "branch_names",
                "router",
                "_route_fn",
                "top_k",
                "capacity_factor",
                "dropped",
                "active_branches",
                "_ran_since_check",
                "last_gate",
                "dispatcher",
            ),
        )
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= len(self.branch_names):
            raise ValueError(f"top_k={top_k} must be between 1 and the number of branches ({len(self.branch_names)})")
        refuse_class(router, "Conditional router")
        if router is not None and not callable(router):
            raise TypeError(f"router must be callable (a function or nn.Module) or None, got {type(router).__name__}")
        self._route_fn = None if isinstance(router, nn.Module) else router
        if isinstance(router, nn.Module):
            self.router = router
        if capacity_factor is not None and not (
            isinstance(capacity_factor, (int, float))
            and not isinstance(capacity_factor, bool)
            and 0 < capacity_factor < math.inf
        ):
            raise ValueError(
                f"capacity_factor={capacity_factor} must be a positive finite number ({len(self.branch_names) / top_k:g} never drops), or None"
            )
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.dropped: Tensor | None = None  # (sample, branch) pairs past capacity in the last forward
        self.active_branches: tuple[str, ...] = ()
        self._ran_since_check: set[str] = set()  # drained by GradientGuard: what ran with grad since its last check
        self.last_gate: tuple[Tensor, Tensor] | None = None  # (probs, chosen) of the last score routing
        # expert parallelism (composites.parallelism) sets it: the branches live on several ranks,
        # this rank holds some of them, and the dispatch moves samples to where their branch is
        self.dispatcher: Dispatcher | None = None

    def route(self, x: Any, *args: Any, **kwargs: Any) -> str | Tensor:
        """A branch name for the whole batch, or scores ``(batch, branches)`` (override point)."""
        router = self._modules["router"] if "router" in self._modules else self._route_fn
        if router is None:
            raise ValueError(
                f"Conditional has no router: pass route=<branch> in the call, one of {list(self.branch_names)}"
            )
        return router(x, *args, **kwargs)

    def forward(self, x: Any, *args: Any, route: str | None = None, **kwargs: Any) -> Any:
        decision = route if route is not None else self.route(x, *args, **kwargs)
        if isinstance(decision, str):
            return self._run_branch(decision, x, args, kwargs)
        if isinstance(decision, Tensor) and not (isinstance(x, Tensor) and x.dim() > 0):
            raise TypeError(
                f"per-sample routing needs x to be a batched tensor (batch, ...), got {type(x).__name__}: "
                "route the batch by name instead, or wrap the branches so they take a tensor"
            )
        batch = x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else None
        if (
            not isinstance(decision, Tensor)
            or decision.dim() != 2
            or decision.shape[1] != len(self.branch_names)
            or (batch is not None and decision.shape[0] != batch)
        ):
            got = tuple(decision.shape) if isinstance(decision, Tensor) else type(decision).__name__
            raise ValueError(
                f"route() must return a branch name or scores of shape ({batch or 'batch'}, {len(self.branch_names)}) "
                f"for branches {list(self.branch_names)}; got {got}"
            )
        # eager: each branch behind run_child, so a failure names it; compiled: the modules
        # themselves (run_child adds nothing there, and a wrapper would be traced on its own)
        compiling = torch.compiler.is_compiling()
        branches = {
            name: self._modules[name] if compiling else self._named_branch(name)
            for name in self.branch_names
            if name in self._modules  # under expert parallelism, this rank's branches only
        }
        if self.dispatcher is not None:
            out, probs, chosen, ran_here, self.dropped = self.dispatcher(
                branches, decision, x, self.top_k, self.capacity_factor
            )
            self.active_branches = tuple(ran_here)
            if torch.is_grad_enabled():
                self._ran_since_check.update(self.active_branches)
        elif self.capacity_factor is None:
            out, probs, chosen, ran = dispatch_top_k(list(branches.values()), decision, x, self.top_k)
            self.active_branches = tuple(self.branch_names[i] for i in ran)
            if torch.is_grad_enabled():  # a validation forward in between trains nothing
                self._ran_since_check.update(self.active_branches)
        else:
            out, probs, chosen, self.dropped = dispatch_with_capacity(
                list(branches.values()), decision, x, self.top_k, self.capacity_factor
            )
            self.active_branches = self.branch_names
            if torch.is_grad_enabled():
                # every branch ran: a fresh set, not an update, so torch.compile has no set
                # contents to guard on and keeps one graph whatever the guard drained
                self._ran_since_check = set(self.branch_names)
        self.last_gate = (probs, chosen)
        return out

    def _run_branch(self, name: str, x: Any, args: tuple, kwargs: dict) -> Any:
        if name not in self.branch_names:
            raise KeyError(f"unknown branch '{name}': this Conditional has {list(self.branch_names)}")
        if self.dispatcher is not None:
            raise RuntimeError(
                f"Conditional: the router chose branch '{name}' for the whole batch, but the branches are spread over "
                "ranks (expert parallelism), which needs per-sample scores from a gate module; route by scores, or "
                "train this model with trainer=ddp"
            )
        self.active_branches = (name,)
        if torch.is_grad_enabled():
            self._ran_since_check.add(name)
        self.last_gate = self.dropped = None
        return run_child(name, self._modules[name], (x, *args), kwargs, role="branch")

    def _named_branch(self, name: str) -> Callable[[Tensor], Any]:
        """The branch as the dispatch calls it: a failure names the branch and its rows."""
        module = self._modules[name]
        return lambda rows: run_child(name, module, (rows,), {}, role="branch")

    def __getstate__(self) -> dict:
        # The last gate (probs, chosen) is part of the autograd graph: non-leaf tensors cannot be
        # deep-copied or pickled, so a copy starts without it (like a fresh module).
        state = super().__getstate__()
        state["last_gate"] = None
        state["dropped"] = None
        state["dispatcher"] = None  # holds process groups: a copy is a single-process module
        return state

    def drain_ran(self) -> frozenset[str]:
        """The branches that ran with gradients on since the last call, and forget them.

        A gradient guard calls it once per check: a branch not in it was routed out on purpose
        in every forward since, so its parameters getting no gradient is not a problem.

        >>> c = Conditional({"a": nn.Identity(), "b": nn.Identity()}, router=lambda x: "a")
        >>> _ = c(torch.ones(1)); sorted(c.drain_ran()), sorted(c.drain_ran())
        (['a'], [])
        """
        ran = frozenset(self._ran_since_check)
        self._ran_since_check = set()  # replaced, not cleared: torch.compile guards on no set contents
        return ran

    def routing_state(self) -> tuple[Any, ...]:
        """What a forward records about its routing; :meth:`load_routing_state` puts it back.

        A replay of the last forward (the guard's diagnosis) saves it first and restores it after,
        so re-running the model leaves this step's routing as it was.
        """
        return self.active_branches, self.last_gate, self.dropped, set(self._ran_since_check)

    def load_routing_state(self, state: tuple[Any, ...]) -> None:
        """Restore what :meth:`routing_state` returned."""
        self.active_branches, self.last_gate, self.dropped, ran = state
        self._ran_since_check = set(ran)

    def load_balancing_loss(self) -> Tensor:
        """Switch-Transformer auxiliary loss of the last score-routed forward (1.0 when balanced).

        Add a small multiple of it to the training loss, e.g. ``loss + 0.01 * aux``.
        """
        if self.last_gate is None:
            raise RuntimeError("load_balancing_loss() needs a forward with score routing (a gate module) first")
        probs, chosen = self.last_gate
        if self.dispatcher is not None:  # the fractions routed to each branch count every rank's samples
            return self.dispatcher.load_balancing_loss(probs, chosen)
        return load_balancing_loss(probs, chosen)

    def extra_repr(self) -> str:
        route_fn = getattr(self, "_route_fn", None)
        how = (
            "router=module"
            if "router" in self._modules
            else (f"router={getattr(route_fn, '__name__', type(route_fn).__name__)}" if route_fn else "route=<caller>")
        )
        capacity = f", capacity_factor={self.capacity_factor:g}" if getattr(self, "capacity_factor", None) else ""
        return f"{how}, top_k={self.top_k}{capacity}"
