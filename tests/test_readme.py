"""The README's quickstart and shortest paths (real models, offline) run as written."""

from __future__ import annotations

import pathlib
import re

from _model_fixtures import require_asset

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


def _block(heading: str) -> str:
    text = README.read_text()
    block = re.search(re.escape(heading) + r".*?```python\n(.*?)```", text, re.S)
    assert block is not None, f"README has no python block after {heading!r}"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 15, f"{heading}: more than 15 lines"
    return code


def test_classifier_shortest_path_runs():
    """all-MiniLM-L6-v2 + a head: LoRA with dropout, the head trained in full (train=)."""
    require_asset("minilm")
    require_asset("fortunes")
    scope = {"__name__": "readme"}
    exec(compile(_block("**A classifier**"), str(README), "exec"), scope)
    import jax
    import numpy as np

    import jaxlora as jl
    from jaxlora.adapters import FULL_KEY

    m, adapters = scope["metrics"], scope["adapters"]
    # the oracle: a zero head starts at exactly ln(6) (six topics); five steps go well below
    assert bool(m["finite"]) and float(m["loss"]) < np.log(6) - 0.5
    labels = set(jax.tree_util.tree_leaves(jl.labels(adapters)))
    assert labels == {"lora_a", "lora_b", "full"}
    assert np.abs(np.asarray(adapters[FULL_KEY]["head"]["kernel"])).max() > 0
    paths = jl.adapt_report(lambda p: 0.0, scope["params"], adapters).targets
    assert len(paths) == 12 and all("query" in p or "value" in p for p in paths)


def test_causal_lm_shortest_path_runs(capsys):
    """SmolLM2-135M-Instruct from its GGUF: LoRA all-linear, axes from use, then generate."""
    require_asset("smollm2")
    require_asset("chatterbot")
    scope = {"__name__": "readme"}
    exec(compile(_block("**A causal LM**"), str(README), "exec"), scope)
    import jax

    import jaxlora as jl

    params, adapters, batch = scope["params"], scope["adapters"], scope["batch"]
    assert len(jl.adapt_report(scope["loss_fn"], params, adapters, batch).targets) == 7
    # the oracle: the trained adapters lower the loss below the (unchanged) base model's
    base = float(jax.jit(scope["loss_fn"])(params, batch))
    tuned = float(jax.jit(jl.adapt(scope["loss_fn"]))(params, adapters, batch))
    assert tuned < base - 0.3, (tuned, base)
    assert capsys.readouterr().out.strip()  # generated some text
