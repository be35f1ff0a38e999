"""Checkpoints kept by the driver, so a run resumes without a filesystem shared by the executors.

Rank 0 sends each checkpoint (opaque bytes: what they hold is the training side's business) to the
driver over the run's channel, in chunks, and waits for the driver's acknowledgement; the driver keeps
the latest one per key in memory and, given a folder, on its own disk (atomically), so the next attempt
of a run, or ``--resume`` after the driver itself stopped, hands it to the ranks. A key names one of
several things a run trains (the job: one key per variant); nothing is unpickled.
"""

from __future__ import annotations

import base64
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sparkml_mnist.launcher.channel import ChannelClient, Event

CHUNK_BYTES = 512 * 1024  # raw bytes a frame; base64 makes it ~700 KB, below the channel's frame cap
CHIEF_RANK = 0
PUT, GET, STORED, CHECKPOINT = "checkpoint_put", "checkpoint_get", "checkpoint_stored", "checkpoint"
RESULT, RESULT_STORED = "result", "result_stored"  # a rank's small JSON report of what it finished
_FILE = re.compile(r"^epoch-(\d+)\.ckpt$")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # a key names a folder on the driver
DEFAULT_KEY = ""


@dataclass(frozen=True)
class Checkpoint:
    epoch: int  # how many epochs it holds (the next attempt starts at this epoch)
    data: bytes


def valid_key(key: Any) -> bool:
    return key == DEFAULT_KEY or (isinstance(key, str) and bool(_KEY.match(key)))


class CheckpointStore:
    """The latest checkpoint of each key of one run (in memory, and in ``folder`` when given).

    ``subscribe(callback)``: ``callback(key, checkpoint)`` runs on the channel's thread after each one is
    kept (the job evaluates a variant as soon as its last epoch's checkpoint arrives).
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._latest: dict[str, Checkpoint] = {}
        self._listeners: list[Callable[[str, Checkpoint], None]] = []
        self._lock = threading.Lock()

    def _folder(self, key: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / key if key else self.folder

    def latest(self, key: str = DEFAULT_KEY) -> Checkpoint | None:
        with self._lock:
            if key not in self._latest:
                self._latest[key] = _read_latest(self._folder(key))  # type: ignore[assignment]
            return self._latest[key]

    def put(self, epoch: int, data: bytes, key: str = DEFAULT_KEY) -> None:
        """Keep ``data`` as ``key``'s checkpoint after ``epoch`` epochs; on disk first, then in memory."""
        folder = self._folder(key)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            final = folder / f"epoch-{epoch:06d}.ckpt"
            partial = folder / f".{final.name}.partial"
            with open(partial, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, final)
            for older in folder.iterdir():
                if older != final and _FILE.match(older.name):
                    older.unlink(missing_ok=True)
        checkpoint = Checkpoint(epoch=epoch, data=data)
        with self._lock:
            self._latest[key] = checkpoint
            listeners = list(self._listeners)
        for listener in listeners:
            listener(key, checkpoint)

    def epochs(self) -> dict[str, int]:
        """Every key's latest epoch (from memory, and from the folder for keys not read yet)."""
        keys = set(self._latest)
        if self.folder is not None and self.folder.is_dir():
            keys |= {p.name for p in self.folder.iterdir() if p.is_dir() and valid_key(p.name)}
            if any(_FILE.match(p.name) for p in self.folder.iterdir()):
                keys.add(DEFAULT_KEY)
        found = {key: self.latest(key) for key in sorted(keys)}
        return {key: checkpoint.epoch for key, checkpoint in found.items() if checkpoint is not None}

    def subscribe(self, listener: Callable[[str, Checkpoint], None]) -> None:
        with self._lock:
            self._listeners.append(listener)


def _read_latest(folder: Path | None) -> Checkpoint | None:
    if folder is None or not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE.match(p.name)))
    if not found:
        return None
    epoch, path = found[-1]
    return Checkpoint(epoch=epoch, data=path.read_bytes())


class CheckpointReceiver:
    """Driver side: assembles rank 0's chunks into the store; answers fetches. Fed by the channel."""

    def __init__(self, store: CheckpointStore | None) -> None:
        self.store = store
        self._parts: list[bytes] = []

    def handle(self, rank: int, event: Event) -> Event | None:
        if event["type"] != PUT or rank != CHIEF_RANK or self.store is None or not valid_key(event.get("key", "")):
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
        self.store.put(epoch, b"".join(self._parts), event.get("key", DEFAULT_KEY))
        self._parts = []
        return {"type": STORED, "epoch": epoch}

    def replies(self, event: Event) -> list[Event]:
        key = event.get("key", DEFAULT_KEY)
        latest = self.store.latest(key) if self.store is not None and valid_key(key) else None
        if latest is None:
            return [{"type": CHECKPOINT, "epoch": None, "seq": 0, "total": 0}]
        chunks = [latest.data[i : i + CHUNK_BYTES] for i in range(0, len(latest.data), CHUNK_BYTES)] or [b""]
        return [
            {"type": CHECKPOINT, "epoch": latest.epoch, "seq": seq, "total": len(chunks),
             "data": base64.b64encode(chunk).decode("ascii")}
            for seq, chunk in enumerate(chunks)
        ]


def send_checkpoint(client: ChannelClient, epoch: int, data: bytes, key: str = DEFAULT_KEY) -> None:
    """Rank 0: hand the driver a checkpoint and wait until it is stored (raises ChannelError if it is not)."""
    chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
    for seq, chunk in enumerate(chunks):
        frame = {"type": PUT, "key": key, "epoch": epoch, "seq": seq, "total": len(chunks),
                 "data": base64.b64encode(chunk).decode("ascii")}
        if seq + 1 < len(chunks):
            client.send(frame)
        else:
            client.request(frame, lambda reply: reply.get("type") == STORED)


def fetch_checkpoint(client: ChannelClient, key: str = DEFAULT_KEY) -> Checkpoint | None:
    """Any rank: the driver's latest checkpoint of ``key`` in this run (None: none yet)."""

    def last(frame: Event) -> bool:
        return frame.get("type") == CHECKPOINT and int(frame.get("seq", 0)) + 1 >= int(frame.get("total", 0))

    frames = client.request({"type": GET, "key": key}, last)
    first: dict[str, Any] = frames[0]
    if first.get("epoch") is None:
        return None
    data = b"".join(base64.b64decode(frame["data"]) for frame in frames if frame.get("type") == CHECKPOINT)
    return Checkpoint(epoch=int(first["epoch"]), data=data)
