"""Open a .gguf file (its header parsed here, its tensors memory-mapped, cached per file version) and read its metadata; GGUFError."""

from __future__ import annotations

import functools
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_tune.io.files import CheckpointError
from lightning_tune.io.paths import resolve_path

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


def open_gguf(path: str | Path) -> tuple[Path, GGUFFile]:
    """Parse a GGUF file's header and memory-map its tensors (nothing is read until a tensor is touched);
    one-line errors for anything else.

    The parsed header is cached per (file, size, mtime): config, tokenizer and weights each ask for it.
    """
    path = resolve_path(path).absolute()
    if not path.is_file():
        raise GGUFError(f"{path}: GGUF file not found")
    stat = path.stat()
    return path, _open_cached(path, stat.st_size, stat.st_mtime_ns)


# GGUF value types (gguf-py GGUFValueType) -> struct format of one value; 8 (string) and 9 (array) are variable.
VALUE_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
VALUE_SIZES = {kind: struct.calcsize("<" + f) for kind, f in VALUE_FORMATS.items()}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
VERSIONS = (2, 3)  # the gguf package's READER_SUPPORTED_VERSIONS (v2 and v3: 8-byte counts)
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT, unless general.alignment says otherwise


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, as the gguf package's ReaderTensor describes it: `shape` in ggml's order (the
    fastest axis first), `data` a read-only memory-mapped view (float and integer types as their numpy dtype in
    numpy's order, every other type as its bytes, [..., bytes per row]: what `gguf.dequantize` takes)."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: Any  # numpy array of the dimensions, fastest first
    n_elements: int
    n_bytes: int
    data_offset: int
    data: Any


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF header: its metadata (strings decoded, arrays as lists), each key's value type and array
    item type (to copy a field exactly), and its tensors."""

    metadata: dict[str, Any]
    types: dict[str, tuple[int, int | None]]
    tensors: list[GGUFTensor]


def parse_gguf(path: Path) -> GGUFFile:
    """Parse a little-endian GGUF v2/v3 header with every count and length checked against the bytes left in the
    file before anything is allocated from it (a header that claims 2^40 array items or strings of a terabyte is
    one line, not a machine out of memory), then map the tensors. Numeric arrays decode with numpy, strings one by
    one: a 200k-token vocabulary parses in well under a second (the gguf package's reader takes ~20 s)."""
    import numpy as np

    gguf = import_gguf()
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        size, pos = len(data), 8

        def corrupt(reason: str) -> GGUFError:
            return GGUFError(f"{path}: cannot read as GGUF, the file is truncated or corrupt ({reason})")

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n < 0 or n > size - pos:
                raise corrupt(f"{what} needs {n} bytes at byte {pos}, the file has {size - pos} left")
            start, pos = pos, pos + n
            return start

        def scalar(kind: int, what: str) -> Any:
            return struct.unpack_from("<" + VALUE_FORMATS[kind], data, take(VALUE_SIZES[kind], what))[0]

        def string(what: str) -> str:
            n = scalar(10, f"the length of {what}")
            start = take(n, what)
            try:
                return data[start : start + n].decode("utf-8")
            except UnicodeDecodeError:
                raise corrupt(f"{what} is not UTF-8") from None

        def value(kind: int, what: str) -> tuple[Any, int | None]:
            if kind == STRING:
                return string(what), None
            if kind == ARRAY:
                item, count = scalar(4, f"{what}'s item type"), scalar(10, f"{what}'s item count")
                if item in VALUE_SIZES:
                    start = take(count * VALUE_SIZES[item], f"{what}'s {count} items")
                    items = np.frombuffer(data, dtype=np.dtype("<" + VALUE_FORMATS[item]), count=count, offset=start)
                    return items.tolist(), item
                if item == STRING:
                    if count * 8 > size - pos:  # each string has at least its 8-byte length
                        take(count * 8, f"{what}'s {count} strings")
                    return [string(f"an item of {what}") for _ in range(count)], item
                raise corrupt(f"{what} is an array of type {item}, expected a scalar or string type")
            if kind in VALUE_SIZES:
                return scalar(kind, what), None
            raise corrupt(f"{what} has value type {kind}, not a GGUF type")

        version = struct.unpack_from("<I", data, 4)[0] if size >= 8 else None
        if version not in VERSIONS:
            raise corrupt(f"version {version}; GGUF versions {', '.join(map(str, VERSIONS))} are read, little-endian")
        n_tensors, n_kv = scalar(10, "the tensor count"), scalar(10, "the metadata count")
        if n_kv * 13 > size - pos or n_tensors * 24 > size - pos:  # the smallest entry of each: key + type + value; name + dims + type + offset
            raise corrupt(f"{n_kv} metadata entries and {n_tensors} tensors do not fit in its {size} bytes")
        metadata: dict[str, Any] = {}
        types: dict[str, tuple[int, int | None]] = {}
        for index in range(n_kv):
            key = string(f"metadata key {index}")
            kind = scalar(4, f"metadata {index}'s type")
            metadata[key], item = value(kind, f"metadata entry {index}")
            types[key] = (kind, item)
        infos = []
        for index in range(n_tensors):
            name = string(f"tensor {index}'s name")
            dims = scalar(4, f"tensor {index}'s dimension count")
            if dims > MAX_DIMS:
                raise corrupt(f"tensor {index} has {dims} dimensions, GGUF allows at most {MAX_DIMS}")
            shape = struct.unpack_from(f"<{dims}Q", data, take(8 * dims, f"tensor {index}'s shape"))
            infos.append((name, shape, scalar(4, f"tensor {index}'s type"), scalar(10, f"tensor {index}'s offset")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if types.get("general.alignment", (4, None))[0] != 4 or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise corrupt(f"general.alignment {alignment!r} is not a power of two")
    start = -(-pos // alignment) * alignment
    mapped = np.memmap(path, mode="r")
    q = gguf.GGMLQuantizationType
    plain = {q.F32: np.float32, q.F16: np.float16, q.F64: np.float64, q.I8: np.int8, q.I16: np.int16, q.I32: np.int32, q.I64: np.int64}
    tensors, names = [], set()
    for name, shape, kind, offset in infos:
        if name in names:
            raise corrupt(f"tensor {name} appears twice")
        names.add(name)
        try:
            ggml_type = q(kind)
        except ValueError:
            raise corrupt(f"tensor {name} has type {kind}, not a ggml type") from None
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        n_elements = math.prod(shape)
        if shape and shape[0] % block:
            raise corrupt(f"tensor {name}'s rows of {shape[0]} are not whole {ggml_type.name} blocks of {block}")
        n_bytes = n_elements * type_size // block
        begin = start + offset
        if begin + n_bytes > size:
            raise GGUFError(f"{path}: truncated: tensor {name} ends at byte {begin + n_bytes}, the file has {size}")
        dims = tuple(reversed(shape))
        if ggml_type in plain:
            view = mapped[begin : begin + n_bytes].view(plain[ggml_type]).reshape(dims)
        else:
            view = mapped[begin : begin + n_bytes].reshape(gguf.quant_shape_to_byte_shape(dims, ggml_type))
        tensors.append(GGUFTensor(name, ggml_type, np.array(shape, dtype=np.uint64), n_elements, n_bytes, begin, view))
    return GGUFFile(metadata, types, tensors)


@functools.lru_cache(maxsize=2)
def _open_cached(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); expected a llama.cpp .gguf model")
    return parse_gguf(path)


def read_metadata(reader: GGUFFile) -> dict[str, Any]:
    """Every key-value field as a Python value (strings decoded, arrays as lists)."""
    return reader.metadata


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
