"""The package's floor plan holds, and the paths users already have keep working.

- The layer contract of pyproject.toml (`lint-imports`: no upward import, no circle; it reads
  function-local imports too).
- No private name (`_x`) imported from another module; function-local imports of the package's own
  modules only where the CLI keeps its torch-free start.
- Every `class_path` in the bundled configs and the docs, every public name of `lightning_tune`, and
  the old module paths (aliases) resolve, to the same objects as the new ones.
- A LoRA checkpoint and its run's config.yaml written before the re-layout (tests/fixtures/before_relayout)
  still export and resume.
"""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lightning_tune

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_tune"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "before_relayout"
# Function-local imports of the package's own modules are allowed only where `--help` and `ls` must not
# import torch (the CLI's dispatch and its light verbs) and in the lazy top-level face.
LOCAL_IMPORTS_ALLOWED = ("lightning_tune/__init__.py", "lightning_tune/cli/")
# Modules that import an optional dependency when imported (lm-eval): imported where they are used.
OPTIONAL_MODULES = ("lightning_tune.evaluation.harness",)


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "evaluation/tasks" not in p.as_posix())


def test_layer_contract_holds() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout[-2000:]


def test_no_private_name_is_imported_across_modules() -> None:
    found = []
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_tune"):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, "\n".join(found)


def test_function_local_imports_of_the_package_only_on_the_cli_fast_path() -> None:
    found = []
    for path in package_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(LOCAL_IMPORTS_ALLOWED):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_tune") and node.module not in OPTIONAL_MODULES:
                        found.append(f"{rel}:{node.lineno}: from {node.module} import ...")
                    elif isinstance(node, ast.Import) and any(a.name.startswith("lightning_tune") for a in node.names):
                        found.append(f"{rel}:{node.lineno}: import {node.names[0].name}")
    assert not found, "\n".join(found)


def class_paths() -> list[str]:
    """Every `class_path:` of the bundled configs, and of the YAML in the docs and README."""
    paths = set()
    for config in sorted((PACKAGE / "configs").glob("*.yaml")):
        paths |= set(re.findall(r"class_path:\s*([\w.]+)", config.read_text()))
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        paths |= set(re.findall(r"class_path:\s*([\w.]+)", doc.read_text()))
    return sorted(p for p in paths if p.startswith("lightning_tune"))


@pytest.mark.parametrize("class_path", class_paths())
def test_every_class_path_in_configs_and_docs_imports(class_path: str) -> None:
    module, _, name = class_path.rpartition(".")
    assert isinstance(getattr(importlib.import_module(module), name), type), class_path


def test_every_public_name_resolves() -> None:
    for name in lightning_tune.__all__:
        assert getattr(lightning_tune, name) is not None, name


OLD_PATHS = {
    # configs, docs and every checkpoint's `_class_path` before the re-layout
    "lightning_tune.modules.LoRAFinetune": "lightning_tune.recipes.sft.LoRAFinetune",
    "lightning_tune.modules.FullFinetune": "lightning_tune.recipes.sft.FullFinetune",
    "lightning_tune.modules.DPOFinetune": "lightning_tune.recipes.dpo.DPOFinetune",
    "lightning_tune.modules.FinetuneModule": "lightning_tune.recipes.base.FinetuneModule",
    # every run's saved config.yaml
    "lightning_tune.callbacks.AtomicCheckpointIO": "lightning_tune.training.callbacks.AtomicCheckpointIO",
    "lightning_tune.eval_callback.LMEvalCallback": "lightning_tune.evaluation.callback.LMEvalCallback",
    "lightning_tune.LMEvalCallback": "lightning_tune.evaluation.callback.LMEvalCallback",
    "lightning_tune.onednn.use_onednn_linears_": "lightning_tune.layers.onednn.use_onednn_linears_",
    # package faces: today's import lines
    "lightning_tune.generate.generate": "lightning_tune.generate.loop.generate",
    "lightning_tune.checkpoint.from_pretrained": "lightning_tune.checkpoint.load.from_pretrained",
    "lightning_tune.checkpoint.CheckpointError": "lightning_tune.io.files.CheckpointError",
    "lightning_tune.tokenizer.load_tokenizer": "lightning_tune.tokenizer.load.load_tokenizer",
    "lightning_tune.model.CausalLM": "lightning_tune.model.decoder.CausalLM",
    "lightning_tune.model.ModelConfig": "lightning_tune.families.config.ModelConfig",
    # names from before the families work, in the one compatibility module
    "lightning_tune.model.Llama": "lightning_tune.model.decoder.CausalLM",
    "lightning_tune.model.LlamaConfig": "lightning_tune.families.config.ModelConfig",
    "lightning_tune.model.llama2_config": "lightning_tune.model.builders.model_config",
}


def resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("old", "new"), OLD_PATHS.items(), ids=list(OLD_PATHS))
def test_old_paths_are_the_new_objects(old: str, new: str) -> None:
    assert resolve(old) is resolve(new)


def test_old_size_table_name() -> None:
    from lightning_tune.families import SIZES
    from lightning_tune.model import LLAMA2_SIZES

    assert LLAMA2_SIZES == {name: dict(size.config) for name, size in SIZES.items()}


def test_checkpoint_from_before_the_relayout_names_the_old_paths() -> None:
    """The fixture really is what the old code wrote (else the next two tests prove nothing)."""
    from lightning_tune.checkpoint import load_training_checkpoint

    checkpoint = load_training_checkpoint(FIXTURE / "last.ckpt")
    assert checkpoint["hyper_parameters"]["_class_path"] == "lightning_tune.modules.LoRAFinetune"
    config = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    assert config["trainer"]["plugins"]["class_path"] == "lightning_tune.callbacks.AtomicCheckpointIO"
    assert config["model"]["class_path"] == "lightning_tune.modules.LoRAFinetune"


def test_checkpoint_from_before_the_relayout_exports(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lightning_tune.checkpoint import load_training_checkpoint
    from lightning_tune.cli import main

    assert main(["export", "--ckpt_path", str(FIXTURE / "last.ckpt"), "--format", "peft", "--output", str(tmp_path / "adapter")]) == 0
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    saved = load_training_checkpoint(FIXTURE / "last.ckpt")["state_dict"]
    lora = {k.removeprefix("model."): v for k, v in saved.items() if "lora_" in k}
    assert len(adapter) == len(lora) == 16  # q_proj and v_proj of 4 layers, A and B
    for key, tensor in adapter.items():  # PEFT's names: base_model.model.<ours> with .weight after lora_A/B
        ours = key.removeprefix("base_model.model.").replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")
        match = [v for k, v in lora.items() if k.startswith(ours)]
        assert len(match) == 1 and match[0].equal(tensor), key


def test_a_run_whose_tokenizer_moved_exports_hf_with_tokenizer_path(tmp_path: Path, capsys) -> None:
    """The fixture's run recorded a tokenizer_path that no longer exists (it was made in another folder):
    the peft export above needs none; an hf export says so in one line and takes --tokenizer_path (after
    which it stops at the next problem of this run: its random-init base is not in the checkpoint)."""
    from lightning_tune.cli import main

    args = ["export", "--ckpt_path", str(FIXTURE / "last.ckpt"), "--format", "hf", "--output", str(tmp_path / "hf")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tokenizer_path" in err and "no longer exists" in err and "last.ckpt" in err, err
    assert not (tmp_path / "hf").exists()
    assert main([*args, "--tokenizer_path", str(PACKAGE / "data" / "assets" / "demo_tokenizer.model")]) == 2
    err = capsys.readouterr().err.strip()
    assert "random-init base" in err and "tokenizer" not in err, err
    assert not (tmp_path / "hf").exists()


def test_run_from_before_the_relayout_resumes(tmp_path: Path) -> None:
    """`fit --config <the old run's config.yaml> --ckpt_path <its last.ckpt>` trains on from step 2."""
    from lightning_tune.checkpoint import load_training_checkpoint
    from lightning_tune.cli import main

    config = tmp_path / "config.yaml"
    config.write_text((FIXTURE / "config.yaml").read_text().replace("/tmp/fixture_run", str(tmp_path / "run")))
    assert main(["fit", "--config", str(config), "--ckpt_path", str(FIXTURE / "last.ckpt"), "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1", "--model.export", "false"]) == 0
    before = load_training_checkpoint(FIXTURE / "last.ckpt")
    after = load_training_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert (before["global_step"], after["global_step"]) == (2, 3)
    assert before["state_dict"].keys() == after["state_dict"].keys()  # adapters only, as before
    assert any(not before["state_dict"][k].equal(v) for k, v in after["state_dict"].items())  # the third step trained them
    rows = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert [row.split(",")[header.index("step")] for row in rows[1:] if row.split(",")[header.index("train_loss")]] == ["3"], rows  # logged after the optimiser step
