"""Which of a Sequential's stages go to which pipeline stage: given in the config, or balanced by parameter count."""

from __future__ import annotations

from collections.abc import Sequence

from ..modules import Sequential


def stage_sizes(model: Sequential) -> list[int]:
    """Trainable-or-not parameter count of each top-level stage, shared parameters counted once (first owner).

    >>> from torch import nn
    >>> stage_sizes(Sequential({"a": nn.Linear(2, 3), "b": nn.ReLU(), "c": nn.Linear(3, 1)}))
    [9, 0, 4]
    """
    seen: set[int] = set()
    sizes = []
    for name in model.stage_names:
        size = 0
        for p in model.get_submodule(name).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                size += p.numel()
        sizes.append(size)
    return sizes


def balanced_split(model: Sequential, n_stages: int) -> list[list[str]]:
    """Split ``model``'s stages into ``n_stages`` contiguous, non-empty groups, the largest group as small as possible.

    Balanced by parameter count (a proxy for memory and, for dense layers, compute); ties go
    to the split that keeps earlier groups smaller.

    Example:
        >>> from torch import nn
        >>> model = Sequential({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8), "c": nn.Linear(8, 8), "d": nn.Linear(8, 2)})
        >>> balanced_split(model, 2)
        [['a', 'b'], ['c', 'd']]
    """
    names, sizes = list(model.stage_names), stage_sizes(model)
    if not 1 <= n_stages <= len(names):
        raise ValueError(
            f"pipeline: {n_stages} pipeline stages asked for a Sequential of {len(names)} stage(s) "
            f"({', '.join(names)}); each pipeline stage needs at least one of them: use at most {len(names)} "
            "ranks per pipeline, or a model with more stages"
        )
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    inf = float("inf")
    # best[k][i]: the smallest possible largest group when the first i stages form k groups
    best = [[inf] * (len(names) + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (len(names) + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for k in range(1, n_stages + 1):
        for i in range(k, len(names) - (n_stages - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    groups, i = [], len(names)
    for k in range(n_stages, 0, -1):
        j = cut[k][i]
        groups.append(names[j:i])
        i = j
    return groups[::-1]


def check_split(model: Sequential, split: Sequence[Sequence[str]], n_stages: int) -> list[list[str]]:
    """``split`` as lists of stage names, after checking it covers ``model``'s stages in order, once each.

    Raises:
        ValueError: naming the config key ``split``, what is wrong and the model's stages.

    Example:
        >>> from torch import nn
        >>> model = Sequential({"encoder": nn.Linear(2, 2), "proj": nn.Linear(2, 2), "head": nn.Linear(2, 1)})
        >>> check_split(model, [["encoder", "proj"], ["head"]], 2)
        [['encoder', 'proj'], ['head']]
        >>> check_split(model, [["encoder"], ["head", "proj"]], 2)
        Traceback (most recent call last):
        ...
        ValueError: pipeline split [['encoder'], ['head', 'proj']]: the stages must be the Sequential's own, in order, each once: ['encoder', 'proj', 'head']; e.g. split=[[encoder], [proj, head]]
    """
    groups = [[str(n) for n in ([group] if isinstance(group, str) else group)] for group in split]
    names = list(model.stage_names)
    example = (
        "["
        + ", ".join("[" + ", ".join(g) + "]" for g in balanced_split(model, max(1, min(n_stages, len(names)))))
        + "]"
    )
    if len(groups) != n_stages:
        raise ValueError(
            f"pipeline split {groups}: {len(groups)} group(s) for {n_stages} pipeline stages; give one list of stage "
            f"names per pipeline stage (e.g. split={example}), or split=null to balance by parameter count"
        )
    empty = [i for i, g in enumerate(groups) if not g]
    unknown = [n for g in groups for n in g if n not in names]
    if unknown:
        raise ValueError(
            f"pipeline split {groups}: {', '.join(map(repr, unknown))} not stage(s) of the Sequential, whose stages are "
            f"{names}; e.g. split={example}"
        )
    if empty or [n for g in groups for n in g] != names:
        raise ValueError(
            f"pipeline split {groups}: the stages must be the Sequential's own, in order, each once: {names}; "
            f"e.g. split={example}"
        )
    return groups


def stage_layout(groups: Sequence[Sequence[str]], ranks: Sequence[Sequence[int]]) -> str:
    """One line saying which stages sit on which rank(s): ``pipeline: [encoder, proj] -> rank 0 | [head] -> rank 1``.

    ``ranks[i]`` are the global ranks holding pipeline stage ``i`` (several under PP x DP).

    >>> stage_layout([["encoder", "proj"], ["head"]], [[0, 2], [1, 3]])
    'pipeline: stage 0 [encoder, proj] on ranks 0,2 | stage 1 [head] on ranks 1,3'
    """
    parts = []
    for i, (group, on) in enumerate(zip(groups, ranks)):
        where = f"rank {on[0]}" if len(on) == 1 else "ranks " + ",".join(map(str, on))
        parts.append(f"stage {i} [{', '.join(group)}] on {where}")
    return "pipeline: " + " | ".join(parts)


def stage_of(split: Sequence[Sequence[str]], name: str) -> int:
    """The pipeline stage holding the parameter or buffer ``name`` (``"encoder.weight"`` -> the stage of ``encoder``).

    >>> stage_of([["encoder", "proj"], ["head"]], "head.bias")
    1
    """
    top = name.split(".")[0]
    for i, group in enumerate(split):
        if top in group:
            return i
    raise KeyError(f"'{name}' belongs to no pipeline stage of {split}")
