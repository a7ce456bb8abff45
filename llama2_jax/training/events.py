"""TensorBoard event files without TensorFlow: scalar summaries, appended as training goes.

The format is TFRecord framing (length, masked CRC-32C of the length, payload, masked CRC-32C of
the payload) around `tensorflow.Event` protocol buffers, of which only the few fields a scalar
needs are written: wall_time (1, double), step (2, int64), file_version (3, string) and
summary (5) -> value (1) -> {tag (1, string), simple_value (2, float)}.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Iterator, Mapping


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    out = b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step)
    if version is not None:
        out += _field(3, version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
                          for tag, v in scalars.items())
        out += _field(5, values)
    return out


def _record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", _masked(crc32c(length))) + payload
            + struct.pack("<I", _masked(crc32c(payload))))


class EventWriter:
    """Appends scalars to `<directory>/events.out.tfevents.<time>.<host>`, one file a run start."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(directory, name)
        self._f = open(self.path, "ab")
        self._f.write(_record(_event(0, version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._f.write(_record(_event(step, scalars=values)))
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_records(path: str) -> Iterator[bytes]:
    """The payloads of a TFRecord file, each CRC checked (ValueError if one does not match)."""
    with open(path, "rb") as f:
        while header := f.read(12):
            length, length_crc = struct.unpack("<QI", header)
            if _masked(crc32c(header[:8])) != length_crc:
                raise ValueError(f"{path}: bad length checksum at offset {f.tell() - 12}")
            payload = f.read(length)
            (crc,) = struct.unpack("<I", f.read(4))
            if _masked(crc32c(payload)) != crc:
                raise ValueError(f"{path}: bad payload checksum at offset {f.tell() - 4}")
            yield payload
