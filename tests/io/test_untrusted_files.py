"""Files someone hands you run no code (issue 29): a tokenizer folder's `auto_map`, a checkpoint's import
paths and a `pkg://` path neither import nor run anything, and `pkg://` stays inside its package.

Each "runs nothing" case plants code that would leave a marker file if it ran, and fails on the code before
these checks."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from hf_helpers import write_tiny_tokenizer

from lightning_tune.cli import main
from lightning_tune.io.paths import PackagePathError, resolve_path
from lightning_tune.tokenizer import TokenizerError, load_tokenizer

FIXTURE_CKPT = Path(__file__).resolve().parents[1] / "fixtures" / "before_relayout" / "last.ckpt"


def plant_module(root: Path, dotted: str, marker: Path) -> None:
    """A package (or module) on sys.path whose import writes `marker`."""
    parts = dotted.split(".")
    folder = root
    for part in parts:
        folder = folder / part
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran {part}')\n")


def test_tokenizer_with_auto_map_is_refused_and_its_code_never_runs(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    write_tiny_tokenizer(folder)
    marker = tmp_path / "ran"
    (folder / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: has auto_map .* never runs a checkpoint's code"):
        load_tokenizer(folder)
    # Through the CLI (the chat data module also asks transformers for its own tokenizer as a cross-check):
    # one line, exit 2, no prompt on stdout asking to run the code, and the code never ran.
    code = main(["data", "--config", "tiny_chat.yaml", "--data.tokenizer_path", str(folder), "--model.model_args", '{"vocab_size": 96}', "--n", "1"])
    out, err = capsys.readouterr()
    assert code == 2 and "auto_map" in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert "[y/N]" not in out and not marker.exists()


def test_an_import_path_in_a_checkpoint_is_not_imported(tmp_path: Path, monkeypatch) -> None:
    """export rebuilds the run's recipe from the checkpoint's hyper-parameters; an optimizer named there
    (which export never builds) is not imported."""
    marker = tmp_path / "ran"
    plant_module(tmp_path / "site", "evil_optim", marker)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    checkpoint = torch.load(FIXTURE_CKPT, weights_only=True)
    checkpoint["hyper_parameters"]["optimizer"] = "evil_optim.Optimizer"
    ckpt = tmp_path / "planted.ckpt"
    torch.save(checkpoint, ckpt)

    assert main(["export", "--ckpt_path", str(ckpt), "--format", "peft", "--output", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not marker.exists() and "evil_optim" not in sys.modules


def test_a_dotted_package_path_imports_nothing(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "ran"
    plant_module(tmp_path / "site", "evil_pkg.sub", marker)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    path = resolve_path("pkg://evil_pkg.sub/model.gguf")
    assert path == tmp_path / "site" / "evil_pkg" / "sub" / "model.gguf"
    assert not marker.exists() and "evil_pkg" not in sys.modules


@pytest.mark.parametrize("spec", ["pkg://json/../os.py", "pkg://json//etc/passwd", "pkg://json/sub/../../../x"])
def test_package_paths_stay_inside_the_package(spec: str) -> None:
    with pytest.raises(PackagePathError, match="leaves package 'json'"):
        resolve_path(spec)


def test_package_paths_inside_the_package_resolve() -> None:
    import json as json_package

    assert resolve_path("pkg://json/decoder.py") == Path(json_package.__file__).parent / "decoder.py"
    assert resolve_path("pkg://json/sub/../decoder.py").resolve() == Path(json_package.__file__).parent.resolve() / "decoder.py"


@pytest.mark.parametrize("spec", ["pkg://no-such/x", "pkg://a..b/x", "pkg://1abc/x"])
def test_package_names_must_be_python_names(spec: str) -> None:
    with pytest.raises(PackagePathError, match="is not a Python package name"):
        resolve_path(spec)


def gguf_header(n_tensors: int, entries: bytes, n_kv: int = 1) -> bytes:
    """A GGUF v3 header: magic, version, tensor count, metadata count, then the entries as given."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + entries


def gguf_string(text: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if claimed is None else claimed) + text


@pytest.mark.parametrize(
    ("entries", "n_tensors", "n_kv", "expected"),
    [
        (gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40) + gguf_string(b"a"), 0, 1, "1099511627776 strings"),
        (gguf_string(b"x") + struct.pack("<IIQ", 9, 0, 2**40), 0, 1, "1099511627776 items"),
        (gguf_string(b"x") + struct.pack("<I", 8) + gguf_string(b"abc", claimed=2**50), 0, 1, "needs 1125899906842624 bytes"),
        (b"", 2**40, 2**40, "metadata entries and 1099511627776 tensors do not fit"),
        (gguf_string(b"x") + struct.pack("<I", 4) + b"\0" * 4 + gguf_string(b"t") + struct.pack("<I", 2**31), 1, 1, "tensor 0 has 2147483648 dimensions"),
    ],
    ids=["string array of 2^40", "byte array of 2^40", "a string of a PiB", "2^40 entries", "2^31 dimensions"],
)
def test_gguf_header_counts_are_bounded_by_the_file(tmp_path: Path, entries: bytes, n_tensors: int, n_kv: int, expected: str) -> None:
    """Every count the header states is checked against the bytes left before anything is allocated (#29):
    one line, at once, where the gguf package would try to build 2^40 items."""
    pytest.importorskip("gguf")
    from lightning_tune.io.gguf import GGUFError, open_gguf

    path = tmp_path / "hostile.gguf"
    path.write_bytes(gguf_header(n_tensors, entries, n_kv) + b"\0" * 64)
    with pytest.raises(GGUFError, match="cannot read as GGUF, the file is truncated or corrupt") as err:
        open_gguf(path)
    assert expected.split(": ")[-1] in str(err.value) and "\n" not in str(err.value)


def test_a_config_json_with_a_billion_layers_is_one_line(tmp_path: Path) -> None:
    """config.json's numbers are bounded before a skeleton is built from them (#29: 10^9 layers built until killed)."""
    from lightning_tune.checkpoint import CheckpointError, load_config

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 10**9, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: .*num_layers must be at most 1,024, got 1,000,000,000"):
        load_config(tmp_path)
