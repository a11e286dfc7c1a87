"""Read an offline W&B run's transaction log (run-<id>.wandb): the records that `wandb sync` would upload.

The file is a LevelDB-style log (a 7-byte ':W&B' header, 32 KiB blocks, records split into chunks with a
checksum, length and type) of wandb's protobuf Records; wandb 0.31 ships no Python reader for it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        parts.append(chunk)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


class OfflineRun:
    """What one offline run recorded: its run record, history rows, summary, config, artifacts and exit code; the
    files it logged (images, tables) lie under ``files``."""

    def __init__(self, run_dir: Path):
        (log,) = Path(run_dir).glob("run-*.wandb")
        self.files = Path(run_dir) / "files"
        self.history: list[dict] = []
        self.summary: dict = {}
        self.config: dict = {}
        self.artifacts: list = []
        self.exit_code = None
        for record in records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run = record.run
                self.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                self.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                self.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                     for item in record.history.item})
            elif kind == "summary":
                self.summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                     for item in record.summary.update})
            elif kind == "artifact":
                self.artifacts.append(record.artifact)
            elif kind == "exit":
                self.exit_code = record.exit.exit_code

    def logged(self, key: str) -> dict:
        """The one history value under ``key`` (a logged image or table: its _type and file path), whose fields
        the transaction log keeps as nested keys ``<key>/<field>``."""
        (value,) = [{k[len(key) + 1:]: v for k, v in row.items() if k.startswith(f"{key}/")} for row in self.history
                    if f"{key}/_type" in row]
        return value

    def table(self, key: str) -> tuple[list[str], list[list]]:
        """The columns and rows of the table logged under ``key``, read from its file."""
        value = self.logged(key)
        assert value["_type"] == "table-file", value
        content = json.loads((self.files / value["path"]).read_text())
        return content["columns"], content["data"]

    def image(self, key: str) -> bytes:
        """The bytes of the image logged under ``key``."""
        value = self.logged(key)
        assert value["_type"] == "image-file", value
        return (self.files / value["path"]).read_bytes()
