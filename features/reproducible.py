"""Byte-reproducible Spark parquet outputs: the same rows give the same files, in any JVM, on any master.

Spark's parquet writer (parquet-mr) leaves two things that change from one run to the next
while the rows stay the same:

* the file name, ``part-00000-<job uuid>-c000.snappy.parquet``: the uuid is drawn per write job;
* in the footer, each column chunk's list of encodings: parquet-mr collects them in a
  ``java.util.HashSet<Encoding>``, whose order follows the enum constants' identity hash
  codes, which differ from one JVM to the next (so a ``local[*]`` run, a rerun and an executor
  on a cluster each write them in their own order). The data pages are identical.

:func:`canonicalize_spark_parquet` fixes both in a folder Spark wrote, before it is published
(:meth:`features.spark.StagedPartition.publish`): the uuid is dropped from each part file's
name (the part number stays, so names remain unique within the write), and every encodings
list is sorted by the encoding's number. Sorting only permutes bytes inside each list (each
element is a varint of its own), so the footer keeps its length and every offset in the file
stays valid. Hadoop's ``.crc`` side file is rewritten for the new bytes. Files that are not
Spark part files (pyarrow's ``part-0.parquet``) are left alone.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

#: ``part-00000-<uuid>-c000.snappy.parquet`` → groups ``part-00000`` and ``-c000.snappy.parquet``
SPARK_PART_FILE = re.compile(
    r"^(part-\d{5})-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(.*\.parquet)$"
)
MAGIC = b"PAR1"
#: the field ids leading from the footer (FileMetaData) to a column chunk's encodings list:
#: FileMetaData.row_groups(4) → RowGroup.columns(1) → ColumnChunk.meta_data(3) → ColumnMetaData.encodings(2)
ENCODINGS_PATH = (4, 1, 3, 2)

# Thrift compact protocol type codes
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)


class ParquetFooterError(ValueError):
    """A file is not the parquet a Spark job writes (no magic, or a footer that does not parse)."""


class _Footer:
    """A reader of the footer's Thrift compact encoding that finds every encodings list.

    Only what the walk needs: it skips every value it does not descend into, and records the
    byte span and value of each element of the lists at :data:`ENCODINGS_PATH`.
    """

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.lists: list[list[tuple[int, int, int]]] = []  # per list: (start, end, value) of each element

    def _byte(self, pos: int) -> tuple[int, int]:
        if pos >= len(self.buf):
            raise ParquetFooterError("the footer ends inside a value")
        return self.buf[pos], pos + 1

    def _varint(self, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b, pos = self._byte(pos)
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value, pos
            shift += 7

    def _skip(self, kind: int, pos: int) -> int:
        if kind in (_TRUE, _FALSE):
            return pos
        if kind == _BYTE:
            return pos + 1
        if kind in (_I16, _I32, _I64):
            return self._varint(pos)[1]
        if kind == _DOUBLE:
            return pos + 8
        if kind == _BINARY:
            size, pos = self._varint(pos)
            return pos + size
        if kind in (_LIST, _SET):
            return self._list(pos, None)
        if kind == _MAP:
            size, pos = self._varint(pos)
            if size:
                types, pos = self._byte(pos)
                for _ in range(size):
                    pos = self._skip(types >> 4, pos)
                    pos = self._skip(types & 0x0F, pos)
            return pos
        if kind == _STRUCT:
            return self.struct(pos, None)
        raise ParquetFooterError(f"unknown Thrift compact type {kind}")

    def _list(self, pos: int, path: tuple[int, ...] | None) -> int:
        header, pos = self._byte(pos)
        size, kind = header >> 4, header & 0x0F
        if size == 15:
            size, pos = self._varint(pos)
        if path == ():  # the encodings list itself: i32 varints
            if kind != _I32:
                raise ParquetFooterError("an encodings list that does not hold i32 values")
            elements = []
            for _ in range(size):
                start = pos
                value, pos = self._varint(pos)
                elements.append((start, pos, value))
            self.lists.append(elements)
            return pos
        for _ in range(size):
            if kind == _STRUCT and path is not None:
                pos = self.struct(pos, path)
            elif kind in (_TRUE, _FALSE):  # booleans in a list take one byte each
                pos += 1
            else:
                pos = self._skip(kind, pos)
        return pos

    def struct(self, pos: int, path: tuple[int, ...] | None) -> int:
        """Skip the struct at ``pos`` (recording the lists ``path`` leads to); the position after it."""
        field = 0
        while True:
            header, pos = self._byte(pos)
            kind = header & 0x0F
            if kind == _STOP:
                return pos
            delta = header >> 4
            if delta:
                field += delta
            else:
                raw, pos = self._varint(pos)
                field = (raw >> 1) ^ -(raw & 1)
            if path and field == path[0] and kind == _LIST:
                pos = self._list(pos, path[1:])
            elif path and field == path[0] and kind == _STRUCT:
                pos = self.struct(pos, path[1:])
            else:
                pos = self._skip(kind, pos)


def sorted_encodings(data: bytes) -> bytes:
    """``data`` (a whole parquet file) with every column chunk's encodings list sorted by encoding number.

    Raises:
        ParquetFooterError: ``data`` is not a parquet file with a plain (unencrypted) footer.
    """
    if len(data) < 12 or data[:4] != MAGIC or data[-4:] != MAGIC:
        raise ParquetFooterError("not a parquet file (no PAR1 magic at both ends)")
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    if start < 4:
        raise ParquetFooterError(f"footer length {footer_len} does not fit in {len(data)} bytes")
    footer = _Footer(data[start:-8])
    end = footer.struct(0, ENCODINGS_PATH)
    if end != footer_len:
        raise ParquetFooterError(f"the footer parsed to {end} bytes, not the {footer_len} it declares")
    out = bytearray(data)
    for elements in footer.lists:
        if not elements:
            continue
        first, last = elements[0][0], elements[-1][1]
        ordered = b"".join(footer.buf[s:e] for s, e, _ in sorted(elements, key=lambda el: el[2]))
        out[start + first : start + last] = ordered
    return bytes(out)


def hadoop_crc(data: bytes, bytes_per_checksum: int = 512) -> bytes:
    """The ``.crc`` side file Hadoop's local file system writes for ``data`` (CRC32 of each 512-byte chunk)."""
    sums = b"".join(
        struct.pack(">I", zlib.crc32(data[i : i + bytes_per_checksum])) for i in range(0, len(data), bytes_per_checksum)
    )
    return b"crc\x00" + struct.pack(">i", bytes_per_checksum) + sums


def _crc_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.crc")


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def canonicalize_spark_parquet(folder: Path) -> list[Path]:
    """Give the Spark part files in ``folder`` stable names and footers (see the module's docstring).

    Args:
        folder: a folder one Spark write job wrote (``df.write.parquet(folder)``).

    Returns:
        The part files' new paths, sorted.
    """
    out: list[Path] = []
    for path in sorted(folder.iterdir()):
        match = SPARK_PART_FILE.match(path.name)
        if match is None or not path.is_file():
            continue
        data = sorted_encodings(path.read_bytes())
        target = folder / f"{match.group(1)}{match.group(2)}"
        if target.exists():
            raise FileExistsError(f"{folder} holds two writes' part files: {target.name} and {path.name}")
        _write(target, data)
        if target != path:
            path.unlink()
        old_crc = _crc_file(path)
        if old_crc.exists():  # Spark reads verify it: written for the new bytes, under the new name
            old_crc.unlink()
            _write(_crc_file(target), hadoop_crc(data))
        out.append(target)
    return out
