"""Which parameters the gradient reaches from a set of graph ends: one walk of the graph for all questions.

A diagnosis asks, for every traced module call, which leaves its inputs and its outputs reach
in the autograd graph. Walked afresh for each call, a deep model's graph is walked once per
call: quadratic, tens of seconds for a detection model. Here every graph node is visited once,
its answer kept as a bit set (a Python int, one bit per leaf) and reused by every later
question that passes through it; the answer is a set of leaf ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor


class GraphReach:
    """Answers "which leaves do these graph ends reach?" for many sets of ends over one autograd graph.

    Ends are ``grad_fn`` nodes, or leaf tensors that need grad (what a module call's inputs and
    outputs hang on). Each node's leaves are computed once, bottom up, without recursion (a
    graph thousands of nodes deep is fine), and kept, with the node, while this object lives.

    Example:
        >>> import torch
        >>> a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
        >>> h = a * 2
        >>> graph = GraphReach()
        >>> sorted(n for n, t in {"a": a, "b": b}.items() if id(t) in graph.reachable([(h + b).grad_fn]))
        ['a', 'b']
        >>> sorted(n for n, t in {"a": a, "b": b}.items() if id(t) in graph.reachable([h.grad_fn]))
        ['a']
    """

    def __init__(self) -> None:
        self._index: dict[int, int] = {}  # id(leaf) -> bit
        self._leaves: list[Any] = []  # held, so their ids stay theirs
        self._ids: list[int] = []  # bit -> id(leaf)
        self._sets: dict[int, frozenset[int]] = {}
        self.visits = 0  # graph nodes whose leaves were worked out: each node once
        self._memo: dict[int, tuple[Any, int]] = {}  # id(node) -> (node, bits); the node held for the same reason

    def _bit(self, leaf: Any) -> int:
        bit = self._index.get(id(leaf))
        if bit is None:
            bit = self._index[id(leaf)] = len(self._leaves)
            self._leaves.append(leaf)
            self._ids.append(id(leaf))
        return 1 << bit

    def _bits(self, node: Any) -> int:
        memo = self._memo
        done = memo.get(id(node))
        if done is not None:
            return done[1]
        stack = [node]
        while stack:
            current = stack[-1]
            if id(current) in memo:
                stack.pop()
                continue
            children = [child for child, _ in current.next_functions if child is not None]
            pending = [child for child in children if id(child) not in memo]
            if pending:
                stack.extend(pending)
                continue
            variable = getattr(current, "variable", None)  # AccumulateGrad holds its leaf
            bits = self._bit(variable) if variable is not None else 0
            for child in children:
                bits |= memo[id(child)][1]
            memo[id(current)] = (current, bits)
            self.visits += 1
            stack.pop()
        return memo[id(node)][1]

    def reachable(self, ends: Iterable[Any]) -> frozenset[int]:
        """Ids of the leaf tensors (parameters) the gradient would reach from ``ends``."""
        bits = 0
        for end in ends:
            if isinstance(end, Tensor):
                bits |= self._bit(end)
            elif end is not None:
                bits |= self._bits(end)
        found = self._sets.get(bits)
        if found is None:  # calls in a row often reach the same leaves: one set for them all
            ids = self._ids
            found = self._sets[bits] = frozenset(ids[i] for i, one in enumerate(bin(bits)[:1:-1]) if one == "1")
        return found


class CallReach:
    """For a traced forward: the leaves each call's inputs and outputs reach, and, per leaf, the calls that reach it.

    ``reach(call, "outputs")`` is the set of leaf ids, as before; ``reach.calls(leaf_id, side)``
    lists, in trace order, the calls whose ``side`` reaches that leaf, for each leaf in
    ``wanted`` (the parameters being explained). Both come from one pass over the calls, so
    explaining many parameters costs no pass over the trace per parameter.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace as Call
        >>> w = torch.ones(2, requires_grad=True)
        >>> h = w * 2
        >>> first, second = Call(inputs=[w], outputs=[h.grad_fn]), Call(inputs=[h.grad_fn], outputs=[])
        >>> reach = CallReach([first, second], {id(w)})
        >>> id(w) in reach(second, "inputs"), reach.calls(id(w), "outputs") == [first]
        (True, True)
    """

    def __init__(self, trace: Iterable[Any], wanted: set[int]):
        self.graph = graph = GraphReach()
        self._sets: dict[tuple[int, str], frozenset[int]] = {}
        self._calls: dict[str, dict[int, list[Any]]] = {"inputs": {}, "outputs": {}}
        for call in trace:
            for side, by_leaf in self._calls.items():
                leaves = self._sets[id(call), side] = graph.reachable(getattr(call, side))
                for leaf in leaves & wanted:
                    by_leaf.setdefault(leaf, []).append(call)

    def __call__(self, call: Any, side: str) -> frozenset[int]:
        return self._sets[id(call), side]

    def calls(self, leaf_id: int, side: str) -> list[Any]:
        """The calls, in trace order, whose ``side`` ("inputs" or "outputs") reaches ``leaf_id`` (one of ``wanted``)."""
        return self._calls[side].get(leaf_id, [])
