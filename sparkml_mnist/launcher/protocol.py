"""What travels between a rank and the driver, as typed messages over the channel.

A rank sends a ``Heartbeat`` every ``heartbeat_interval_s`` (the same type the driver's watchdog and
live board read), and ``report``s: metrics under a key, with rank 0's ``Checkpoint`` attached when it
has one: where rank 0 wrote it (location and sha256) when the run has a ``checkpoint_dir``, else its
bytes (chunked below the channel's frame cap, with their sha256). The driver parses each message once,
here, at the boundary; what it passes on is typed.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, fields
from typing import Any, Iterator

from sparkml_mnist.errors import LaunchError
from sparkml_mnist.launcher.channel import clean_line
from sparkml_mnist.launcher.checkpoints import Checkpoint, sha256_of, valid_sha256

HEARTBEAT = "heartbeat"
TASK_STARTED = "task_started"  # a barrier task reached the driver, before its rank's process exists
LOG = "log"
RANK_FAILED = "rank_failed"  # a rank's own report of its exception, sent the moment it happens
REPORT, REPORTED = "report", "reported"  # a rank's report (in chunks when it carries a checkpoint); the ack
FETCH, CHECKPOINT = "fetch_checkpoint", "checkpoint"  # a rank asks for a key's latest checkpoint; the answer

CHUNK_BYTES = 512 * 1024  # raw bytes a frame; base64 makes it ~700 KB, below the channel's frame cap
CHIEF_RANK = 0  # the only rank whose reports may carry a checkpoint
DEFAULT_KEY = ""
MAX_HOST_CHARS = 255
MAX_LABEL_CHARS = 100
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # a key names a folder on the driver

Message = dict[str, Any]


def valid_key(key: Any) -> bool:
    return key == DEFAULT_KEY or (isinstance(key, str) and bool(_KEY.match(key)))


@dataclass
class Heartbeat:
    """One rank's counters: every change of ``progress`` is progress to the watchdog; the rest feeds
    the live board (step, epoch, loss, images/s) and the report's step rates."""

    host: str = "?"
    pid: int | None = None
    progress: int = 0  # moves on every training step and every report
    steps: int = 0
    examples: int = 0
    first_step_at: float | None = None
    label: str | None = None  # what the rank is training now (the job: a variant)
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    fit_steps: int = 0  # the current fit's steps, examples and first step: its images/s
    fit_examples: int = 0
    fit_started_at: float | None = None
    done: bool = False

    def to_message(self) -> Message:
        return {"type": HEARTBEAT, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_message(cls, message: Message) -> Heartbeat:
        """A rank's heartbeat frame, each field checked for its type (a wrong one is left at its default)."""
        beat = cls()
        for name in ("progress", "steps", "examples", "fit_steps", "fit_examples", "epoch", "epochs", "pid"):
            value = message.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(beat, name, value)
        for name in ("first_step_at", "fit_started_at", "loss"):
            value = message.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(beat, name, float(value))
        if isinstance(message.get("host"), str):
            beat.host = clean_line(message["host"])[:MAX_HOST_CHARS]
        if isinstance(message.get("label"), str):
            beat.label = clean_line(message["label"])[:MAX_LABEL_CHARS]
        beat.done = message.get("done") is True
        return beat


def _chunks(data: bytes) -> list[bytes]:
    """``data`` in frame-sized pieces; at least one (empty data is one empty chunk)."""
    return [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]


def report_frames(key: str, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> Iterator[Message]:
    """A report as frames, the metrics on the last one (which is answered): one frame naming where a
    checkpoint kept in storage is, or the checkpoint's chunks and, on the last, their sha256."""
    if checkpoint is not None and checkpoint.location is not None:
        yield {"type": REPORT, "key": key, "seq": 0, "total": 1, "epoch": checkpoint.epoch,
               "location": checkpoint.location, "sha256": checkpoint.sha256, "metrics": metrics}
        return
    data = checkpoint.data if checkpoint is not None else b""
    chunks = _chunks(data)
    for seq, chunk in enumerate(chunks):
        frame: Message = {"type": REPORT, "key": key, "seq": seq, "total": len(chunks)}
        if checkpoint is not None:
            frame["epoch"] = checkpoint.epoch
            frame["data"] = base64.b64encode(chunk).decode("ascii")
        if seq + 1 == len(chunks):
            frame["metrics"] = metrics
            if checkpoint is not None:
                frame["sha256"] = sha256_of(data)
        yield frame


def checkpoint_frames(checkpoint: Checkpoint | None) -> list[Message]:
    """The driver's answer to a fetch: the checkpoint in chunks, or one frame saying there is none."""
    if checkpoint is None:
        return [{"type": CHECKPOINT, "epoch": None, "seq": 0, "total": 1}]
    data = checkpoint.data
    chunks = _chunks(data)
    frames = [{"type": CHECKPOINT, "epoch": checkpoint.epoch, "seq": seq, "total": len(chunks),
               "data": base64.b64encode(chunk).decode("ascii")} for seq, chunk in enumerate(chunks)]
    frames[-1]["sha256"] = sha256_of(data)
    return frames


def last_checkpoint_frame(frame: Message) -> bool:
    return frame.get("type") == CHECKPOINT and int(frame.get("seq", 0)) + 1 >= int(frame.get("total", 0))


def checkpoint_from_frames(frames: list[Message]) -> Checkpoint | None:
    first = frames[0]
    if first.get("epoch") is None:
        return None
    data = b"".join(base64.b64decode(frame["data"]) for frame in frames if frame.get("type") == CHECKPOINT)
    expected = frames[-1].get("sha256")
    if valid_sha256(expected) and sha256_of(data) != expected:
        raise LaunchError(f"the checkpoint of epoch {first['epoch']} arrived from the driver damaged (its sha256 "
                          "differs from the driver's)")
    return Checkpoint(epoch=int(first["epoch"]), data=data)
