"""The docs and the example stay true: the configuration reference and the memory table equal what
the code generates, and the notebook-style example runs end to end (a few steps)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_generator(name: str = "gen_config_docs"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_the_code():
    gen = load_generator()
    text = gen.render()
    assert (ROOT / "docs" / "configuration.md").read_text() == text, "docs/configuration.md is stale: run python scripts/gen_config_docs.py"
    # Every argument of every documented class has a row with a description.
    from lightning_tune.data import InstructDataModule
    from lightning_tune.modules import FullFinetune, LoRAFinetune

    # Parameters as jsonargparse resolves them: a recipe's **kwargs stand for the base's parameters.
    from jsonargparse._parameter_resolvers import get_signature_parameters

    for cls, prefix in ((LoRAFinetune, "model.init_args."), (FullFinetune, "model.init_args."), (InstructDataModule, "data.")):
        for name in [p.name for p in get_signature_parameters(cls, "__init__")]:
            rows = [line for line in text.splitlines() if line.startswith(f"| `{prefix}{name}` |")]
            assert rows and not rows[0].endswith("|  |"), f"{cls.__name__}.{name} lacks a documented row"


def test_memory_table_is_generated_from_the_code():
    gen = load_generator("gen_memory_table")
    document = (ROOT / "docs" / "distributed.md").read_text()
    table = gen.render_table()
    assert gen.splice(document, table) == document, "the memory table in docs/distributed.md is stale: run python scripts/gen_memory_table.py"
    # A row for every bundled config, and the marker section is the only generated part.
    from lightning_tune.cli import bundled_configs

    for path in bundled_configs():
        assert f"| `{path.name}` |" in table
    assert document.count(gen.START) == document.count(gen.END) == 1


def test_notebook_example_runs(tmp_path):
    env = {**os.environ, "LIGHTNING_TUNE_EXAMPLE_STEPS": "3", "LIGHTNING_TUNE_EXAMPLE_OUT": str(tmp_path / "run"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "notebook_lora.py")], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported: ['adapter', 'lightning_logs', 'merged']" in proc.stdout
    assert "Add 3 and 4. -> " in proc.stdout
    assert (tmp_path / "run" / "merged" / "config.json").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
