"""What travels between a rank and the driver, as typed messages over the channel.

A rank sends a ``Heartbeat`` every ``heartbeat_interval_s`` (the same type the driver's watchdog and
live board read), and ``report``s: metrics under a key, with rank 0's ``Checkpoint`` attached when it
has one: where rank 0 wrote it (location and sha256) when the run has a ``checkpoint_dir``, else its
bytes (chunked below the channel's frame cap). Every frame of one report carries the same random
transfer id, key, epoch, chunk count and sha256, so the driver can tell one transfer's chunks from
another's. The driver answers a report's last frame (and a fetch) with the result or with a failure
frame giving the reason, never with silence. The driver parses each message once, here, at the
boundary; what it passes on is typed.
"""

from __future__ import annotations

import base64
import re
import secrets
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
REPORT_FAILED = "report-failed"  # the driver did not keep a report: {"reason": ..., "final": bool}
FETCH, CHECKPOINT = "fetch_checkpoint", "checkpoint"  # a rank asks for a key's latest checkpoint; the answer
FETCH_FAILED = "fetch-failed"  # the driver did not answer a fetch with a checkpoint: {"reason", "final"}

CHUNK_BYTES = 512 * 1024  # raw bytes a frame; base64 makes it ~700 KB, below the channel's frame cap
TRANSFER_ID_BYTES = 16  # a report's random id: its chunks are never taken into another report
# Caps on what one authenticated rank may make the driver hold (refused with a failure answer naming
# the cap, never dropped silently). A checkpoint crosses the driver's memory whole before it is written:
# a larger one belongs in a checkpoint_dir (rank 0 then writes it to storage itself).
MAX_CHECKPOINT_BYTES = 1 << 30  # one transfer's bytes, and so one rank's bytes in flight (one at a time)
MAX_CHUNKS = MAX_CHECKPOINT_BYTES // CHUNK_BYTES
MAX_KEYS_PER_RANK = 1024  # distinct keys a rank reports or fetches over a run (the job: two per variant)
MAX_FETCHES_PER_KEY = 8  # fetches of one key by one rank in one attempt (a rank needs it once, at its start)
CHIEF_RANK = 0  # the only rank whose reports may carry a checkpoint
DEFAULT_KEY = ""
MAX_HOST_CHARS = 255
MAX_LABEL_CHARS = 100
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # a key names a folder on the driver
_TRANSFER_ID = re.compile(r"^[0-9a-f]{%d}$" % (2 * TRANSFER_ID_BYTES))

Message = dict[str, Any]


def valid_key(key: Any) -> bool:
    return key == DEFAULT_KEY or (isinstance(key, str) and bool(_KEY.match(key)))


def new_transfer_id() -> str:
    return secrets.token_hex(TRANSFER_ID_BYTES)


def valid_transfer_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_TRANSFER_ID.match(value))


def failure_answer(kind: str, reason: str, final: bool) -> Message:
    """The driver's answer to a report (``REPORT_FAILED``) or fetch (``FETCH_FAILED``) it did not serve.
    ``final``: a retry would fail the same way (the driver's disk, a cap), so the launcher makes none."""
    return {"type": kind, "reason": reason, "final": final}


def report_answered(frame: Message) -> bool:
    return frame.get("type") in (REPORTED, REPORT_FAILED)


def fetch_answered(frame: Message) -> bool:
    return frame.get("type") == FETCH_FAILED or last_checkpoint_frame(frame)


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


def report_frames(key: str, metrics: dict[str, Any], checkpoint: Checkpoint | None,
                  transfer: str | None = None) -> Iterator[Message]:
    """A report as frames, the metrics on the last one (which is answered): one frame naming where a
    checkpoint kept in storage is, or the checkpoint's chunks. Every frame carries the transfer id, key,
    chunk count and, with a checkpoint, its epoch and sha256: the driver fixes them at chunk 0."""
    transfer = transfer if transfer is not None else new_transfer_id()
    if checkpoint is not None and checkpoint.location is not None:
        yield {"type": REPORT, "transfer": transfer, "key": key, "seq": 0, "total": 1, "epoch": checkpoint.epoch,
               "location": checkpoint.location, "sha256": checkpoint.sha256, "metrics": metrics}
        return
    data = checkpoint.data if checkpoint is not None else b""
    digest = sha256_of(data) if checkpoint is not None else None
    chunks = _chunks(data)
    for seq, chunk in enumerate(chunks):
        frame: Message = {"type": REPORT, "transfer": transfer, "key": key, "seq": seq, "total": len(chunks)}
        if checkpoint is not None:
            frame.update(epoch=checkpoint.epoch, sha256=digest, data=base64.b64encode(chunk).decode("ascii"))
        if seq + 1 == len(chunks):
            frame["metrics"] = metrics
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
