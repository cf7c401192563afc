"""docs/PROTOCOL.md's byte formats, pinned.

Payloads are built here by hand from the section "Tensor payload, format version 1" (struct.pack
and plain loops, never the codec): each must decode to the tensors it was written to carry, and
`encode` must write exactly those bytes. The section's tables (codes, constants, limits) and the
envelope's are parsed and compared with the constants of the code, so neither can drift from the
document without a test failing.
"""

from __future__ import annotations

import inspect
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard

from edge_sdk import codec
from edge_sdk.codec import IndexKind, SparseTensor, ValueDtype, decode, encode
from edge_sdk.protocol import envelope

PROTOCOL = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()


# --------------------------------------------------------------------------- reading the document


def section(title: str) -> str:
    start = PROTOCOL.index(f"\n## {title}\n")
    end = PROTOCOL.find("\n## ", start + 1)
    return PROTOCOL[start:] if end < 0 else PROTOCOL[start:end]


def table(text: str, first_column: str) -> list[list[str]]:
    """Body rows (cells stripped) of the markdown table whose first header cell is `first_column`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_column:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"PROTOCOL.md has no table headed {first_column!r}")


def quoted(cell: str) -> str:
    """The `code` in a cell: the machine-checked value."""
    match = re.search(r"`([^`]*)`", cell)
    assert match, f"cell {cell!r} has no `value`"
    return match.group(1)


def keyed(text: str, first_column: str) -> dict[str, str]:
    return {row[0]: quoted(row[1]) for row in table(text, first_column)}


def layout(text: str, opening: str) -> list[tuple[int, int]]:
    """(offset, size) of each fixed field of the ```text block that starts with `opening`."""
    block = text[text.index(opening):]
    block = block[:block.index("```")]
    return [(int(m.group(1)), int(m.group(2)))
            for m in re.finditer(r"^(\d+)\s+(\d+)\s+\S", block, re.MULTILINE)]


def struct_sizes(fmt: str) -> list[int]:
    """Field sizes of a struct format: "<4sBI" -> [4, 1, 4]."""
    sizes = []
    for count, char in re.findall(r"(\d*)([a-zA-Z?])", fmt):
        if char == "s":
            sizes.append(int(count or 1))
        else:
            sizes += [struct.calcsize(f"<{char}")] * int(count or 1)
    return sizes


PAYLOAD = section("Tensor payload, format version 1")
ENVELOPE = section("Envelope, version 1")


# --------------------------------------------------------------------------- payloads by hand


def leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        group, n = n & 0x7F, n >> 7
        out.append(group | (0x80 if n else 0))
        if not n:
            return bytes(out)


def little_bits(flags: list[bool]) -> bytes:
    """Entry i in bit i % 8 of byte i // 8, least significant first, padding bits 0."""
    out = bytearray((len(flags) + 7) // 8)
    for i, flag in enumerate(flags):
        out[i // 8] |= int(flag) << (i % 8)
    return bytes(out)


def record(name: str, shape: tuple[int, ...], kind: int, nnz: int, index: bytes, values: bytes) -> bytes:
    raw = name.encode()
    return (struct.pack("<H", len(raw)) + raw + struct.pack("<B", len(shape))
            + b"".join(struct.pack("<I", d) for d in shape)
            + struct.pack("<B", kind) + struct.pack("<I", nnz) + struct.pack("<I", len(index))
            + index + values)


def payload(dtype_code: int, records: list[bytes]) -> bytes:
    body = b"".join(records)
    header = b"FPTU" + struct.pack("<BBBB", 1, dtype_code, 0, 0) + struct.pack("<II", len(records), len(body))
    frame = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True).compress(body)
    return header + frame


def wire_values(dtype_code: int, values: list[float]) -> bytes:
    if dtype_code == 1:
        return b"".join(struct.pack("<f", v) for v in values)
    if dtype_code == 2:
        return b"".join(struct.pack("<e", v) for v in values)
    assert all(v in (-1.0, 1.0) for v in values)
    return little_bits([v > 0 for v in values])


def values_for(dtype_code: int, n: int) -> list[float]:
    if dtype_code == 3:
        return [1.0 if i % 3 else -1.0 for i in range(n)]
    if dtype_code == 2:  # exact in binary16
        return [(-1) ** i * (i + 1) * 0.25 for i in range(n)]
    return [(-1) ** i * (i + 1) * 0.1 for i in range(n)]  # not exact in binary16: fp32 keeps them


BITMAP_KEPT = [0, 1, 2, 3, 5, 8, 13, 15]  # of 16: 2 bitmap bytes beat 8 varint bytes
VARINT_KEPT = [3, 300, 19999]              # of 20,000: gaps 3, 297, 19699 take 1, 2 and 3 bytes
KNOWN_KEPT = [0, 4, 8]


def spec_case(dtype_code: int) -> tuple[bytes, dict[str, tuple[tuple[int, ...], list[int] | None, list[float]]]]:
    """A payload with every index kind at one value dtype: its bytes, and what it carries."""
    v = lambda n: values_for(dtype_code, n)  # noqa: E731
    meant = {
        "conv.weight": ((2, 3), None, v(6)),
        "scale": ((), None, v(1)),
        "fc.weight": ((4, 4), BITMAP_KEPT, v(8)),
        "embed": ((200, 100), VARINT_KEPT, v(3)),
        "mask": ((3, 3), KNOWN_KEPT, v(3)),
        "nothing": ((4,), [], []),
    }
    gaps = [VARINT_KEPT[0]] + [b - a for a, b in zip(VARINT_KEPT, VARINT_KEPT[1:])]
    records = [
        record("conv.weight", (2, 3), 0, 6, b"", wire_values(dtype_code, meant["conv.weight"][2])),
        record("scale", (), 0, 1, b"", wire_values(dtype_code, meant["scale"][2])),
        record("fc.weight", (4, 4), 1, 8, little_bits([i in BITMAP_KEPT for i in range(16)]),
               wire_values(dtype_code, meant["fc.weight"][2])),
        record("embed", (200, 100), 2, 3, b"".join(leb128(g) for g in gaps),
               wire_values(dtype_code, meant["embed"][2])),
        record("mask", (3, 3), 3, 3, b"", wire_values(dtype_code, meant["mask"][2])),
        record("nothing", (4,), 2, 0, b"", b""),
    ]
    return payload(dtype_code, records), meant


DTYPES = {1: ValueDtype.FLOAT32, 2: ValueDtype.FLOAT16, 3: ValueDtype.SIGN1}


@pytest.mark.parametrize("dtype_code", sorted(DTYPES), ids=["fp32", "fp16", "sign1"])
def test_a_payload_built_from_the_document_decodes_to_what_it_carries(dtype_code):
    data, meant = spec_case(dtype_code)
    decoded = decode(data, known_indices={"mask": np.array(KNOWN_KEPT)})
    assert list(decoded) == list(meant)
    for name, (shape, indices, values) in meant.items():
        tensor = decoded[name]
        assert tensor.shape == shape, name
        assert (tensor.indices is None) == (indices is None), name
        if indices is not None:
            assert tensor.indices.tolist() == indices, name
        assert tensor.values.dtype == np.float32
        np.testing.assert_array_equal(tensor.values, np.array(values, np.float32), err_msg=name)


@pytest.mark.parametrize("dtype_code", sorted(DTYPES), ids=["fp32", "fp16", "sign1"])
def test_encode_writes_exactly_the_bytes_the_document_describes(dtype_code):
    data, meant = spec_case(dtype_code)
    tensors = {name: SparseTensor(shape, None if indices is None else np.array(indices, np.int64),
                                  np.array(values, np.float32))
               for name, (shape, indices, values) in meant.items()}
    encoded = encode(tensors, DTYPES[dtype_code], known_indices={"mask"})
    assert encoded[:16] == data[:16]  # the header
    assert zstandard.ZstdDecompressor().decompress(encoded[16:]) == \
        zstandard.ZstdDecompressor().decompress(data[16:])  # the records
    assert encoded == data  # and the frame: content size, checksum, level 3


def test_the_empty_payload():
    assert encode({}) == payload(1, [])
    assert decode(payload(1, [])) == {}


def test_documented_limits_are_where_the_encoder_stops():
    one = SparseTensor((1,), None, np.ones(1, np.float32))
    limits = {row[0]: row[1] for row in table(PAYLOAD, "payload limit")}
    longest = int(quoted(limits["name"]))
    assert decode(encode({"n" * longest: one}))["n" * longest].shape == (1,)
    with pytest.raises(codec.CodecError, match="UTF-8 bytes"):
        encode({"n" * (longest + 1): one})
    most = int(quoted(limits["ndim"]))
    assert decode(encode({"t": SparseTensor((1,) * most, None, np.ones(1, np.float32))}))["t"].shape == (1,) * most
    with pytest.raises(codec.CodecError, match="at most 255"):
        encode({"t": SparseTensor((1,) * (most + 1), None, np.ones(1, np.float32))})


# --------------------------------------------------------------------------- the tables are the code's


def test_payload_constants_and_header_layout_are_the_codecs():
    constants = keyed(PAYLOAD, "payload constant")
    assert constants["magic"].encode() == codec.MAGIC
    assert int(constants["format version"]) == codec.FORMAT_VERSION
    assert int(constants["header size"]) == codec.HEADER.size
    assert int(constants["smallest record"]) == codec._MIN_RECORD_BYTES
    assert int(constants["default zstd level"]) == inspect.signature(encode).parameters["level"].default
    assert "little-endian" in PAYLOAD and codec.HEADER.format.startswith("<")

    fields = layout(PAYLOAD, "offset size  field")
    assert [size for _, size in fields] == struct_sizes(codec.HEADER.format)
    assert [offset for offset, _ in fields] == [sum(s for _, s in fields[:i]) for i in range(len(fields))]


def test_value_dtype_and_index_kind_tables_are_the_codecs():
    dtypes = table(PAYLOAD, "value dtype code")
    assert {int(quoted(row[0])): row[1] for row in dtypes} == {d.value: d.name for d in ValueDtype}
    for row in dtypes:
        assert ValueDtype.from_name(quoted(row[2])) is ValueDtype(int(quoted(row[0])))
    kinds = table(PAYLOAD, "index kind code")
    assert {int(quoted(row[0])): row[1] for row in kinds} == {k.value: k.name for k in IndexKind}


def test_payload_limits_are_the_codecs():
    limits = keyed(PAYLOAD, "payload limit")
    assert int(limits["name"]) == codec._U16_MAX
    assert int(limits["ndim"]) == 2**8 - 1
    assert int(limits["dim"]) == int(limits["nnz, tensor count, body length"]) == codec._U32_MAX
    assert int(limits["numel"]) == np.iinfo(np.int64).max
    assert int(limits["varint"]) == codec._MAX_VARINT_BYTES
    assert int(limits["default `max_decoded_bytes`"]) == \
        inspect.signature(decode).parameters["max_decoded_bytes"].default


def test_envelope_tables_and_layout_are_the_envelopes():
    constants = keyed(ENVELOPE, "envelope constant")
    assert constants["magic"].encode() == envelope.MAGIC
    assert int(constants["envelope version"]) == envelope.VERSION
    assert int(constants["prefix size"]) == envelope.PREFIX_BYTES
    assert int(constants["header limit"]) == envelope.HEADER_LIMIT
    assert int(constants["default payload limit"]) == envelope.DEFAULT_PAYLOAD_LIMIT == \
        inspect.signature(envelope.decode_envelope).parameters["payload_limit"].default
    assert int(constants["flags"]) == 0
    types = table(ENVELOPE, "message type code")
    assert {int(quoted(row[0])): row[1] for row in types} == {t.value: t.name for t in envelope.MessageType}
    assert "**big-endian**" in ENVELOPE and envelope._PREFIX.format.startswith(">")

    fields = layout(ENVELOPE, "offset  size  field")
    fixed = [(offset, size) for offset, size in fields if offset < envelope.PREFIX_BYTES]
    assert [size for _, size in fixed] == struct_sizes(envelope._PREFIX.format)
    assert [offset for offset, _ in fixed] == [sum(s for _, s in fixed[:i]) for i in range(len(fixed))]
