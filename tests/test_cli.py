"""The command line: fast verbs without torch, bundled configs, one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

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
    - Problem with given class_path 'lightning_tune.modules.LoRAFinetune':
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
