"""GGUF header validation, done by Serai before llama.cpp ever opens a model file.

llama.cpp's own parser trusts the lengths a file declares, and a crafted header (a string or array
length of 2^60, a truncated file) has crashed it before. So every length is checked here against
the bytes the file really has left before anything is read or skipped; string values and array
items are skipped, never read into memory, and the file is streamed through a fixed buffer, so a
header costs the same small memory whatever it claims. See docs/security.md, "Model files".
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from serai.errors import ModelFileError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts; llama.cpp reads only 2 and 3
DEFAULT_ALIGNMENT = 32

# Far above any real model (a few dozen metadata keys, a few thousand tensors), far below what
# would make the checks themselves costly.
MAX_METADATA_KEYS = 65_536
MAX_TENSORS = 65_536
MAX_KEY_BYTES = 1_024
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME is 64 with the terminating NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_ITEMS = 1 << 24  # vocabularies and merge lists stay below a million

# Metadata value types (gguf.h) and the size of the fixed-size ones.
STRING, ARRAY = 8, 9
FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
              6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
              12: "float64"}

# ggml tensor types: (elements per block, bytes per block), as gguf-py's GGML_QUANT_SIZES.
# A type missing here (a newer quantization) is refused rather than guessed.
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176),
    14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98),
    19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1),
    25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54),
    35: (256, 66), 39: (32, 17),
}

_BUFFER = 1 << 20
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GgufHeader:
    """What a valid header declares."""

    version: int
    tensor_count: int
    metadata_count: int
    alignment: int
    data_offset: int  # where the tensor data starts
    file_size: int


class _Cursor:
    """A position in the file that refuses to read or skip past its end."""

    def __init__(self, path: Path, f: BinaryIO, size: int) -> None:
        self.path, self.f, self.size, self.pos = path, f, size, 0

    @property
    def left(self) -> int:
        return self.size - self.pos

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path} is not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise self.fail(f"{what} claims {n:,} bytes but the file has {self.left:,} bytes left")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.f.read(n)
        if len(data) != n:  # the file shrank while being read
            raise self.fail(f"{what}: the file ended early")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, os.SEEK_CUR)  # within the buffer: no system call
        self.pos += n

    def _fixed(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise self.fail(f"the file ends inside {what} ({self.left} of its {n} bytes): "
                            "it is truncated")
        return self.take(n, what)

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self._fixed(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack("<Q", self._fixed(8, what))[0]
        return value

    def string_length(self, what: str, *, at_most: int | None = None) -> int:
        length = self.u64(f"the length of {what}")
        if at_most is not None and length > at_most:
            raise self.fail(f"{what} is {length:,} bytes long (at most {at_most:,} are accepted)")
        if length > self.left:
            raise self.fail(f"{what} claims a {length:,}-byte string but the file has "
                            f"{self.left:,} bytes left")
        return length


def validate_gguf(path: Path) -> GgufHeader:
    """Check the GGUF header of `path` (streamed, in bounded memory) and return what it declares;
    ModelFileError naming the file and the fault if anything is out of bounds."""
    with path.open("rb", buffering=_BUFFER) as f:
        size = os.fstat(f.fileno()).st_size
        cur = _Cursor(path, f, size)
        if size < 4 or f.read(4) != MAGIC:
            raise ModelFileError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        cur.pos = 4
        version = cur.u32("the version")
        if version not in VERSIONS:
            hint = " (a big-endian file? only little-endian GGUF is read)" if version > 0xFFFF else ""
            raise cur.fail(f"GGUF version {version} is not supported (only 2 and 3){hint}")
        tensor_count = cur.u64("the tensor count")
        metadata_count = cur.u64("the metadata count")
        _check_counts(cur, tensor_count, metadata_count)
        alignment = _read_metadata(cur, metadata_count)
        tensors = [_read_tensor_info(cur, i) for i in range(tensor_count)]
        data_offset = -(-cur.pos // alignment) * alignment
        _check_tensor_data(cur, tensors, data_offset, alignment)
    return GgufHeader(version, tensor_count, metadata_count, alignment, data_offset, size)


def _check_counts(cur: _Cursor, tensor_count: int, metadata_count: int) -> None:
    if metadata_count > MAX_METADATA_KEYS:
        raise cur.fail(f"it claims {metadata_count:,} metadata keys "
                       f"(at most {MAX_METADATA_KEYS:,} are accepted)")
    if tensor_count > MAX_TENSORS:
        raise cur.fail(f"it claims {tensor_count:,} tensors (at most {MAX_TENSORS:,} are accepted)")
    # The smallest metadata entry is 13 bytes (key length, type, one byte of value), the
    # smallest tensor info 24 (name length, dimension count, type, offset).
    least = metadata_count * 13 + tensor_count * 24
    if least > cur.left:
        raise cur.fail(f"the header ({metadata_count:,} metadata keys and {tensor_count:,} "
                       f"tensors) needs at least {least:,} bytes but the file has {cur.left:,} "
                       "bytes left")


def _read_metadata(cur: _Cursor, count: int) -> int:
    """Walk the metadata; return the tensor data alignment it declares."""
    alignment = DEFAULT_ALIGNMENT
    seen: set[bytes] = set()
    for index in range(count):
        what = f"metadata key {index}"
        key = cur.take(cur.string_length(f"the name of {what}", at_most=MAX_KEY_BYTES), what)
        shown = key.decode("utf-8", "replace")
        if key in seen:
            raise cur.fail(f"{what} ({shown!r}) appears twice")
        seen.add(key)
        what = f"{what} ({shown!r})"
        kind = cur.u32(f"the type of {what}")
        if key == b"general.alignment":
            if kind != 4:
                raise cur.fail(f"{what} is a {TYPE_NAMES.get(kind, kind)}, not a uint32")
            alignment = cur.u32(what)
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"{what} is {alignment}, not a power of two")
            continue
        if key == b"split.count" and kind == 2:
            shards = struct.unpack("<H", cur.take(2, what))[0]
            if shards > 1:
                # llama.cpp would open the other shards by name, unchecked and unpinned.
                raise cur.fail(f"it is the first of {shards} split files; merge them into one "
                               "(llama-gguf-split --merge) to serve the model")
            continue
        _skip_value(cur, kind, what)
    return alignment


def _skip_value(cur: _Cursor, kind: int, what: str) -> None:
    if kind in FIXED_SIZES:
        cur.skip(FIXED_SIZES[kind], what)
    elif kind == STRING:
        cur.skip(cur.string_length(what), what)
    elif kind == ARRAY:
        item = cur.u32(f"the item type of {what}")
        length = cur.u64(f"the length of {what}")
        if length > MAX_ARRAY_ITEMS:
            raise cur.fail(f"{what} claims an array of {length:,} items "
                           f"(at most {MAX_ARRAY_ITEMS:,} are accepted)")
        if item in FIXED_SIZES:
            cur.skip(length * FIXED_SIZES[item], f"{what} ({length:,} {TYPE_NAMES[item]} items)")
        elif item == STRING:
            cur.need(length * 8, f"{what} ({length:,} strings)")
            _skip_strings(cur, length, what)
        elif item == ARRAY:  # the format allows it, llama.cpp does not read it
            raise cur.fail(f"{what} is an array of arrays, which is not accepted")
        else:
            raise cur.fail(f"{what} is an array of unknown type {item}")
    else:
        raise cur.fail(f"{what} has unknown type {kind}")


def _skip_strings(cur: _Cursor, count: int, what: str) -> None:
    """Skip `count` strings, each length checked. A vocabulary is some 10^5 short strings, so
    they are walked in a 1 MiB window rather than one read per string."""
    done = 0
    while done < count:
        window = cur.f.read(min(_BUFFER, cur.left))
        at = 0
        while done < count and at + 8 <= len(window):
            (length,) = _U64.unpack_from(window, at)
            if at + 8 + length > len(window):
                break  # past the window (or the file): settled below, one string at a time
            at += 8 + length
            done += 1
        cur.f.seek(at - len(window), os.SEEK_CUR)
        cur.pos += at
        if at == 0:
            item = f"item {done} of {what}"
            cur.skip(cur.string_length(item), item)
            done += 1


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    offset: int
    nbytes: int


def _read_tensor_info(cur: _Cursor, index: int) -> _TensorInfo:
    what = f"tensor {index}"
    raw = cur.take(cur.string_length(f"the name of {what}", at_most=MAX_TENSOR_NAME_BYTES), what)
    name = raw.decode("utf-8", "replace")
    what = f"tensor {index} ({name!r})"
    n_dims = cur.u32(f"the dimension count of {what}")
    if n_dims > MAX_DIMS:
        raise cur.fail(f"{what} has {n_dims:,} dimensions (at most {MAX_DIMS})")
    dims = [cur.u64(f"dimension {d} of {what}") for d in range(n_dims)]
    kind = cur.u32(f"the type of {what}")
    offset = cur.u64(f"the offset of {what}")
    if kind not in GGML_TYPES:
        raise cur.fail(f"{what} has ggml type {kind}, which Serai does not know")
    block, block_bytes = GGML_TYPES[kind]
    elements = 1
    for d in dims:
        elements *= d  # Python integers: a huge product is caught below, not wrapped
    if dims and dims[0] % block:
        raise cur.fail(f"{what}: its first dimension {dims[0]:,} is not a multiple of the "
                       f"type's block of {block}")
    nbytes = elements // block * block_bytes
    if nbytes > cur.size:
        raise cur.fail(f"{what} claims {nbytes:,} bytes of data but the whole file has "
                       f"{cur.size:,}")
    return _TensorInfo(name, offset, nbytes)


def _check_tensor_data(cur: _Cursor, tensors: list[_TensorInfo], data_offset: int,
                       alignment: int) -> None:
    data_bytes = cur.size - data_offset
    if tensors and data_bytes < 0:
        raise cur.fail(f"the file ends ({cur.size:,} bytes) before its tensor data starts "
                       f"(byte {data_offset:,}): it is truncated")
    names: set[str] = set()
    for index, t in enumerate(tensors):
        what = f"tensor {index} ({t.name!r})"
        if t.name in names:
            raise cur.fail(f"{what} appears twice")
        names.add(t.name)
        if t.offset % alignment:
            raise cur.fail(f"{what} starts at offset {t.offset:,}, not a multiple of the "
                           f"alignment {alignment}")
        if t.offset + t.nbytes > data_bytes:
            raise cur.fail(f"{what} claims bytes {t.offset:,} to {t.offset + t.nbytes:,} of the "
                           f"tensor data but the file has {max(data_bytes, 0):,}")
