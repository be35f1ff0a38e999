"""What the ranks report over a whole run (every attempt): metrics by key and rank, rank 0's checkpoints.

Fed by the channel's threads. A report's checkpoint chunks are assembled per rank and checked against
their sha256; when its last frame arrives the checkpoint is kept in the store (before the rank is
answered, so an acknowledged checkpoint survives the driver's next failure), its metrics are kept, and
the run's listener is told. With a ``checkpoint_dir`` the report names where rank 0 wrote the
checkpoint instead (location and sha256): the store notes it, the bytes stay in storage.
"""

from __future__ import annotations

import base64
import threading
from typing import Any, Callable

from sparkml_mnist.launcher.driver.store import CheckpointStore
from sparkml_mnist.launcher.checkpoints import sha256_of, valid_sha256
from sparkml_mnist.launcher.protocol import (
    CHIEF_RANK, REPORTED, Checkpoint, Message, checkpoint_frames, valid_key,
)

# on_report(key, rank, metrics, checkpoint or None), on a channel thread, once the report is kept
ReportListener = Callable[[str, int, dict[str, Any], "Checkpoint | None"], None]


class RunReports:
    """``metrics[key][rank]``: the last metrics each rank reported under each key; checkpoints in ``store``."""

    def __init__(self, store: CheckpointStore, on_report: ReportListener | None = None) -> None:
        self.store = store
        self.on_report = on_report
        self.metrics: dict[str, dict[int, dict[str, Any]]] = {}
        self._parts: dict[int, list[bytes]] = {}
        self._lock = threading.Lock()

    def new_attempt(self) -> None:
        """A new attempt's ranks start their reports afresh (half-sent chunks of the last one are dropped)."""
        with self._lock:
            self._parts = {}

    def receive(self, rank: int, frame: Message) -> Message | None:
        """One report frame of ``rank``; the answer once the report is whole and kept (None before)."""
        key, seq, total = frame.get("key"), frame.get("seq"), frame.get("total")
        if not valid_key(key) or not isinstance(seq, int) or not isinstance(total, int) or not 0 <= seq < total:
            return None
        has_checkpoint = "epoch" in frame
        if has_checkpoint and rank != CHIEF_RANK:
            return None  # refused (the rank side says so before sending)
        if "location" in frame:
            return self._receive_stored(rank, key, frame)
        with self._lock:
            parts = self._parts.setdefault(rank, [])
            if seq == 0:
                parts.clear()
            if seq != len(parts):  # a chunk went missing: this report is dropped, the rank gets no answer
                parts.clear()
                return None
            if has_checkpoint:
                parts.append(base64.b64decode(frame.get("data", "")))
            if seq + 1 < total:
                return None
            data = b"".join(parts)
            parts.clear()
        metrics = frame.get("metrics")
        if not isinstance(metrics, dict):
            return None
        checkpoint = None
        if has_checkpoint and isinstance(frame.get("epoch"), int):
            if valid_sha256(frame.get("sha256")) and sha256_of(data) != frame["sha256"]:
                return None  # damaged on the way: dropped as a report missing a chunk is
            checkpoint = self.store.put(frame["epoch"], data, key)  # None: older than the one kept
        return self._kept(rank, key, metrics, checkpoint)

    def _receive_stored(self, rank: int, key: str, frame: Message) -> Message | None:
        """A report naming where rank 0 wrote its checkpoint (a run with a ``checkpoint_dir``)."""
        epoch, location, digest, metrics = (frame.get(name) for name in ("epoch", "location", "sha256", "metrics"))
        if (not isinstance(epoch, int) or not isinstance(location, str) or not valid_sha256(digest)
                or not isinstance(metrics, dict) or frame.get("total") != 1):
            return None
        checkpoint = self.store.record(key, Checkpoint(epoch, location=location, sha256=digest))
        return self._kept(rank, key, metrics, checkpoint)

    def _kept(self, rank: int, key: str, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> Message:
        with self._lock:
            self.metrics.setdefault(key, {})[rank] = metrics
        if self.on_report is not None:
            self.on_report(key, rank, metrics, checkpoint)
        return {"type": REPORTED}

    def fetch(self, frame: Message) -> list[Message]:
        """The answer to a rank asking for a key's latest checkpoint."""
        key = frame.get("key", "")
        return checkpoint_frames(self.store.latest(key) if valid_key(key) else None)
