"""Reading a GGUF file: metadata as plain Python values, each tensor as a uint8 view of the memory-mapped file.

gguf's own `GGUFReader` builds numpy views for every part of every metadata field, which takes seconds for the
~100k vocabulary and merge strings a tokenizer carries; this reads them with `struct` instead. Tensors are still
dequantised by gguf's `gguf.quants.dequantize`. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# value type id -> struct format (little-endian); 8 is a string, 9 an array
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, rows first (the file lists dimensions innermost first)
    data: np.ndarray  # uint8 (*shape[:-1], bytes per row), a view of the file


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8")

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in NUMPY:  # a block of numbers: one numpy read
                arr = np.frombuffer(self.buf, dtype=NUMPY[etype], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        if vtype not in SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.scalar(SCALARS[vtype])


def read_gguf(path: str | Path) -> tuple[dict, list[GGUFTensor]]:
    """(metadata {key: value}, tensors in file order); raises ValueError for a file that is not GGUF v2/v3."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    c = _Cursor(memoryview(mm))  # struct.error / IndexError past the end: the caller reports a truncated header
    if bytes(c.buf[:4]) != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    c.pos = 4
    version = c.scalar("<I")
    if version not in (2, 3):  # v1 used 32-bit lengths; a byte-swapped (big-endian) file reads as a huge number
        raise ValueError(f"GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        dims = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
        infos.append((name, GGMLQuantizationType(c.scalar("<I")), tuple(reversed(dims)), c.scalar("<Q")))
    align = meta.get("general.alignment", 32)
    data_start = -(-c.pos // align) * align
    tensors = []
    for name, qtype, shape, offset in infos:
        block, type_size = GGML_QUANT_SIZES[qtype]
        row_bytes = shape[-1] // block * type_size
        start = data_start + offset
        nbytes = row_bytes * int(np.prod(shape[:-1], dtype=np.int64))
        if start + nbytes > len(mm):
            raise ValueError(
                f"the file is truncated: tensor {name} needs bytes up to {start + nbytes:,}, the file has {len(mm):,}"
            )
        tensors.append(GGUFTensor(name, qtype, shape, mm[start : start + nbytes].reshape(*shape[:-1], row_bytes)))
    return meta, tensors
