"""Checkpoints kept by the driver, so a run resumes without a filesystem shared by the executors.

Rank 0 sends each checkpoint (opaque bytes: what they hold is the training side's business) to the
driver over the run's channel, in chunks, and waits for the driver's acknowledgement; the driver keeps
the latest one in memory and, given a folder, on its own disk (atomically), so the next attempt of a
run, or ``--resume`` after the driver itself stopped, hands it to the ranks. Nothing is unpickled.
"""

from __future__ import annotations

import base64
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparkml_mnist.distributed.channel import ChannelClient, Event

CHUNK_BYTES = 512 * 1024  # raw bytes a frame; base64 makes it ~700 KB, below the channel's frame cap
CHIEF_RANK = 0
PUT, GET, STORED, CHECKPOINT = "checkpoint_put", "checkpoint_get", "checkpoint_stored", "checkpoint"
_FILE = re.compile(r"^epoch-(\d+)\.ckpt$")


@dataclass(frozen=True)
class Checkpoint:
    epoch: int  # how many epochs it holds (the next attempt starts at this epoch)
    data: bytes


class CheckpointStore:
    """The latest checkpoint of one run (in memory, and in ``folder`` when given)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._latest: Checkpoint | None = None
        self._lock = threading.Lock()
        if folder is not None and folder.is_dir():
            found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE.match(p.name)))
            if found:
                epoch, path = found[-1]
                self._latest = Checkpoint(epoch=epoch, data=path.read_bytes())

    def latest(self) -> Checkpoint | None:
        with self._lock:
            return self._latest

    def put(self, epoch: int, data: bytes) -> None:
        """Keep ``data`` as the checkpoint after ``epoch`` epochs; on disk first, then in memory."""
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            final = self.folder / f"epoch-{epoch:06d}.ckpt"
            partial = self.folder / f".{final.name}.partial"
            with open(partial, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
            for older in self.folder.iterdir():
                if older != final and _FILE.match(older.name):
                    older.unlink(missing_ok=True)
        with self._lock:
            self._latest = Checkpoint(epoch=epoch, data=data)


class CheckpointReceiver:
    """Driver side: assembles rank 0's chunks into the store; answers fetches. Fed by the channel."""

    def __init__(self, store: CheckpointStore | None) -> None:
        self.store = store
        self._parts: list[bytes] = []

    def handle(self, rank: int, event: Event) -> Event | None:
        kind = event["type"]
        if kind == GET:
            return None  # answered by replies(), several frames
        if kind != PUT or rank != CHIEF_RANK or self.store is None:
            return None
        seq, total, epoch = int(event["seq"]), int(event["total"]), int(event["epoch"])
        if seq == 0:
            self._parts = []
        if seq != len(self._parts):
            self._parts = []  # a chunk went missing: the rank's next checkpoint replaces this one
            return None
        self._parts.append(base64.b64decode(event["data"]))
        if seq + 1 < total:
            return None
        self.store.put(epoch, b"".join(self._parts))
        self._parts = []
        return {"type": STORED, "epoch": epoch}

    def replies(self) -> list[Event]:
        latest = self.store.latest() if self.store is not None else None
        if latest is None:
            return [{"type": CHECKPOINT, "epoch": None, "seq": 0, "total": 0}]
        chunks = [latest.data[i : i + CHUNK_BYTES] for i in range(0, len(latest.data), CHUNK_BYTES)] or [b""]
        return [
            {"type": CHECKPOINT, "epoch": latest.epoch, "seq": seq, "total": len(chunks),
             "data": base64.b64encode(chunk).decode("ascii")}
            for seq, chunk in enumerate(chunks)
        ]


def send_checkpoint(client: ChannelClient, epoch: int, data: bytes) -> None:
    """Rank 0: hand the driver a checkpoint and wait until it is stored (raises ChannelError if it is not)."""
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
    for seq, chunk in enumerate(chunks):
        frame = {"type": PUT, "epoch": epoch, "seq": seq, "total": len(chunks),
                 "data": base64.b64encode(chunk).decode("ascii")}
        if seq + 1 < len(chunks):
            client.send(frame)
        else:
            client.request(frame, lambda reply: reply.get("type") == STORED)


def fetch_checkpoint(client: ChannelClient) -> Checkpoint | None:
    """Any rank: the driver's latest checkpoint of this run (None: none yet)."""

    def last(frame: Event) -> bool:
        return frame.get("type") == CHECKPOINT and int(frame.get("seq", 0)) + 1 >= int(frame.get("total", 0))

    frames = client.request({"type": GET}, last)
    first: dict[str, Any] = frames[0]
    if first.get("epoch") is None:
        return None
    data = b"".join(base64.b64decode(frame["data"]) for frame in frames if frame.get("type") == CHECKPOINT)
    return Checkpoint(epoch=int(first["epoch"]), data=data)
