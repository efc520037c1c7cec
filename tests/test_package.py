"""The package itself: importable without Hydra (and without paying for Lightning), public names, the house rules."""

import re
from pathlib import Path

import composites
from tests import ROOT

DESIGN_NAMES = ["Sequential", "Parallel", "Conditional", "GradientGuard", "GradientFlowError", "CompositeModule"]
MAX_LINES = 250  # one concept per file
LIBRARY = [*sorted((ROOT / "composites").rglob("*.py")), *sorted((ROOT / "composites_hydra").glob("*.py"))]
OUR_CODE = ["scripts", "tests", "benchmarks", "examples", "composites", "composites_hydra"]
# sys.path edited in place or rebound, or a site dir added: imports must work from the repo root as they are
PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\b|\[[^\]]*\]\s*=(?!=)|\+?=(?!=))|site\.addsitedir")


def test_import_composites_loads_neither_hydra_nor_lightning(run_python):
    code = (
        "import sys, composites\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'hydra', 'omegaconf', 'pytorch_lightning', 'matplotlib'})\n"
        "print(','.join(heavy))"
    )
    done = run_python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_the_public_names_of_the_design_are_exported():
    assert all(hasattr(composites, name) for name in DESIGN_NAMES)
    assert set(DESIGN_NAMES) <= set(composites.__all__)
    assert issubclass(composites.GradientFlowError, RuntimeError)


# Issue 10 ("no library file is over about 250 lines"): this test FAILS until the files it lists
# are split; its message names each one with its length.
def test_no_library_file_is_over_250_lines():
    assert len(LIBRARY) > 20  # the glob found the library
    long = {str(p.relative_to(ROOT)): n for p in LIBRARY if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these files (lines, at most {MAX_LINES}): {long}"


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
