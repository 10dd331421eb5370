"""The README, run as a new user types it (#30): its shell and Python blocks, in order, in a fresh folder.

Which shell lines run (the same rule for the walkthrough and the checks): every line of every ```bash
block, in order, except a line that
  - installs packages (`pip ...`: the test runs in the environment the suite is installed in),
  - runs the test suite (`python -m pytest`),
  - downloads (`download`: the network and an HF token),
  - launches on a cluster (`srun`) or asks for more than one device (`--trainer.devices N`, N > 1: GPUs),
  - names a config whose `model.checkpoint_dir` is not there (weights that `download` fetches), or a
    `pkg://PACKAGE/...` path whose package is not installed,
  - uses a file or folder that only a skipped line creates.
```python blocks run after the shell lines before them, in the same folder; ```toml blocks are not run.

The walkthrough trains every CPU demo (a few minutes each on 2 cores), so it is marked `readme` (and
`slow`) and left out of the default run by pyproject.toml's addopts; run it with
`python -m pytest -m readme tests/test_readme.py` (LIGHTNING_TUNE_README_STEPS=5 caps every fit at 5 steps:
the same sequence of commands in a few minutes). The default suite checks, in seconds, that every
README command parses and that every path a command reads is made by an earlier command.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGS = ROOT / "lightning_tune" / "configs"
PREFIX = ["python", "-m", "lightning_tune"]
# The arguments that name a path a command reads.
READS = ("--checkpoint_dir", "--ckpt_path", "--prompts_file", "--adapter_dir", "--tokenizer_path")


@dataclass
class Block:
    lang: str
    text: str


def blocks() -> list[Block]:
    """The README's fenced blocks, in order."""
    return [Block(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)]


def shell_lines() -> list[str]:
    """Every command of the bash blocks, in order, comments and blank lines left out."""
    lines = []
    for block in blocks():
        if block.lang == "bash":
            for line in block.text.splitlines():
                assert not line.rstrip().endswith("\\"), f"README: one command per line, got a continuation: {line}"
                if line.strip() and not line.lstrip().startswith("#"):
                    lines.append(line.strip())
    return lines


def words(line: str) -> list[str]:
    """The command's words, without a trailing comment and before any redirection."""
    return shlex.split(line, comments=True)


def ours(line: str) -> list[str] | None:
    """`python -m lightning_tune ...` of a line (after `echo ... |` or `srun`), as its arguments after the prefix."""
    parts = words(line)
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == PREFIX:
            rest = parts[i + 3 :]
            return rest[: rest.index("|")] if "|" in rest else rest
    return None


def option(args: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` (the last one given)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def config_of(args: list[str], folder: Path) -> dict:
    """The YAML of `--config NAME` as `fit` finds it (a file in `folder`, else a bundled one)."""
    name = option(args, "--config")
    if name is None:
        return {}
    for path in (folder / name, CONFIGS / name, CONFIGS / f"{name}.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {}


def run_root(args: list[str], folder: Path) -> str | None:
    """Where a fit writes (its default_root_dir)."""
    return option(args, "--trainer.default_root_dir") or (config_of(args, folder).get("trainer") or {}).get("default_root_dir")


def creates(line: str, folder: Path) -> list[str]:
    """The paths a line makes: a fit's run folder, an export's output, a download's folder, a copy, a redirect."""
    parts = words(line)
    made = [parts[parts.index(">") + 1]] if ">" in parts else []
    args = ours(line)
    if args is None:
        return made
    verb = args[0]
    if verb == "fit":
        made.append(run_root(args, folder))
    elif verb == "export":
        output = option(args, "--output")
        made += [output, str(Path(output).parent / "Modelfile")] if output.endswith(".gguf") else [output]
    elif verb == "download":
        made.append(option(args, "--output_dir") or f"checkpoints/{args[1]}")
    elif verb == "cp":
        made.append(str(Path(args[2]) / Path(args[1]).name) if args[2] in (".", "./") else args[2])
    return [m for m in made if m]


def reads(line: str, folder: Path) -> list[str]:
    """The paths a line needs: the READS arguments and its config's checkpoint_dir (pkg:// paths included)."""
    args = ours(line)
    if args is None:
        return []
    needed = [value for name in READS if (value := option(args, name)) is not None and value not in ("last", "best")]
    model = config_of(args, folder).get("model") or {}
    checkpoint_dir = (model.get("init_args") or model).get("checkpoint_dir")
    if args[0] in ("fit", "validate", "test", "data") and checkpoint_dir:
        needed.append(checkpoint_dir)
    return needed


def made_by(path: str, made: list[str]) -> bool:
    """Whether `path` is one of `made` or inside one of them."""
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in made)


def installed_by(path: str, lines: list[str]) -> bool:
    """A pkg://PACKAGE/... path whose package an earlier `pip install` line installs."""
    package = path.removeprefix("pkg://").split("/")[0]
    return any(line.startswith("pip ") and re.search(rf"\b{package.replace('_', '[-_]')}\b", line) for line in lines)


def skip_reason(line: str, folder: Path, skipped_made: list[str], made: list[str]) -> str | None:
    """Why the walkthrough does not run `line` (the module docstring's rule), or None."""
    parts = words(line)
    args = ours(line) or []
    if parts[0] == "pip":
        return "installs packages"
    if parts[:3] == ["python", "-m", "pytest"]:
        return "runs the test suite"
    if parts[0] == "srun":
        return "launches on a SLURM cluster"
    if args and args[0] == "download":
        return "downloads (network, HF token)"
    devices = option(args, "--trainer.devices")
    if devices is not None and devices.isdigit() and int(devices) > 1:
        return f"asks for {devices} devices (GPUs)"
    for path in reads(line, folder):
        if path.startswith("pkg://"):
            if importlib.util.find_spec(path.removeprefix("pkg://").split("/")[0]) is None:
                return f"needs {path}'s package installed"
        elif made_by(path, skipped_made) and not made_by(path, made):
            return f"reads {path}, made by a skipped line"
        elif not (folder / path).exists() and not made_by(path, made):
            return f"needs {path} (downloaded weights)"
    return None


# ---- the fast checks (default suite) ---------------------------------------------------------------


def test_every_path_a_command_reads_is_made_by_an_earlier_command() -> None:
    """#30 item 2: "After the demo" read out/tiny_full/merged, which only a fit the README never asked for made."""
    lines = shell_lines()
    made: list[str] = []
    for index, line in enumerate(lines):
        for path in reads(line, ROOT):
            ok = made_by(path, made) or (path.startswith("pkg://") and installed_by(path, lines[:index]))
            assert ok, f"README: {line!r} reads {path}, which no earlier command makes"
        made += creates(line, ROOT)


def test_the_pip_lines_name_only_this_checkout_and_real_packages() -> None:
    """#30 item 3: `pip install "lightning_tune[eval]"` installs PyPI's lightning-tune, another project."""
    text = README.read_text(encoding="utf-8")
    assert not re.search(r"pip install [\"']?lightning[-_]tune", text)
    for line in shell_lines():
        if line.startswith("pip install") and "-e" in words(line):
            assert words(line)[-1].startswith(".[") or words(line)[-1] == ".", line


def test_every_command_parses(monkeypatch, tmp_path, capsys) -> None:
    """Each `python -m lightning_tune ...` line of the README, parsed by its verb as it would run (recipe
    verbs: their whole config through `--print_config`; the others: their parser, the work replaced)."""
    import lightning_tune.checkpoint.download
    import lightning_tune.cli.chat
    import lightning_tune.cli.eval
    import lightning_tune.cli.export
    import lightning_tune.cli.generate
    from lightning_tune.cli import main
    from lightning_tune.cli.parser import print_config

    called = []

    def recorder(function):
        @functools.wraps(function)  # the same signature and docstring: the verb's parser is built from them
        def record(*args, **kwargs):
            called.append(kwargs)
            return [] if function.__name__ == "download" else 0  # download's files; chat's exit code

        return record

    for module, name in (
        (lightning_tune.cli.generate, "generate_command"),
        (lightning_tune.cli.chat, "chat_command"),
        (lightning_tune.cli.eval, "eval_command"),
        (lightning_tune.cli.export, "export"),
        (lightning_tune.checkpoint.download, "download"),
    ):
        monkeypatch.setattr(module, name, recorder(getattr(module, name)))
    monkeypatch.chdir(tmp_path)
    for line in shell_lines():
        args = ours(line)
        if args is None:
            continue
        verb, rest = args[0], args[1:]
        if verb in ("fit", "test", "validate", "data"):
            rest = [a for i, a in enumerate(rest) if a not in ("--ckpt_path", "--n") and (i == 0 or rest[i - 1] not in ("--ckpt_path", "--n"))]
            assert print_config(rest).startswith("#") or "trainer:" in print_config(rest), line
        else:
            before = len(called)
            assert main(args) == 0, (line, capsys.readouterr().err)
            assert verb in ("ls", "cp", "import-config") or len(called) == before + 1, line
    capsys.readouterr()


# ---- the walkthrough (-m readme) -------------------------------------------------------------------


@pytest.mark.readme
@pytest.mark.slow
def test_the_readme_runs_in_order_in_a_fresh_folder(tmp_path) -> None:
    """Every CPU command and Python block of the README, in order, in an empty folder; each must exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_TUNE_CONFIG_PATH"}
    steps = os.environ.get("LIGHTNING_TUNE_README_STEPS")  # e.g. 5: every fit stops there (checks the sequence, not what training learns)
    made: list[str] = []
    skipped_made: list[str] = []
    report = []
    for block in blocks():
        if block.lang == "python":
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-c", block.text], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
            report.append(f"{time.perf_counter() - start:6.0f} s  python block {block.text.splitlines()[0]!r}")
            assert result.returncode == 0, f"README python block failed:\n{block.text}\n{result.stderr[-3000:]}"
            continue
        if block.lang != "bash":
            continue
        for line in (line.strip() for line in block.text.splitlines()):
            if not line or line.startswith("#"):
                continue
            reason = skip_reason(line, tmp_path, skipped_made, made)
            if reason is not None:
                skipped_made += creates(line, tmp_path)
                report.append(f"  skip    {line}  ({reason})")
                continue
            if steps and ours(line) and ours(line)[0] == "fit":  # the quick walkthrough: the same commands, shorter runs
                command, hash_, comment = line.partition(" #")  # after the --config (a later value wins), before a comment
                line = f"{command.rstrip()} --trainer.max_steps={steps}" + (f"  #{comment}" if hash_ else "")
            start = time.perf_counter()
            result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
            report.append(f"{time.perf_counter() - start:6.0f} s  {line}")
            assert result.returncode == 0, f"README line failed: {line}\n{result.stderr[-3000:]}"
            assert "Traceback" not in result.stderr, (line, result.stderr[-3000:])
            made += creates(line, tmp_path)
    print("\n".join(report))
    assert not (tmp_path / "lightning_logs").exists() and not (tmp_path / "adapter").exists(), "a README block wrote into the current folder"
