"""The command line: fast verbs without torch, bundled configs, one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from lightning_tune.cli import condense_parse_error, main

TINY_FIT = ["fit", "--config", "tiny_lora.yaml", "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"]


def run_module(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_tune", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("verb", [["--help"], ["ls"]])
def test_light_verbs_do_not_import_torch_or_lightning(verb):
    code = f"import sys; from lightning_tune.cli import main; main({verb!r}); heavy = [m for m in ('torch', 'lightning') if m in sys.modules]; assert not heavy, heavy"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_help_and_ls_list_what_exists(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fit" in out and "generate" in out and "cp NAME DEST" in out
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "LoRAFinetune" in out and "FullFinetune" in out and "tiny_lora.yaml" in out and "alpaca_llama2_70b_lora.yaml" in out


def test_cp_copies_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["cp", "alpaca_llama2_lora", str(tmp_path)]) == 0
    copied = tmp_path / "alpaca_llama2_lora.yaml"
    assert copied.read_text().startswith("# Llama 2 7B")
    assert main(["cp", "alpaca_llama2_lora.yaml", str(copied)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["cp", "no_such_config", str(tmp_path)]) == 2
    assert "no bundled config" in capsys.readouterr().err


BAD_OVERRIDES = [
    ("--model.lora_rnk=3", "Option 'lora_rnk' is not accepted"),  # unknown key
    ("--model.lora_rank=abc", "model.lora_rank: Expected a <class 'int'>. Got value: abc"),  # wrong type
    ("--data.template=alpacca", "unknown prompt template 'alpacca'; choose one of: alpaca, none"),  # invalid choice
    ("--model.lora_rank=0", "lora_rank: must be a positive integer, got 0"),
    ("--data.tokenizer_path=/no/such/tokenizer.model", "tokenizer_path: tokenizer file '/no/such/tokenizer.model' does not exist"),
    ("--trainer.max_stepz=3", "unrecognized arguments: --trainer.max_stepz"),
]

# One interpreter runs every case through main(), capturing stderr per case (a subprocess per
# case would pay Lightning's import each time; in-process, pytest's capture fights Lightning's loggers).
CASES_SCRIPT = """
import contextlib, io, json, sys
from lightning_tune.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_bad_configuration_is_one_line_exit_2_nothing_written(tmp_path):
    cases = [[*TINY_FIT, override, f"--trainer.default_root_dir={tmp_path / str(i)}"] for i, (override, _) in enumerate(BAD_OVERRIDES)]
    result = subprocess.run([sys.executable, "-c", CASES_SCRIPT, json.dumps(cases)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for (override, expected), (code, err) in zip(BAD_OVERRIDES, json.loads(result.stdout.splitlines()[-1])):
        lines = [line for line in err.splitlines() if line.strip() and line != "Seed set to 42"]
        assert code == 2, (override, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (override, lines)
        assert expected in lines[0], (override, lines[0])
    assert not any(tmp_path.iterdir()), "a rejected configuration must write nothing"


def test_missing_checkpoint_dir_in_a_subprocess(tmp_path):
    """The real entry point: exit code 2, one line, no traceback, no output directory."""
    result = run_module("fit", "--config", "tiny_lora.yaml", "--model.checkpoint_dir=/no/ckpt", "--model.model_args=null", f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: checkpoint_dir: checkpoint directory '/no/ckpt' does not exist" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_verb_and_missing_config(capsys):
    assert main(["tune"]) == 2
    assert "unknown verb 'tune'" in capsys.readouterr().err
    assert main(["fit", "--config", "nope.yaml"]) == 2
    assert "--config: no file 'nope.yaml' and no bundled config" in capsys.readouterr().err


def test_condense_parse_error_keeps_the_informative_line():
    message = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'FinetuneModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lightning_tune.LoRAFinetune':
        Parser key "lora_rank":
          Expected a <class 'int'>. Got value: abc
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>"""
    assert condense_parse_error(message) == "model.lora_rank: Expected a <class 'int'>. Got value: abc"


def test_data_verb_shows_masked_samples(capsys):
    assert main(["data", "--config", "tiny_lora.yaml", "--n", "1", "--data.max_seq_len=100"]) == 0
    out = capsys.readouterr().out
    assert "[[<s>Below is an instruction" in out and "### Response:\n]]" in out and "</s>" in out


def test_generate_argument_errors(tmp_path, capsys):
    assert main(["generate", "--checkpoint_dir", str(tmp_path)]) == 2
    assert "give --prompt TEXT" in capsys.readouterr().err
    assert main(["generate", "--checkpoint_dir", str(tmp_path), "--prompt", "  "]) == 2
    assert "prompt 0 is empty" in capsys.readouterr().err
    assert main(["generate", "--checkpoint_dir", str(tmp_path / "missing"), "--prompt", "hi", "--tokenizer_path", str(tmp_path / "t.model")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_ls_and_config_names_reach_user_folders_and_installed_packages(tmp_path):
    """`ls` derives recipes from the classes (bundled subclasses of FinetuneModule, and entry points of
    installed packages) and lists every config folder; `--config NAME` (here through `cp`) searches
    LIGHTNING_TUNE_CONFIG_PATH and the packages' folders; all without importing torch."""
    site = tmp_path / "site"
    (site / "my_pkg" / "configs").mkdir(parents=True)
    (site / "my_pkg" / "__init__.py").write_text("")
    (site / "my_pkg" / "configs" / "__init__.py").write_text("raise RuntimeError('ls must not run the configs package')\n")
    (site / "my_pkg" / "configs" / "pkg_run.yaml").write_text("# a packaged config\nmodel: {}\n")
    dist = site / "my_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lightning_tune.recipes]\nMyRecipe = my_pkg.recipes:MyRecipe\n\n[lightning_tune.configs]\nmy_pkg = my_pkg.configs\n")
    user = tmp_path / "user_configs"
    user.mkdir()
    (user / "mine.yaml").write_text("# my own config\ntrainer: {}\n")
    code = (
        "import sys; from lightning_tune.cli import main\n"
        f"assert main(['ls']) == 0\n"
        f"assert main(['cp', 'mine', {str(tmp_path / 'a.yaml')!r}]) == 0\n"
        f"assert main(['cp', 'pkg_run.yaml', {str(tmp_path / 'b.yaml')!r}]) == 0\n"
        "heavy = [m for m in ('torch', 'lightning') if m in sys.modules]; assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "LIGHTNING_TUNE_CONFIG_PATH": os.pathsep.join([str(user), str(tmp_path / "absent")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "LoRAFinetune" in out and "FullFinetune" in out and "FinetuneModule " not in out  # the base is not a recipe
    assert "MyRecipe" in out and "my_pkg.recipes.MyRecipe" in out and "from my-pkg" in out
    assert f"LIGHTNING_TUNE_CONFIG_PATH configs ({user}):" in out and "mine.yaml" in out and "my own config" in out
    assert "pkg_run.yaml" in out and "tiny_lora.yaml" in out
    assert (tmp_path / "a.yaml").read_text().startswith("# my own config") and (tmp_path / "b.yaml").read_text().startswith("# a packaged config")


def run_cases(cases: list[list[str]]) -> list[tuple[int, list[str]]]:
    """(exit code, non-empty stderr lines) of main(args) for each case, in one interpreter, in order."""
    result = subprocess.run([sys.executable, "-c", CASES_SCRIPT, json.dumps(cases)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return [(code, [line for line in err.splitlines() if line.strip() and line != "Seed set to 42"]) for code, err in json.loads(result.stdout.splitlines()[-1])]


class Payload:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_inputs_are_one_line_exit_2_nothing_written(tmp_path):
    """Issue 14's command-line cases: each one `error:` line naming the file, key or value; exit 2;
    no run directory; the malicious checkpoint's payload never runs."""
    import torch

    random_bytes = tmp_path / "random.ckpt"
    random_bytes.write_bytes(bytes(range(256)) * 8)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Payload(marker)}}, evil)
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("trainer:\n  max_steps: 3\n model: [\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- trainer\n- model\n")
    unknown = {section: tmp_path / f"unknown_{section}.yaml" for section in ("top", "data", "trainer", "model")}
    unknown["top"].write_text("bogus_top: 1\n")
    for section in ("data", "trainer", "model"):
        unknown[section].write_text(f"{section}:\n  no_such_{section}_key: 1\n" if section != "model" else "model:\n  init_args:\n    no_such_model_key: 1\n")
    gpu = torch.cuda.is_available()
    cases = [
        ([*TINY_FIT, f"--ckpt_path={random_bytes}"], f"--ckpt_path: {random_bytes} is not a torch checkpoint"),
        ([*TINY_FIT, f"--ckpt_path={evil}"], f"--ckpt_path: {evil}: refused: it holds Python objects other than tensors"),
        ([*TINY_FIT, f"--ckpt_path={tmp_path / 'absent.ckpt'}"], f"--ckpt_path: {tmp_path / 'absent.ckpt'} does not exist"),
        (["fit", "--config", str(syntax)], f"--config: {syntax} line 3, column 2: invalid YAML"),
        (["fit", "--config", str(empty)], f"--config: {empty} is empty"),
        (["validate", "--config", str(listed)], f"--config: {listed} holds a list"),
        # an unknown key in a config file (jsonargparse raises a KeyError there, not its parse error): one line naming it
        ([*TINY_FIT, "--config", str(unknown["top"])], "does not accept option 'bogus_top': a key no parameter has"),
        ([*TINY_FIT, "--config", str(unknown["data"])], "does not accept option 'data.no_such_data_key': a key no parameter has"),
        ([*TINY_FIT, "--config", str(unknown["trainer"])], "does not accept option 'trainer.no_such_trainer_key': a key no parameter has"),
        ([*TINY_FIT, "--config", str(unknown["model"])], "no_such_model_key"),
        (["data", "--config", "tiny_lora.yaml", "--config", str(unknown["data"])], "does not accept option 'no_such_data_key': a key no parameter has"),
        (["generate", "--checkpoint_dir", str(tmp_path / "no_such_dir"), "--prompt", "hi"], f"--checkpoint_dir: {tmp_path / 'no_such_dir'} is not a directory"),
        (["generate", "--checkpoint_dir", str(tmp_path), "--prompt", "hi", "--max_new_tokens", "abc"], "max_new_tokens: Expected a <class 'int'>. Got value: abc"),
        (["export", "--ckpt_path", str(evil), "--format", "onnx", "--output", str(tmp_path / "out")], "format: Expected a typing.Literal"),
    ]
    if not gpu:  # on a machine without a GPU PyTorch can use
        cases += [
            ([*TINY_FIT, "--trainer.accelerator=cuda"], "trainer.accelerator: `CUDAAccelerator` can not run on your system"),
            (["generate", "--checkpoint_dir", str(tmp_path), "--prompt", "hi", "--device", "cuda"], "--device: cuda asked for, but this machine has no GPU"),
        ]
    roots = [tmp_path / f"run{i}" for i in range(len(cases))]
    argvs = [args + ([f"--trainer.default_root_dir={root}"] if args[0] == "fit" and "--config" in args and args[2] == "tiny_lora.yaml" else []) for (args, _), root in zip(cases, roots)]
    for (args, expected), (code, lines) in zip(cases, run_cases(argvs)):
        assert code == 2, (args, lines)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, lines)
        assert expected in lines[0], (args, lines[0])
    assert not marker.exists(), "the pickle's payload ran"
    assert not any(root.exists() for root in roots) and not (tmp_path / "out").exists(), "a refused command must write nothing"


def test_resume_does_not_let_the_checkpoint_override_the_command_line(tmp_path):
    """Bug 3: `fit --model.lora_rank 8 --ckpt_path <rank-4 checkpoint>` used to train and export rank 4
    and save rank 4 in config.yaml (Lightning loaded the checkpoint's hyper-parameters over the parsed
    ones). The command line wins: the saved config says rank 8, and the run never trains rank 4 (the
    recipe refuses a checkpoint that does not fit)."""
    tiny = "--model.init_args.model_args={vocab_size: 512, num_layers: 1, num_heads: 4, num_kv_heads: 2, embed_dim: 32, intermediate_dim: 64}"
    common = [
        "fit",
        "--config",
        "tiny_lora.yaml",
        tiny,
        "--data.max_seq_len=64",
        "--data.batch_size=2",
        "--data.val_size=0",
        "--trainer.limit_val_batches=0",
        "--trainer.val_check_interval=null",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks.init_args.every_n_train_steps=1",
    ]
    first, second = tmp_path / "rank4", tmp_path / "rank8"
    runs = run_cases(
        [
            [*common, "--model.init_args.lora_rank=4", "--trainer.max_steps=2", f"--trainer.default_root_dir={first}"],
            [*common, "--model.init_args.lora_rank=8", "--trainer.max_steps=4", f"--trainer.default_root_dir={second}", f"--ckpt_path={first / 'checkpoints' / 'last.ckpt'}"],
        ]
    )
    assert runs[0][0] == 0, runs[0]
    code, lines = runs[1]
    for saved in second.rglob("config.yaml"):
        assert yaml.safe_load(saved.read_text())["model"]["init_args"]["lora_rank"] == 8
    adapter = second / "adapter" / "adapter_config.json"
    assert not (adapter.exists() and json.loads(adapter.read_text())["r"] == 4), "the run silently trained the checkpoint's rank"
    if code == 0:  # accepted: then it trained what the command line says
        assert json.loads(adapter.read_text())["r"] == 8
    else:  # refused: one error line (after the data module's truncation note) that names the differing key
        errors = [line for line in lines if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and "lora_rank" in errors[0] and not any("Traceback" in line for line in lines), lines


def test_debug_environment_variable_shows_the_traceback(monkeypatch, capsys):
    """LIGHTNING_TUNE_DEBUG=1: the same mistake raises (a traceback) instead of one line and exit 2."""
    from lightning_tune.cli import UsageError

    assert main(["cp", "no_such_config", "."]) == 2
    assert capsys.readouterr().err.startswith("error: --config: no file 'no_such_config'")
    monkeypatch.setenv("LIGHTNING_TUNE_DEBUG", "1")
    with pytest.raises(UsageError, match="no bundled config of that name"):
        main(["cp", "no_such_config", "."])


@pytest.mark.parametrize(
    ("config", "tokenizer_key"),
    [("chat_smollm2_135m_lora.yaml", "data.init_args.tokenizer_path"), ("alpaca_qwen3_8b_lora.yaml", "data.tokenizer_path")],
    ids=["data-class", "plain-data"],
)
def test_tokenizer_path_defaults_to_the_checkpoint(config, tokenizer_key, tmp_path):
    """data.tokenizer_path left out = model.checkpoint_dir (one value, one place); a value given wins;
    no checkpoint_dir, or one without a tokenizer, leaves it unset (then only source demo may do
    without, DataError otherwise)."""
    from lightning_tune.cli import make_cli

    def parsed(*overrides):
        return make_cli(["--config", config, *overrides], run=False, instantiate=False).config

    resolved = parsed()
    assert resolved[tokenizer_key] == resolved["model.init_args.checkpoint_dir"]
    from lightning_tune.cli.parser import print_config

    printed = yaml.safe_load(print_config(["--config", config]))  # --print_config shows the values the run uses
    section = printed["data"].get("init_args", printed["data"])
    assert section["tokenizer_path"] == printed["model"]["init_args"]["checkpoint_dir"]
    assert printed["trainer"]["logger"]["init_args"]["save_dir"] == printed["trainer"]["default_root_dir"]
    assert parsed(f"--{tokenizer_key}={tmp_path / 'tokenizer.json'}")[tokenizer_key] == str(tmp_path / "tokenizer.json")
    later = tmp_path / "not-downloaded-yet"  # filled: validate then names the one missing path, checkpoint_dir
    assert parsed(f"--model.init_args.checkpoint_dir={later}")[tokenizer_key] == str(later)  # the command line's checkpoint
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    assert parsed(f"--model.init_args.checkpoint_dir={tmp_path / 'hf'}")[tokenizer_key] == str(tmp_path / "hf")
    assert parsed("--model.init_args.checkpoint_dir=null")[tokenizer_key] is None
    (tmp_path / "bare").mkdir()  # a checkpoint without a tokenizer: left unset (source demo: the demo tokenizer)
    assert parsed(f"--model.init_args.checkpoint_dir={tmp_path / 'bare'}")[tokenizer_key] is None


def test_no_silent_wrong_runs(tmp_path):
    """#30 item 5, each exit 0 before: instruction data whose max_seq_len leaves no trained token is refused
    (as chat and preference data are); `--ckpt_path last` with nothing to resume says so in one line; a new
    run into a finished run's folder is refused instead of replacing its merged/ (resuming it is not)."""
    tiny = "--model.init_args.model_args={vocab_size: 512, num_layers: 1, num_heads: 2, num_kv_heads: 2, embed_dim: 16, intermediate_dim: 32}"
    run = tmp_path / "run"
    quick = [
        tiny,
        "--data.batch_size=2",
        "--data.val_size=0",
        "--trainer.limit_val_batches=0",
        "--trainer.val_check_interval=null",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={run}",
    ]
    cases = [
        [*TINY_FIT, "--data.max_seq_len=30", f"--trainer.default_root_dir={tmp_path / 'short_instruct'}"],
        ["fit", "--config", "tiny_chat.yaml", "--data.init_args.max_seq_len=8", "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path / 'short_chat'}"],
        ["fit", "--config", "tiny_dpo.yaml", "--data.init_args.max_seq_len=8", "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path / 'short_dpo'}"],
        [*TINY_FIT, *quick, "--data.max_seq_len=64", "--ckpt_path=last"],  # nothing to resume yet: one line, then a new run
        [*TINY_FIT, *quick, "--data.max_seq_len=64"],  # a new run into the finished one: refused
        [*TINY_FIT, *quick, "--data.max_seq_len=64", "--ckpt_path=last"],  # resuming the finished run: allowed
    ]
    (short_instruct, short_chat, short_dpo, fresh, again, resumed) = run_cases(cases)
    for (code, lines), expected in ((short_instruct, "max_seq_len=30"), (short_chat, "max_seq_len=8"), (short_dpo, "max_seq_len=8")):
        errors = [line for line in lines if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and expected in errors[0] and ("no sample has a trained token" in errors[0] or "leaving nothing of" in errors[0]), lines
    assert not any((tmp_path / name).exists() for name in ("short_instruct", "short_chat", "short_dpo"))
    code, lines = fresh
    assert code == 0 and f"fit: --ckpt_path last: no last checkpoint in {run / 'checkpoints'} to resume; starting a new run" in lines, lines
    assert not any("no last checkpoint available" in line for line in lines)  # Lightning's own multi-line warning: replaced
    assert not [line for line in lines if any(noise in line for noise in ("litlogger", "LeafSpec", "set_vital"))], lines  # item 6: filtered
    merged = {p.name: p.read_bytes() for p in (run / "merged").iterdir()}
    code, lines = again
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "holds a finished run's adapter/ and merged/" in errors[0], lines
    assert {p.name: p.read_bytes() for p in (run / "merged").iterdir()} == merged
    assert resumed[0] == 0, resumed


def test_known_third_party_noise_is_filtered_and_nothing_else(caplog):
    """#30 item 6: exactly the messages `cli/noise.py` lists are dropped, as the entry point installs them;
    a different message from the same logger, or the same text as another warning category, still shows."""
    import logging
    import warnings

    from lightning_tune.cli.noise import LOG_LINES, WARNINGS, filter_known_noise

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filter_known_noise()
        for start, category in WARNINGS:
            warnings.warn(start + " (the rest of the message)", category, stacklevel=1)
            warnings.warn("an unrelated " + category.__name__, category, stacklevel=1)
            warnings.warn(start, DeprecationWarning, stacklevel=1)  # another category: not ours to hide
    assert sorted(str(w.message) for w in seen) == sorted([*(f"an unrelated {c.__name__}" for _, c in WARNINGS), *(s for s, _ in WARNINGS)])
    caplog.set_level(logging.INFO)
    for name, starts in LOG_LINES.items():
        for start in starts:
            logging.getLogger(name).warning(start + " and the rest")
        logging.getLogger(name).warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"] * len(LOG_LINES)


def test_every_verb_has_help_with_its_options(capsys):
    """#30 item 8: `ls --help` and `cp --help` exited 2; data, validate and check-config listed no options;
    generate --help printed each parameter's doc twice (in the description and in its option)."""
    for verb in ("ls", "cp", "data", "validate", "check-config"):
        assert main([verb, "--help"]) == 0, verb
        out = capsys.readouterr().out
        assert out.startswith("usage: python -m lightning_tune " + verb), verb
        if verb not in ("ls", "cp"):
            assert "--KEY VALUE" in out and "--model.help" in out, verb
    assert "--n N" in (main(["data", "--help"]), capsys.readouterr().out)[1]
    for verb in ("generate", "chat", "eval", "export"):
        with pytest.raises(SystemExit) as exit:
            main([verb, "--help"])
        assert exit.value.code == 0
        out = capsys.readouterr().out
        assert "Args:" not in out and out.count("Random seed") <= 1 and out.count("Tensor type") + out.count("type of the 2-D weights") <= 1, verb


def test_misspelt_keys_and_classes_get_a_close_match(capsys):
    """#30 item 8: "did you mean" for a key or class name one edit away, in the same one error line."""
    from lightning_tune.cli.suggest import did_you_mean

    assert did_you_mean("model: Option 'lora_rnak' is not accepted") == "; did you mean lora_rank?"
    assert did_you_mean("unrecognized arguments: --trainer.max_stepz 3") == "; did you mean trainer.max_steps?"
    assert did_you_mean("unrecognized arguments: --data.max_seq_lne 4") == "; did you mean data.max_seq_len?"
    assert did_you_mean("model: Expected a path but LoraFinetune either not accessible or invalid") == "; did you mean lightning_tune.LoRAFinetune?"
    assert did_you_mean("model: Option 'zzzz' is not accepted") == ""  # nothing close: no guess
    assert did_you_mean("lr: must be > 0, got -1") == ""
    assert main(["validate", "--config", "tiny_lora.yaml", "--model.lora_rnak", "4"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["error: model: Option 'lora_rnak' is not accepted; did you mean lora_rank?"], lines
