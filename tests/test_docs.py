"""README.md and docs/*.md do what they say: every code block runs, every command line is checked.

- ```python blocks run in order, one namespace per page: a block whose first line starts with
  ``>>>`` is a doctest (its printed output must match), any other block is executed.
- ```bash commands: ``python scripts/train.py ...`` (and ``diagnose.py``, ``srun ...`` and the
  arguments of ``sbatch scripts/slurm/train.sbatch``) are composed with Hydra's compose API and
  built (``composites_hydra.build``): every point of a sweep composed, each choice of config
  groups built; ``make X`` must be a Makefile
  target; ``python -m benchmarks`` arguments go through the benchmarks' own parser; scripts and
  paths must exist. A command with no checker fails: add one here.
- The README's sweep runs end to end, in one subprocess, with fast overrides (``documented_sweep``).
- ```yaml blocks parse, and each ``_target_`` in them can be imported.
- The only way out for a block is ``<!-- docs-test: needs cuda -->`` on the line before its
  fence (code a CPU-only machine cannot run at all); it runs wherever CUDA is.
"""

from __future__ import annotations

import doctest
import importlib.util
import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf, open_dict

import composites
from composites_hydra import build, register_configs
from composites_hydra.build import CONFIG_DIR
from tests import ROOT
from tests.docs_blocks import LANGUAGES, NEEDS, PAGES, Block, Command, anchors, blocks, commands, links, table_column

README = ROOT / "README.md"
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
PYTHON_PAGES = [page for page in PAGES if any(b.language == "python" for b in blocks(page))]
COMMANDS = [c for b in ALL_BLOCKS if b.language == "bash" for c in commands(b)]
MAX_MARKED = 2  # blocks that may sit out a CPU-only run, over all pages


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# --- the pages themselves ---------------------------------------------------------------------


def test_the_readme_is_a_front_page_of_at_most_150_lines_linking_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    linked = {path for path, _ in links(README)}
    assert {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")} <= linked


def test_the_readme_starts_with_the_two_make_commands():
    first = next(b for b in blocks(README) if b.language == "bash")
    assert [c.words for c in commands(first)] == [("make", "train"), ("make", "test")]


def test_the_readme_names_what_make_train_runs():
    recipe = re.search(r"^train:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), flags=re.M)[1]
    assert recipe == "$(PY) scripts/train.py +composite=parallel"
    assert "`make train` is `python scripts/train.py +composite=parallel`" in README.read_text()


def test_the_readme_example_shows_the_guard_naming_the_detached_encoder():
    (example,) = [b for b in blocks(README) if b.language == "python"]
    shown = example.text.split("print(err)")[1]
    assert "encoder.0.weight  encoder    detached" in shown and "encoder.0.bias    encoder    detached" in shown


def test_the_causes_table_lists_exactly_the_guards_causes():
    assert table_column((ROOT / "docs" / "guard.md").read_text(), "## The causes") == list(composites.CAUSES)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_reaches_a_file_and_heading(page):
    for path, anchor in links(page):
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page_id(page)} links to {path}, which does not exist"
        if anchor:
            assert anchor in anchors(target), f"{page_id(page)} links to {path}#{anchor}: no such heading"


def test_blocks_are_of_known_languages_and_rarely_marked():
    unknown = [f"{b.where}: ```{b.language}" for b in ALL_BLOCKS if b.language not in LANGUAGES]
    assert unknown == [], f"blocks of no known language (one of {sorted(LANGUAGES)}): {unknown}"
    marked = [b for b in ALL_BLOCKS if b.needs is not None]
    assert all(b.needs in NEEDS and b.language == "python" for b in marked), [b.where for b in marked]
    assert len(marked) <= MAX_MARKED, f"blocks kept from CPU runs: {[b.where for b in marked]}"


# --- ```python ---------------------------------------------------------------------------------


def run_block(block: Block, namespace: dict) -> None:
    """Run one block in ``namespace``: a doctest when it starts with ``>>>``, else executed as a script."""
    if block.text.lstrip().startswith(">>>"):
        # the block's own line numbers in failure reports: it starts one line past the fence
        test = doctest.DocTestParser().get_doctest(block.text, namespace, block.where, str(block.page), block.line)
        report: list[str] = []
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        result = runner.run(test, out=report.append, clear_globs=False)
        namespace.update(test.globs)  # the doctest ran in a copy; later blocks see its names
        assert result.failed == 0, "".join(report)
    else:
        code = compile("\n" * block.line + block.text, str(block.page), "exec")  # tracebacks show page lines
        exec(code, namespace)


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=page_id)
def test_python_blocks_run_in_order(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes (Lightning's logs, checkpoints) stays out of the repository
    namespace = {"__name__": f"docs_{page.stem}"}
    for block in [b for b in blocks(page) if b.language == "python"]:
        if block.needs == "cuda" and not torch.cuda.is_available():
            continue
        run_block(block, namespace)


# --- ```yaml ----------------------------------------------------------------------------------


def targets(node: object) -> Iterator[str]:
    """Every ``_target_`` string in a parsed config."""
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node["_target_"]
        for value in node.values():
            yield from targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from targets(value)


def check_target(target: str, where: str) -> None:
    """A ``_target_`` imports; one of a user's package in examples/ need only name that package."""
    if target.startswith("${"):  # an interpolation: resolved, and built, when the config is
        return
    root = target.split(".")[0]
    if importlib.util.find_spec(root) is None:
        assert list((ROOT / "examples").glob(f"*/{root}/__init__.py")), f"{where}: {target} cannot be imported"
        return
    get_object(target)


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "yaml"], ids=lambda b: b.where)
def test_yaml_blocks_parse_and_their_targets_import(block):
    parsed = yaml.safe_load(block.text)
    assert isinstance(parsed, dict)
    for target in targets(parsed):
        check_target(target, block.where)


# --- ```bash ----------------------------------------------------------------------------------

SWEEPS = OverridesParser.create()


def split_train_args(args: list[str], where: str) -> tuple[str | None, list[str]]:
    """``train.py``'s command-line arguments -> (config dir or None, overrides)."""
    config_dir, overrides, rest = None, [], list(args)
    while rest:
        word = rest.pop(0)
        if word in ("-m", "--multirun"):
            continue
        if word in ("--config-dir", "-cd"):
            config_dir = rest.pop(0)
        elif word.startswith("--config-dir="):
            config_dir = word.partition("=")[2]
        elif word.startswith("-"):
            pytest.fail(f"{where}: train.py flag {word} is not one the docs test knows; teach split_train_args")
        else:
            overrides.append(word)
    return config_dir, overrides


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """Every point of a ``-m`` sweep (``seed=0,1`` gives two), each a plain list of overrides."""
    choices = []
    for parsed, text in zip(SWEEPS.parse_overrides(overrides), overrides):
        if parsed.is_sweep_override():
            choices.append([f"{parsed.get_key_element()}={value}" for value in parsed.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(point) for point in itertools.product(*choices)]


def absolute_search_paths(overrides: list[str]) -> list[str]:
    """``hydra.searchpath=[file://rel]`` as the repository root reads it (the compose API reads the working dir)."""
    return [
        re.sub(r"file://(?!/)", f"file://{ROOT}/", o) if o.startswith("hydra.searchpath=") else o for o in overrides
    ]


def composed(config_dir: str | None, overrides: list[str], output_dir: Path) -> DictConfig:
    """configs/train.yaml composed as scripts/train.py would, without the ``hydra`` node."""
    register_configs()
    search = [f"hydra.searchpath=[file://{(ROOT / config_dir).resolve()}]"] if config_dir else []
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.output_dir={output_dir}", *search, *absolute_search_paths(overrides)],
            return_hydra_config=True,  # so hydra/launcher and hydra.launcher.* overrides are checked too
        )
    with open_dict(cfg):
        cfg.pop("hydra")
    return cfg


def group_choices(point: list[str]) -> frozenset[str]:
    """The config-group choices of a sweep point (``trainer=ddp``, ``+composite=parallel``): they change what is built."""
    return frozenset(o for o in point if "." not in o.partition("=")[0])


def check_train(args: list[str], command: Command, tmp_path: Path, before: list[str] = ()) -> None:
    """Compose every point of a train.py command line and build each choice of config groups in it.

    Points that differ only in values (``seed=0,1``) are checked against the schema by composing;
    ``before``: overrides a wrapper script puts first.
    """
    config_dir, overrides = split_train_args(args, command.where)
    built: set[frozenset[str]] = set()
    for number, point in enumerate(sweep_points([*before, *overrides])):
        cfg = composed(config_dir, point, tmp_path / f"run{number}")
        if group_choices(point) in built:
            continue
        built.add(group_choices(point))
        found = targets(OmegaConf.to_container(cfg))
        outside = [t for t in found if not t.startswith("${") and importlib.util.find_spec(t.split(".")[0]) is None]
        if outside:  # a user's package from examples/: importable once the page's pip install ran
            for target in outside:
                check_target(target, command.where)
            continue
        if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            # everything but the device is still built; a GPU machine builds it as written
            cfg = composed(config_dir, [*point, "trainer.accelerator=cpu"], tmp_path / f"run{number}")
        build(cfg)


def check_python(command: Command, tmp_path: Path, monkeypatch) -> None:
    words = list(command.words[1:])
    if words[:2] == ["-m", "benchmarks"]:
        check_bench_args(words[2:], command, tmp_path, monkeypatch)
    elif words[0] in ("scripts/train.py", "scripts/diagnose.py"):
        check_train(words[1:], command, tmp_path)
    else:
        pytest.fail(f"{command.where}: no check for `{command}`; add one to tests/test_docs.py")


def check_bench_args(args: list[str], command: Command, tmp_path: Path, monkeypatch) -> None:
    """The benchmarks' own argument parser accepts the arguments; no section runs."""
    import benchmarks.__main__ as bench

    monkeypatch.setattr(bench, "load_section", lambda name: lambda settings: [])
    threads = torch.get_num_threads()
    try:
        bench.main([*args, "--out", str(tmp_path / "bench.json")])
    except SystemExit as refused:
        pytest.fail(f"{command.where}: python -m benchmarks refuses {args}: exit {refused.code}")
    finally:
        torch.set_num_threads(threads)  # main() sets one thread for its process


def options_then_rest(words: list[str], command: Command) -> list[str]:
    """Past a launcher's ``--option=value`` options (the one spelling the docs use, so none swallows the script)."""
    rest = list(words)
    while rest and rest[0].startswith("-"):
        assert "=" in rest[0], f"{command.where}: write {rest[0]} as --option=value"
        rest.pop(0)
    return rest


def check_sbatch(command: Command, tmp_path: Path, monkeypatch) -> None:
    script, *args = options_then_rest(list(command.words[1:]), command)
    assert (ROOT / script).is_file(), f"{command.where}: no {script}"
    if script == "scripts/slurm/train.sbatch":  # it runs train.py with trainer=ddp first, then these arguments
        chosen = any(a.startswith(("+composite=", "composite=")) for a in args)
        check_train(args, command, tmp_path, before=["trainer=ddp", *([] if chosen else ["+composite=parallel"])])


def check_srun(command: Command, tmp_path: Path, monkeypatch) -> None:
    rest = options_then_rest(list(command.words[1:]), command)
    assert rest[0] == "python", f"{command.where}: srun of {rest[0]}: no check for it"
    check_python(Command(command.block, command.line, tuple(rest)), tmp_path, monkeypatch)


def check_make(command: Command, tmp_path: Path, monkeypatch) -> None:
    target, *variables = command.words[1:]
    assert target in MAKE_TARGETS, f"{command.where}: no make target {target!r} (targets: {sorted(MAKE_TARGETS)})"
    assert all("=" in v for v in variables), f"{command.where}: make takes VAR=value after the target"


def check_pip(command: Command, tmp_path: Path, monkeypatch) -> None:
    assert command.words[1:3] == ("install", "-e"), f"{command.where}: the docs install with pip install -e"
    path, _, extras = command.words[3].partition("[")
    pyproject = (ROOT / path / "pyproject.toml").read_text()
    optional = pyproject.partition("[project.optional-dependencies]")[2].partition("\n[")[0]
    for extra in filter(None, extras.rstrip("]").split(",")):
        assert re.search(rf"^{extra} = ", optional, flags=re.M), f"{command.where}: no extra {extra!r} in {path}"


def check_export(command: Command, tmp_path: Path, monkeypatch) -> None:
    name, _, value = command.words[1].partition("=")
    assert name == "PYTHONPATH" and (ROOT / value).is_dir(), f"{command.where}: export of {command.words[1]}"


CHECKS: dict[str, Callable[[Command, Path, object], None]] = {
    "python": check_python,
    "make": check_make,
    "sbatch": check_sbatch,
    "srun": check_srun,
    "pip": check_pip,
    "export": check_export,
}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.where)
def test_bash_command_is_what_the_repository_runs(command, tmp_path, monkeypatch):
    assert "<" not in str(command), f"{command.where}: a placeholder in `{command}`; show a command that runs"
    check = CHECKS.get(command.words[0])
    assert check is not None, f"{command.where}: no check for `{command}`; add one to CHECKS in tests/test_docs.py"
    check(command, tmp_path, monkeypatch)


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_representative_commands_run_end_to_end(documented_sweep):
    # One fresh interpreter with Lightning, shared with test_run_output (tests/conftest.py); the
    # scripts' tests in tests/scripts/ run the scripts end to end otherwise.
    command, _, done = documented_sweep
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{command.where}: `{command}` failed:\n{out[-4000:]}"
    assert "test/acc" in out, out[-4000:]
    points = len(sweep_points(split_train_args(list(command.words[2:]), command.where)[1]))  # one ok row per point
    assert points > 1 and f"sweep of {points} runs" in out, out[-4000:]
    assert len(re.findall(r"^\d+ .* ok$", out, flags=re.M)) == points, out[-4000:]


@pytest.mark.parametrize(
    "line",
    [
        "make nothing-of-the-kind",
        "python scripts/train.py +composite=nonexistent",
        "python scripts/train.py +composite=parallel trainer.max_epoch=1",
        "python scripts/train.py -m +composite=parallel seed=0,one",
        "python scripts/train.py --cfg job +composite=parallel",
        "python scripts/nothing.py",
        "python -m benchmarks --only nothing",
        "sbatch scripts/slurm/nothing.sbatch",
        "sbatch -N 2 scripts/slurm/train.sbatch",
        "srun --ntasks=2 python scripts/train.py +composite=parallel optimizer=nothing",
        "pip install -e '.[nothing]'",
        "python scripts/train.py +composite=parallel hydra.run.dir=<run dir>",
        "frobnicate --all",
    ],
)
def test_a_wrong_command_fails_its_check(line, tmp_path, monkeypatch):
    block = Block(ROOT / "docs" / "example.md", 1, "bash", line + "\n")
    (command,) = commands(block)
    with pytest.raises((AssertionError, pytest.fail.Exception, HydraException)):
        test_bash_command_is_what_the_repository_runs(command, tmp_path, monkeypatch)
