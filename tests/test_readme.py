"""The README's quickstart is executed as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[0] == "```bash"
    assert lines[1].startswith("bash scripts/run.sh")
    assert lines[2].startswith("bash scripts/test.sh")
    assert lines[3] == "```"


def test_quickstart_runs():
    text = README.read_text()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S)
    assert block is not None, "README has no Quickstart python block"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 20
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


def test_targets_section_runs():
    text = README.read_text()
    block = re.search(r"## Targets: kernel axes from use\n.*?```python\n(.*?)```", text, re.S)
    assert block is not None, "README has no targets python block"
    scope = {"__name__": "readme"}
    exec(compile(block.group(1), str(README), "exec"), scope)
    node = scope["adapters"]["q"]
    assert node.layout.stack_axes == (0,) and node.layout.out_axes == (2, 3)
