"""The package itself: importable without Hydra (and without paying for Lightning), public names, the house rules."""

import ast
import re
from pathlib import Path

import composites
from tests import ROOT

DESIGN_NAMES = ["Sequential", "Parallel", "Conditional", "GradientGuard", "GradientFlowError", "CompositeModule"]
FRONT_DOOR = [
    *("Sequential", "Parallel", "Conditional", "StageError"),
    *("GradientGuard", "GradientFlowError", "GuardReport", "Problem", "CAUSES"),
    *("CompositeModule", "GradientGuardCallback"),
]
PACKAGES = ("composites", "composites_hydra")
LIBRARY = [*sorted((ROOT / "composites").rglob("*.py")), *sorted((ROOT / "composites_hydra").glob("*.py"))]
OUR_CODE = ["scripts", "tests", "benchmarks", "examples", "composites", "composites_hydra"]
# sys.path edited in place or rebound, or a site dir added: imports must work from the repo root as they are
PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\[[^\]]*\]\s*=(?!=)|\+?=(?!=))|site\.addsitedir")


def test_import_composites_loads_neither_hydra_nor_lightning(run_python):
    code = (
        "import sys, composites\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'pytorch_lightning', 'matplotlib'})\n"
        "heavy += ['torch._dynamo'] if 'torch._dynamo' in sys.modules else []  # ~1 s: only for torch.compile\n"
        "print(','.join(heavy))"
    )
    done = run_python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_the_public_names_of_the_design_are_exported():
    assert all(hasattr(composites, name) for name in DESIGN_NAMES)
    assert set(DESIGN_NAMES) <= set(composites.__all__)
    assert issubclass(composites.GradientFlowError, RuntimeError)


def test_the_front_door_is_small_and_shows_nothing_private():
    assert composites.__all__ == FRONT_DOOR
    assert [n for n in dir(composites) if n.startswith("_") and not n.startswith("__")] == []
    assert all(getattr(composites, name) is not None for name in composites.__all__)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Our modules that ``path`` imports anywhere in it (module level or inside a function)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            for alias in node.names:  # `from . import x`: the module x when there is one, else the package
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return {m for m in found if m in modules and m != name}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_among_our_modules():
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    modules = {module_name(p) for p in files}
    graph = {module_name(p): imports_of(p, modules) for p in files}
    assert "composites.guard.dtensors" in graph["composites.guard.sharded"]  # the parser sees relative imports
    assert import_cycles(graph) == []


def test_nothing_in_the_repository_edits_sys_path():
    this = Path(__file__).resolve()  # whose examples of edits are strings for the check below
    files = [p for folder in OUR_CODE for p in sorted((ROOT / folder).rglob("*.py")) if p.resolve() != this]
    assert len(files) > 50  # the globs found our code
    edits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if PATH_EDIT.search(line)
    ]
    assert edits == []


def test_the_sys_path_check_sees_every_form_of_edit():
    path = "sys" + ".path"  # spelled apart, so this file holds no edit a plain grep would flag
    edits = [
        f"{path}.insert(0, here)",
        f"{path}.append(d)",
        "sys.path[:0] = [d]",
        "sys.path += [d]",
        "site.addsitedir(d)",
    ]
    reads = ["print(sys.path)", "if d in sys.path:", "sys.path == before", "sys.path[0] == d", "list(sys.path)"]
    assert [bool(PATH_EDIT.search(line)) for line in edits + reads] == [True] * len(edits) + [False] * len(reads)
