"""The docs and the example stay true: the configuration reference and the memory table equal what
the code generates, and the notebook-style example runs end to end (a few steps)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    # Parameters as jsonargparse resolves them: a recipe's **kwargs stand for the base's parameters.
    from jsonargparse._parameter_resolvers import get_signature_parameters

    from lightning_tune.data import InstructDataModule
    from lightning_tune.recipes import FullFinetune, LoRAFinetune

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


CUSTOM = ROOT / "examples" / "custom_recipe"


def test_custom_recipe_example_checks_and_freezes_what_it_says(tmp_path, monkeypatch, capsys):
    """The README's custom recipe, run as it says: `check-config` from its folder (my_recipes importable),
    then the recipe's own parameter does its job: the frozen modules are not in the optimiser."""
    import pytest

    import lightning_tune
    from lightning_tune.cli import main

    monkeypatch.syspath_prepend(str(CUSTOM))
    assert main(["check-config", str(CUSTOM / "partial_freeze.yaml")]) == 0
    assert "parses (PartialFreezeFinetune), --print_config round-trips, trains 2 shrunk steps: OK" in capsys.readouterr().out
    # The shrunk model has one layer, frozen (with the embedding): the optimiser holds exactly the other parameters.
    result = lightning_tune.check_config(CUSTOM / "partial_freeze.yaml", root=tmp_path)
    model, decoder = result.model.model, result.model.model.model
    assert len(decoder.layers) == 1 and result.model.freeze_layers == 1
    optimised = {id(p) for group in result.trainer.optimizers[0].param_groups for p in group["params"]}
    frozen = [*decoder.embed_tokens.parameters(), *decoder.layers[0].parameters()]
    assert frozen and not any(id(p) in optimised for p in frozen) and not any(p.requires_grad for p in frozen)
    trained = [p for name, p in model.named_parameters() if not name.startswith(("model.embed_tokens.", "model.layers.0."))]
    assert trained and all(id(p) in optimised for p in trained)
    # Its validation runs at construction, like the bundled recipes': one line, exit 2.
    assert main(["check-config", str(CUSTOM / "partial_freeze.yaml"), "--model.init_args.freeze_layers=-1"]) == 2
    assert "freeze_layers: must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="freeze_layers: 2 exceeds the model's 1 decoder layers"):
        lightning_tune.check_config(CUSTOM / "partial_freeze.yaml", "--model.init_args.freeze_layers=2", root=tmp_path / "again")
