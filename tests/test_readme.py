"""The README's Python example runs as written and shows what it claims."""

import re

from tests import ROOT

README = ROOT / "README.md"


def test_readme_example_runs_and_the_guard_names_the_detached_encoders(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "parameters checked;" in out
    assert "encoders.cnn.1.weight" in out and "encoders.mlp.1.bias" in out
    assert "unused" not in out.split("\n")[0]


def test_readme_quick_start_is_the_two_make_commands():
    quick = README.read_text().split("## Quick start")[1].split("##")[0]
    commands = [
        line.split("#")[0].strip() for line in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)[0].splitlines()
    ]
    assert commands == ["make train", "make test"]
