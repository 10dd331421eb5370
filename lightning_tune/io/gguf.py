"""Open a .gguf file (memory-mapped, the reader cached per file version) and read its metadata; GGUFError."""

from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_tune.io.files import CheckpointError
from lightning_tune.io.paths import resolve_path

if TYPE_CHECKING:
    from gguf import GGUFReader


# llama.cpp architectures (gguf's MODEL_ARCH_NAMES) read and written: Llama-like files, Gemma 2 / 3, Phi-3 / 4, OLMo 2,
# Qwen 2 / 2.5, Qwen 3, Qwen3-MoE.
ARCHITECTURES = ("llama", "gemma2", "gemma3", "phi3", "olmo2", "qwen2", "qwen3", "qwen3moe", "gpt-oss")


class GGUFError(CheckpointError):
    """One line naming the GGUF file (or option) and what is supported."""


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError("reading or writing GGUF needs the gguf package: pip install 'gguf>=0.19' (in a checkout: pip install -e '.[gguf]')") from None
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


# GGUF value types (gguf-py GGUFValueType) -> bytes of one value; 8 (string) and 9 (array) are variable.
VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS


def check_header_counts(path: Path) -> None:
    """Walk a GGUF header (v2/v3: little-endian counts of 8 bytes) and check that every count and length it
    states fits in the bytes left in the file, before anything is allocated from it: a header that claims
    2^40 array items or strings of a terabyte is one line, not a machine out of memory."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        size, pos = len(data), 8

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n < 0 or n > size - pos:
                raise GGUFError(f"{path}: cannot read as GGUF, the file is truncated or corrupt ({what} needs {n} bytes at byte {pos}, the file has {size - pos} left)")
            start, pos = pos, pos + n
            return start

        def u32(what: str) -> int:
            return struct.unpack_from("<I", data, take(4, what))[0]

        def u64(what: str) -> int:
            return struct.unpack_from("<Q", data, take(8, what))[0]

        def string(what: str) -> None:
            take(u64(f"the length of {what}"), what)

        def value(kind: int, what: str) -> None:
            if kind == STRING:
                string(what)
            elif kind == ARRAY:
                item, count = u32(f"{what}'s item type"), u64(f"{what}'s item count")
                if item in VALUE_SIZES:
                    take(count * VALUE_SIZES[item], f"{what}'s {count} items")
                elif item == STRING:
                    if count * 8 > size - pos:  # each string has at least its 8-byte length
                        take(count * 8, f"{what}'s {count} strings")
                    for _ in range(count):
                        string(f"an item of {what}")
                else:
                    raise GGUFError(f"{path}: cannot read as GGUF, the file is truncated or corrupt ({what} is an array of type {item}, expected a scalar or string type)")
            elif kind in VALUE_SIZES:
                take(VALUE_SIZES[kind], what)
            else:
                raise GGUFError(f"{path}: cannot read as GGUF, the file is truncated or corrupt ({what} has value type {kind}, not a GGUF type)")

        n_tensors, n_kv = u64("the tensor count"), u64("the metadata count")
        if n_kv * 13 > size - pos or n_tensors * 24 > size - pos:  # the smallest entry of each: key + type + value; name + dims + type + offset
            raise GGUFError(f"{path}: cannot read as GGUF, the file is truncated or corrupt ({n_kv} metadata entries and {n_tensors} tensors do not fit in its {size} bytes)")
        for index in range(n_kv):
            string(f"metadata key {index}")
            value(u32(f"metadata {index}'s type"), f"metadata entry {index}")
        for index in range(n_tensors):
            string(f"tensor {index}'s name")
            dims = u32(f"tensor {index}'s dimension count")
            if dims > MAX_DIMS:
                raise GGUFError(f"{path}: cannot read as GGUF, the file is truncated or corrupt (tensor {index} has {dims} dimensions, GGUF allows at most {MAX_DIMS})")
            take(8 * dims + 4 + 8, f"tensor {index}'s shape, type and offset")


@functools.lru_cache(maxsize=2)
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFReader:
    gguf = import_gguf()
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); expected a llama.cpp .gguf model")
    check_header_counts(path)  # before the gguf package reads it: it allocates what the header's counts say
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


def check_architecture(path: Path, metadata: dict[str, Any]) -> str:
    """The file's llama.cpp architecture, one of `ARCHITECTURES`; one line for any other."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        names = ", ".join(repr(a) for a in ARCHITECTURES)
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported; GGUF files of {names} (Llama 2/3, SmolLM2, Mistral 7B, Mixtral, Gemma 2/3, Phi-3/4, OLMo 2, Qwen 2/2.5/3, Qwen3-MoE, gpt-oss) can be read"
        )
    return arch


def metadata_value(path: Path, metadata: dict[str, Any], key: str, default: Any = ...) -> Any:
    if key in metadata:
        return metadata[key]
    if default is ...:
        raise GGUFError(f"{path}: missing metadata key {key!r}")
    return default
