"""Read the records of an offline W&B run file (`run-*.wandb`) so tests can check what was logged.

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each chunk a
7-byte header (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) and its bytes.
"""

from __future__ import annotations

import struct

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32 * 1024
_HEADER = 7


def read_records(path: str) -> list[pb.Record]:
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B log"
    pos, records, pending = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records
