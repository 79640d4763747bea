"""Spark part files made byte-reproducible: stable names, sorted encodings lists, a matching ``.crc`` (no Spark)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.reproducible import (
    ENCODINGS_PATH,
    ParquetFooterError,
    _Footer,
    canonicalize_spark_parquet,
    hadoop_crc,
    sorted_encodings,
)

SPARK_NAME = "part-00000-2d18766d-9b65-46e7-8162-1d2dba3a551c-c000.snappy.parquet"
ENCODING_NUMBER = {"PLAIN": 0, "PLAIN_DICTIONARY": 2, "RLE": 3, "BIT_PACKED": 4, "RLE_DICTIONARY": 8}


def _table() -> pa.Table:
    return pa.table({
        "user_id": pa.array([1, 2, 2, 3] * 50, pa.int64()),
        "action": pa.array(["click", "save", None, "hide"] * 50),
        "items": pa.array([[1, 2], [], None, [3]] * 50, pa.list_(pa.int64())),
    })  # fmt: skip


def _parquet(tmp_path: Path) -> bytes:
    path = tmp_path / "t.parquet"
    pq.write_table(_table(), path, compression="snappy")
    return path.read_bytes()


def _permuted(data: bytes) -> bytes:
    """``data`` with every encodings list reversed, as another JVM's HashSet order would write it."""
    footer_len = int.from_bytes(data[-8:-4], "little")
    start = len(data) - 8 - footer_len
    footer = _Footer(data[start:-8])
    footer.struct(0, ENCODINGS_PATH)
    out = bytearray(data)
    for elements in footer.lists:
        first, last = elements[0][0], elements[-1][1]
        out[start + first : start + last] = b"".join(footer.buf[s:e] for s, e, _ in reversed(elements))
    return bytes(out)


def _encodings(path: Path) -> list[tuple[str, ...]]:
    meta = pq.read_metadata(path).to_dict()
    return [col["encodings"] for group in meta["row_groups"] for col in group["columns"]]


def test_files_that_differ_in_encodings_order_only_become_the_same_bytes(tmp_path: Path) -> None:
    data = _parquet(tmp_path)
    permuted = _permuted(data)
    assert permuted != data and len(permuted) == len(data)
    assert sorted_encodings(permuted) == sorted_encodings(data)
    out = tmp_path / "canonical.parquet"
    out.write_bytes(sorted_encodings(permuted))
    assert pq.read_table(out).equals(_table())
    for encodings in _encodings(out):
        assert [ENCODING_NUMBER[e] for e in encodings] == sorted(ENCODING_NUMBER[e] for e in encodings)
    assert sorted_encodings(out.read_bytes()) == out.read_bytes()  # idempotent


def test_only_the_footer_changes(tmp_path: Path) -> None:
    permuted = _permuted(_parquet(tmp_path))
    footer_len = int.from_bytes(permuted[-8:-4], "little")
    canonical = sorted_encodings(permuted)
    assert canonical[: len(permuted) - 8 - footer_len] == permuted[: len(permuted) - 8 - footer_len]
    assert canonical[-8:] == permuted[-8:]


@pytest.mark.parametrize("data", [b"", b"PAR1", b"not a parquet file at all", b"PAR1" + b"\x00" * 8 + b"PAR1"])
def test_what_is_not_parquet_is_refused(data: bytes) -> None:
    with pytest.raises(ParquetFooterError):
        sorted_encodings(data)


def test_hadoop_crc_layout() -> None:
    data = bytes(range(256)) * 5  # 1280 bytes: two full 512-byte chunks and one of 256
    crc = hadoop_crc(data)
    assert crc[:8] == b"crc\x00" + struct.pack(">i", 512)
    assert crc[8:] == b"".join(struct.pack(">I", zlib.crc32(data[i : i + 512])) for i in (0, 512, 1024))


def test_a_spark_folder_gets_stable_names_and_checksums(tmp_path: Path) -> None:
    folder = tmp_path / "ds=2026-01-05"
    folder.mkdir()
    permuted = _permuted(_parquet(tmp_path))
    (folder / SPARK_NAME).write_bytes(permuted)
    (folder / f".{SPARK_NAME}.crc").write_bytes(hadoop_crc(permuted))
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / "part-0.parquet").write_bytes(permuted)  # not a Spark part file: left as it is

    assert canonicalize_spark_parquet(folder) == [folder / "part-00000-c000.snappy.parquet"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".part-00000-c000.snappy.parquet.crc", "_SUCCESS", "part-0.parquet",
                     "part-00000-c000.snappy.parquet"]  # fmt: skip
    canonical = (folder / "part-00000-c000.snappy.parquet").read_bytes()
    assert canonical == sorted_encodings(permuted)
    assert (folder / ".part-00000-c000.snappy.parquet.crc").read_bytes() == hadoop_crc(canonical)
    assert (folder / "part-0.parquet").read_bytes() == permuted
    assert pq.read_table(folder / "part-00000-c000.snappy.parquet").equals(_table())


def test_two_writes_in_one_folder_are_refused(tmp_path: Path) -> None:
    data = _parquet(tmp_path)
    (tmp_path / SPARK_NAME).write_bytes(data)
    (tmp_path / "part-00000-c000.snappy.parquet").write_bytes(data)
    with pytest.raises(FileExistsError, match="two writes' part files"):
        canonicalize_spark_parquet(tmp_path)
