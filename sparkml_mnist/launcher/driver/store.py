"""Checkpoints kept by the driver, so a run resumes without a filesystem shared by the executors.

Rank 0 reports each checkpoint (opaque bytes: what they hold is the training side's business) to the
driver over the run's channel (``context.report``); the driver keeps the latest one per key in memory
and, given a folder, on its own disk (atomically), so the next attempt of a run, or ``--resume`` after
the driver itself stopped, hands it to the ranks. A key names one of several things a run trains (the
job: one key per variant); nothing is unpickled.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from sparkml_mnist.launcher.protocol import DEFAULT_KEY, Checkpoint, valid_key

_FILE = re.compile(r"^epoch-(\d+)\.ckpt$")


class CheckpointStore:
    """The latest checkpoint of each key of one run (in memory, and in ``folder`` when given)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._latest: dict[str, Checkpoint] = {}
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
        with self._lock:
            self._latest[key] = Checkpoint(epoch=epoch, data=data)

    def epochs(self) -> dict[str, int]:
        """Every key's latest epoch (from memory, and from the folder for keys not read yet)."""
        keys = set(self._latest)
        if self.folder is not None and self.folder.is_dir():
            keys |= {p.name for p in self.folder.iterdir() if p.is_dir() and valid_key(p.name)}
            if any(_FILE.match(p.name) for p in self.folder.iterdir()):
                keys.add(DEFAULT_KEY)
        found = {key: self.latest(key) for key in sorted(keys)}
        return {key: checkpoint.epoch for key, checkpoint in found.items() if checkpoint is not None}


def _read_latest(folder: Path | None) -> Checkpoint | None:
    if folder is None or not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE.match(p.name)))
    if not found:
        return None
    epoch, path = found[-1]
    return Checkpoint(epoch=epoch, data=path.read_bytes())
