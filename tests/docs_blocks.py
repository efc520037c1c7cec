"""The code blocks of README.md and docs/*.md, and the commands in their ```bash blocks, for tests/test_docs.py.

Plain functions over text: what a page holds, not what running it does.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from tests import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "yaml", ""}  # "": plain text (tables of output, file trees); never run
# The one way to keep a block from running where it cannot: an HTML comment on the line before its
# fence. Only for what a CPU-only CI machine cannot do at all; the block still runs where it can.
NEEDS = {"cuda"}
MARKER = re.compile(r"<!--\s*docs-test:\s*needs\s+(\S+)\s*-->")
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<language>[\w-]*)[ ]*\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    """One fenced block: its page, the line of its opening fence, its language and text."""

    page: Path
    line: int
    language: str
    text: str
    needs: str | None = None  # from a ``<!-- docs-test: needs X -->`` marker

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, in order, dedented when a list item indents them.

    >>> text = "intro\\n<!-- docs-test: needs cuda -->\\n```python\\nx = 1\\n```\\n  ```bash\\n  make test\\n  ```\\n"
    >>> [(b.line, b.language, b.text, b.needs) for b in blocks_of(Path(ROOT / "x.md"), text)]
    [(3, 'python', 'x = 1\\n', 'cuda'), (6, 'bash', 'make test\\n', None)]
    """
    return blocks_of(page, page.read_text())


def blocks_of(page: Path, text: str) -> list[Block]:
    """:func:`blocks` of a page's ``text``."""
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        indent = len(match["indent"])
        body = "".join(row[indent:] if row[:indent].isspace() else row for row in match["body"].splitlines(True))
        before = text[: match.start()].rstrip("\n").rpartition("\n")[2]
        marker = MARKER.search(before)
        found.append(Block(page, line, match["language"], body, marker[1] if marker else None))
    return found


@dataclass(frozen=True)
class Command:
    """One command of a ```bash block: its words (comments dropped, continuations joined)."""

    block: Block
    line: int
    words: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.block.page.relative_to(ROOT)}:{self.line}"

    def __str__(self) -> str:
        return shlex.join(self.words)


def commands(block: Block) -> list[Command]:
    """The commands of a bash block: one per line, ``\\`` continues a line, ``#`` starts a comment.

    >>> block = Block(ROOT / "x.md", 10, "bash", "make test   # all\\n\\npython a.py \\\\\\n    'x=[a.*]'  # b\\n")
    >>> [(c.line, c.words) for c in commands(block)]
    [(11, ('make', 'test')), (13, ('python', 'a.py', 'x=[a.*]'))]
    """
    found, pending, start = [], "", 0
    for number, row in enumerate(block.text.splitlines(), block.line + 1):
        start = start or number
        if row.rstrip().endswith("\\"):
            pending += row.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + row, comments=True)
        if words:
            found.append(Command(block, start, tuple(words)))
        pending, start = "", 0
    return found


def links(page: Path) -> list[tuple[str, str]]:
    """The relative Markdown links of a page outside code: ``(target path, anchor)``.

    >>> links_of("see [the guard](guard.md#the-causes), [web](https://x.org), `[no](code.md)`")
    [('guard.md', 'the-causes')]
    """
    return links_of(page.read_text())


def links_of(text: str) -> list[tuple[str, str]]:
    """:func:`links` of a page's ``text``."""
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if "://" not in target:
            path, _, anchor = target.partition("#")
            found.append((path, anchor))
    return found


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub makes them.

    >>> sorted(anchors_of("# A page\\n## Bring your own model and data\\n### `may_skip`, and more\\n"))
    ['a-page', 'bring-your-own-model-and-data', 'may_skip-and-more']
    """
    return anchors_of(page.read_text())


def anchors_of(text: str) -> set[str]:
    """:func:`anchors` of a page's ``text``."""
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def table_column(text: str, heading: str) -> list[str]:
    """The first column of the first table under ``heading``, code marks removed.

    >>> table_column("## Causes\\n\\n| cause | what |\\n| --- | --- |\\n| `a` | x |\\n| `b` | y |\\n\\nmore", "## Causes")
    ['a', 'b']
    """
    section = text.split(heading + "\n", 1)[1]
    table = section[section.index("\n|") + 1 :].split("\n\n", 1)[0]
    return [row.split("|")[1].strip().strip("`") for row in table.splitlines()[2:]]  # past the header and ---
