"""`download`: which files are fetched, and one clear line (exit 1) for every Hub failure; never online.

Errors are the hub's own classes, made by the hub's own `hf_raise_for_status` from responses shaped
like the Hub's (status + X-Error-Code header), so the test follows the hub if it renames things.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import hf_raise_for_status

from lightning_tune.checkpoint.download import select_files
from lightning_tune.cli import main


def download_command(argv: list[str]) -> int:
    """The `download` verb through the CLI's entry point (its error policy included)."""
    return main(["download", *argv])


HF_7B_FILES = [
    ".gitattributes",
    "LICENSE.txt",
    "README.md",
    "Responsible-Use-Guide.pdf",
    "USE_POLICY.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
]
META_7B_FILES = ["LICENSE.txt", "README.md", "checklist.chk", "consolidated.00.pth", "params.json", "tokenizer.model"]


def hub_error(status: int, error_code: str | None = None) -> Exception:
    """The exception the hub raises for a response with this status and X-Error-Code."""
    import httpx2  # the hub's HTTP client in this version

    headers = {"X-Error-Code": error_code} if error_code else {}
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", "https://huggingface.co/api/models/x/y"))
    try:
        hf_raise_for_status(response)
    except Exception as err:  # noqa: BLE001 (the point is which class the hub picks)
        return err
    raise AssertionError("hf_raise_for_status did not raise")


def test_select_files_prefers_safetensors_and_skips_the_rest():
    assert select_files(HF_7B_FILES) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.model",
    ]


def test_select_files_bin_then_meta():
    bin_only = [f for f in HF_7B_FILES if not f.startswith("model")]
    assert select_files(bin_only) == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.model",
    ]
    assert select_files(META_7B_FILES) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    # Copies in sub-folders (e.g. original/) are not fetched twice.
    assert "original/consolidated.00.pth" not in select_files(HF_7B_FILES + ["original/consolidated.00.pth", "original/params.json"])


def fake_hub(monkeypatch, files=HF_7B_FILES, list_error=None, download_error=None) -> dict:
    """Replace the two hub calls; record what snapshot_download was asked for."""
    calls: dict = {}

    def list_repo_files(self, repo_id, revision=None, **kwargs):
        calls["token"] = self.token
        if list_error is not None:
            raise list_error
        return files

    def snapshot_download(repo_id, *, revision=None, local_dir=None, allow_patterns=None, token=None, **kwargs):
        if download_error is not None:
            raise download_error
        calls.update(repo_id=repo_id, local_dir=local_dir, allow_patterns=allow_patterns, token=token)
        for name in allow_patterns:
            path = Path(local_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        return local_dir

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_download_fetches_only_needed_files(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    calls = fake_hub(monkeypatch)
    out = tmp_path / "ckpt"
    assert download_command(["meta-llama/Llama-2-7b-hf", "--output_dir", str(out), "--hf_token", "hf_abc"]) == 0
    assert calls["allow_patterns"] == select_files(HF_7B_FILES)
    assert calls["token"] == "hf_abc" and calls["local_dir"] == str(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(select_files(HF_7B_FILES))
    stdout = capsys.readouterr().out
    assert "downloaded 6 files" in stdout and f"--model.init_args.checkpoint_dir {out}" in stdout


def test_token_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    calls = fake_hub(monkeypatch)
    assert download_command(["meta-llama/Llama-2-7b-hf", "--output_dir", str(tmp_path)]) == 0
    assert calls["token"] == "hf_from_env"


def test_default_output_dir_is_the_configs_path(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = fake_hub(monkeypatch)
    assert download_command(["meta-llama/Llama-2-7b-hf"]) == 0
    assert Path(calls["local_dir"]) == Path("checkpoints/meta-llama/Llama-2-7b-hf")


def test_a_named_size_downloads_its_repository(monkeypatch, tmp_path, capsys):
    from lightning_tune.families import SIZES

    monkeypatch.chdir(tmp_path)
    calls = fake_hub(monkeypatch)
    assert download_command(["llama2_7b"]) == 0
    assert calls["repo_id"] == SIZES["llama2_7b"].repo == "meta-llama/Llama-2-7b-hf"
    assert Path(calls["local_dir"]) == Path("checkpoints/meta-llama/Llama-2-7b-hf")
    own = next(name for name, size in SIZES.items() if size.repo is None)
    capsys.readouterr()
    for name, expected in ((own, "a size of our own with no Hub repository"), ("llama9_1b", "or a named size (llama2_7b, ")):
        assert download_command([name]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("where", "error", "token", "expected"),
    [
        ("download", lambda: hub_error(403, "GatedRepo"), None, "is gated and no Hugging Face token was found: accept its licence at https://huggingface.co/meta-llama/Llama-2-7b-hf"),
        ("download", lambda: hub_error(403, "GatedRepo"), "hf_abc", "is gated and your token has no access yet: request access at https://huggingface.co/meta-llama/Llama-2-7b-hf"),
        ("list", lambda: hub_error(404, "RepoNotFound"), "hf_abc", "meta-llama/Llama-2-7b-hf: no such repository on the Hugging Face Hub"),
        ("list", lambda: hub_error(401), None, "if it is private, pass --hf_token, set HF_TOKEN"),
        ("list", lambda: hub_error(404, "RevisionNotFound"), None, "no such revision; check --revision"),
        ("download", lambda: LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder"), None, "cannot reach the Hugging Face Hub"),
        ("list", lambda: __import__("httpx2").ConnectError("[Errno -3] Temporary failure in name resolution"), None, "cannot reach the Hugging Face Hub"),
        ("list", lambda: huggingface_hub.utils.OfflineModeIsEnabled("offline"), None, "HF_HUB_OFFLINE=1"),
    ],
)
def test_hub_failures_give_one_line_and_exit_1(monkeypatch, tmp_path, capsys, where, error, token, expected):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    err = error()
    fake_hub(monkeypatch, **{f"{where}_error": err})
    argv = ["meta-llama/Llama-2-7b-hf", "--output_dir", str(tmp_path / "out")] + (["--hf_token", token] if token else [])
    assert download_command(argv) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert expected in stderr
    assert not (tmp_path / "out").exists()


def test_gated_error_is_the_hub_class():
    """The table above relies on the hub mapping these responses to these classes."""
    assert isinstance(hub_error(403, "GatedRepo"), GatedRepoError)
    assert isinstance(hub_error(404, "RepoNotFound"), RepositoryNotFoundError)


def test_repository_without_usable_weights(monkeypatch, tmp_path, capsys):
    fake_hub(monkeypatch, files=["README.md", "config.json", "model.gguf"])
    assert download_command(["someone/gguf-only", "--output_dir", str(tmp_path)]) == 1
    assert "someone/gguf-only has no *.safetensors, *.bin or consolidated.*.pth weights" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["not-a-repo-id"], ["a/b", "--bogus", "1"]])
def test_usage_errors_exit_2(argv, capsys):
    code = None
    try:
        code = download_command(argv)
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    assert code == 2


def test_real_offline_mode_in_a_subprocess(tmp_path):
    """The hub itself, with HF_HUB_OFFLINE=1 (read at import), refuses the network: one line, exit 1."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": ""}
    code = "import sys; from lightning_tune.cli import main; sys.exit(main(['download', *sys.argv[1:]]))"
    proc = subprocess.run([sys.executable, "-c", code, "meta-llama/Llama-2-7b-hf", "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and "cannot reach the Hugging Face Hub" in lines[-1] and "HF_HUB_OFFLINE" in lines[-1]
    assert not (tmp_path / "out").exists()
