"""Open a .gguf file (memory-mapped, the reader cached per file version) and read its metadata; GGUFError."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_tune.io.files import CheckpointError
from lightning_tune.io.paths import resolve_path

if TYPE_CHECKING:
    from gguf import GGUFReader


ARCHITECTURE = "llama"


class GGUFError(CheckpointError):
    """One line naming the GGUF file (or option) and what is supported."""


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading or writing GGUF needs the gguf package: install lightning_tune[gguf] (pip install 'gguf>=0.19')") from None
    return gguf


def is_gguf(path: str | Path) -> bool:
    """True for a path named *.gguf (existing or not: a missing one should say 'GGUF file not found') or a file with GGUF's magic."""
    path = resolve_path(path)
    if path.suffix.lower() == ".gguf":
        return True
    if path.is_file():
        with open(path, "rb") as file:
            return file.read(4) == b"GGUF"
    return False


# --------------------------------------------------------------------------------------------------
# Reading


def open_gguf(path: str | Path) -> tuple[Path, GGUFReader]:
    """Memory-map a GGUF file (nothing is read until a tensor is touched); one-line errors for anything else.

    The parsed header is cached per (file, size, mtime): parsing a 49k-token vocabulary takes seconds
    in pure Python, and config, tokenizer and weights each ask for it.
    """
    path = resolve_path(path).absolute()
    if not path.is_file():
        raise GGUFError(f"{path}: GGUF file not found")
    stat = path.stat()
    return path, _open_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFReader:
    gguf = import_gguf()
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); expected a llama.cpp .gguf model")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt header fails in many ways; one answer
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GGUFError(f"{path}: cannot read as GGUF, the file is truncated or corrupt ({reason})") from None
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise GGUFError(f"{path}: truncated: tensor {tensor.name} ends at byte {tensor.data_offset + tensor.n_bytes}, the file has {size}")
    return reader


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Every key-value field as a Python value (strings decoded, arrays as lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def check_architecture(path: Path, metadata: dict[str, Any]) -> None:
    arch = metadata.get("general.architecture")
    if arch != ARCHITECTURE:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; only {ARCHITECTURE!r} GGUF files (Llama 2/3, SmolLM2, TinyLlama, Mistral 7B) can be read")


def metadata_value(path: Path, metadata: dict[str, Any], key: str, default: Any = ...) -> Any:
    if key in metadata:
        return metadata[key]
    if default is ...:
        raise GGUFError(f"{path}: missing metadata key {key!r}")
    return default
