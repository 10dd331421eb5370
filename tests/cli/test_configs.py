"""Every bundled config parses, round-trips through --print_config, and trains two steps (shrunk):
the public `lightning_tune.check_config` users run on their own configs."""

import importlib
from pathlib import Path

import pytest
import yaml

import lightning_tune
from lightning_tune.cli import CONFIG_DIR, main, make_cli
from lightning_tune.cli.check import SHRINK, ConfigCheckError  # SHRINK: a 7B/70B config shrunk to a few-MB random model on the CPU, demo data
from lightning_tune.recipes import FinetuneModule

CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_configs_are_bundled():
    assert {"alpaca_llama2_lora.yaml", "alpaca_llama2_full.yaml", "alpaca_llama2_13b_lora.yaml", "alpaca_llama2_70b_lora.yaml", "tiny_lora.yaml", "tiny_full.yaml"} <= set(CONFIGS)
    assert (Path(__file__).parents[2] / "configs").resolve() == CONFIG_DIR.resolve()


def recipe_of(class_path: str) -> type:
    """The class a resolved `class_path` names (`lightning_tune.LoRAFinetune` or a module path)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", CONFIGS)
def test_header_documents_the_run(name):
    text = (CONFIG_DIR / name).read_text()
    assert text.startswith("#") and f"fit --config {name}" in text


@pytest.mark.parametrize("name", CONFIGS)
def test_run_directory_is_named_once(name):
    """Logs and checkpoints derive from default_root_dir (the CLI fills them in), so a config that
    repeats the directory in save_dir or dirpath would not move with --trainer.default_root_dir."""
    trainer = yaml.safe_load((CONFIG_DIR / name).read_text())["trainer"]
    loggers = trainer.get("logger")
    for spec in [*(loggers if isinstance(loggers, list) else [loggers]), *(trainer.get("callbacks") or [])]:
        if isinstance(spec, dict):
            assert not {"save_dir", "dirpath"} & set(spec.get("init_args") or {}), (name, spec)


@pytest.mark.parametrize("name", CONFIGS)
def test_print_config_round_trips(name, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        make_cli(["fit", "--config", name, "--print_config"])
    assert exit_.value.code in (0, None)
    first = capsys.readouterr().out
    resolved = yaml.safe_load(first)
    assert issubclass(recipe_of(resolved["model"]["class_path"]), FinetuneModule)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(first)
    with pytest.raises(SystemExit):
        make_cli(["fit", "--config", str(dumped), "--print_config"])
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("name", CONFIGS)
def test_runs_two_steps_shrunk(name, tmp_path):
    """check_config: parses, round-trips --print_config, refuses a model built at construction, trains 2 steps."""
    result = lightning_tune.check_config(name, root=tmp_path)
    assert issubclass(recipe_of(result.resolved["model"]["class_path"]), FinetuneModule)
    assert result.trainer.global_step == 2
    assert result.model.model.config.num_layers == 1
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_check_config_names_the_file_and_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIG_DIR / "tiny_lora.yaml").read_text().replace("lora_rank: 16", "lora_rnk: 16"))
    with pytest.raises(ConfigCheckError, match=r"bad.yaml: .*lora_rnk"):
        lightning_tune.check_config(bad)
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "bad.yaml" in err and "lora_rnk" in err


def test_precedence_default_config_second_config_cli(tmp_path):
    """default < config < second config < command line, read from a real run's saved config."""
    second = tmp_path / "second.yaml"
    second.write_text("model:\n  init_args:\n    lr: 0.5\n    warmup_steps: 7\ndata:\n  batch_size: 3\n")
    run_dir = tmp_path / "run"
    code = main(["fit", "--config", "tiny_lora.yaml", "--config", str(second), *SHRINK, "--trainer.logger=true", f"--trainer.default_root_dir={run_dir}", "--model.init_args.warmup_steps=11"])
    assert code == 0
    saved = yaml.safe_load(next(run_dir.rglob("config.yaml")).read_text())
    init = saved["model"]["init_args"]
    assert init["lora_rank"] == 16  # from tiny_lora.yaml (default 8)
    assert init["lr"] == 0.5  # second config beats the first (3e-3)
    assert init["warmup_steps"] == 11  # command line beats both
    assert init["weight_decay"] == 0.01  # the __init__ default
    assert saved["data"]["batch_size"] == 2  # SHRINK's --data.batch_size comes after the configs
    assert "tokenizer_path" not in init and "max_seq_len" not in init  # linked from data: one place


def test_bundled_name_resolves_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the bundled copy is used
    with pytest.raises(SystemExit):
        main(["fit", "--config", "tiny_lora", "--print_config"])
    assert "lightning_tune.LoRAFinetune" in capsys.readouterr().out


def test_default_root_dir_moves_logs_checkpoints_and_exports(tmp_path, monkeypatch):
    """One value, one place: tiny_lora.yaml names its run directory once; --trainer.default_root_dir
    moves the logs, the checkpoints and the exports (the README's out/<run>/ layout) together."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    root = tmp_path / "elsewhere"
    tiny = "--model.init_args.model_args={vocab_size: 512, num_layers: 1, num_heads: 4, num_kv_heads: 2, embed_dim: 32, intermediate_dim: 64}"
    code = main(
        [
            "fit",
            "--config",
            "tiny_lora.yaml",
            tiny,
            "--data.max_seq_len=64",
            "--data.batch_size=2",
            "--data.val_size=0",
            "--trainer.limit_val_batches=0",
            "--trainer.val_check_interval=null",
            "--trainer.max_steps=2",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
            "--trainer.callbacks.init_args.every_n_train_steps=1",
        ]
    )
    assert code == 0
    assert (root / "logs" / "version_0" / "metrics.csv").is_file()
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert (root / "adapter" / "adapter_config.json").is_file() and (root / "merged" / "model.safetensors").is_file()
    assert not any(cwd.iterdir()), "nothing may land in the working directory (the config's out/tiny_lora)"
    saved = yaml.safe_load((root / "logs" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == str(root)  # the saved config says where things went
    assert saved["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(root / "checkpoints")
