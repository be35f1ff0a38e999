"""What the ranks report: the run's metrics and checkpoints, and each attempt's receiver of their frames.

``RunReports`` (one per run, shared by its attempts) keeps what survives an attempt: the checkpoint
store, the metrics by key and rank, the report listener, and the keys each rank used (capped).
``AttemptReceiver`` (one per attempt, from ``RunReports.attempt_receiver``) takes that attempt's report
frames and fetches. A checkpoint's chunks are assembled per transfer: its random id, key, epoch, chunk
count and sha256 are fixed by its chunk 0, every later chunk must match them and come in order, else
the transfer is dropped (named in one warning) and never completes; a rank has one chunked transfer in
flight at a time (a new one drops the old), so the bytes held per rank are capped by the caps below.
When a report's last frame arrives the checkpoint is checked against its sha256 and kept in the store
(before the rank is answered, so an acknowledged checkpoint survives the driver's next failure), its
metrics are kept, and the run's listener is told. With a ``checkpoint_dir`` the report names where rank 0
wrote the checkpoint instead (location and sha256): the store notes it, the bytes stay in storage.

Every report's last frame and every fetch is answered: the result, or a failure frame with the reason
(``final`` when no retry can help: the driver's disk refused the checkpoint, a cap was reached). When the
attempt ends its receiver is closed: a chunk, a report or a fetch of an ended attempt is refused, so
nothing of it completes in the next attempt.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from sparkml_mnist.launcher.channel import REPLY_TIMEOUT_S
from sparkml_mnist.launcher.checkpoints import CheckpointError, sha256_of, valid_sha256
from sparkml_mnist.launcher.driver.store import CheckpointStore
from sparkml_mnist.launcher.protocol import (
    CHIEF_RANK, CHUNK_BYTES, FETCH_FAILED, MAX_CHECKPOINT_BYTES, MAX_CHUNKS, MAX_FETCHES_PER_KEY,
    MAX_KEYS_PER_RANK, REPORT_FAILED, REPORTED, Checkpoint, Message, checkpoint_frames, failure_answer,
    valid_key, valid_transfer_id,
)

logger = logging.getLogger(__name__)

# on_report(key, rank, metrics, checkpoint or None), on a channel thread, once the report is kept
ReportListener = Callable[[str, int, dict[str, Any], "Checkpoint | None"], None]

# How long closing a receiver waits for a report being kept (a checkpoint being written) to finish; the
# rank itself waits no longer than this for its answer.
CLOSE_WAIT_S = REPLY_TIMEOUT_S
FIXED_FIELDS = ("key", "epoch", "total", "sha256")  # what chunk 0 fixes for every later chunk of a transfer


def _whose(key: str) -> str:
    return repr(key) if key else "the run"


class RunReports:
    """``metrics[key][rank]``: the last metrics each rank reported under each key; checkpoints in ``store``."""

    def __init__(self, store: CheckpointStore, on_report: ReportListener | None = None) -> None:
        self.store = store
        self.on_report = on_report
        self.metrics: dict[str, dict[int, dict[str, Any]]] = {}
        self._keys: dict[int, set[str]] = {}  # the keys each rank reported or fetched, over the whole run
        self._lock = threading.Lock()

    def attempt_receiver(self, size: int, attempt: int = 0) -> AttemptReceiver:
        """A receiver for one attempt of ``size`` ranks: its own chunk assembly, closed when it ends."""
        return AttemptReceiver(self, size, attempt)

    def admit_key(self, rank: int, key: str) -> str | None:
        """None when ``rank`` may use ``key``; else why not (the cap on distinct keys per rank)."""
        with self._lock:
            keys = self._keys.setdefault(rank, set())
            if key in keys:
                return None
            if len(keys) >= MAX_KEYS_PER_RANK:
                return (f"rank {rank} already used {MAX_KEYS_PER_RANK} keys in this run, the most one rank may "
                        f"report or fetch (MAX_KEYS_PER_RANK); key {key!r} is refused: report under fewer keys")
            keys.add(key)
            return None

    def keep(self, rank: int, key: str, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> Message:
        """Keep a report whose checkpoint (if any) is already in the store; tell the listener; the ack."""
        with self._lock:
            self.metrics.setdefault(key, {})[rank] = metrics
        if self.on_report is not None:
            try:
                self.on_report(key, rank, metrics, checkpoint)
            except Exception:  # the report is kept: the rank is answered so; the listener's error is logged
                logger.exception("the run's report listener failed on rank %d's report of %s", rank, _whose(key))
        return {"type": REPORTED}


@dataclass
class _Transfer:
    """One report in flight: what its chunk 0 fixed, the chunks so far, and a refusal to answer at its end."""

    id: str
    rank: int
    key: str
    epoch: int | None
    total: int
    sha256: str | None
    parts: list[bytes] = field(default_factory=list)
    received: int = 0
    size: int = 0
    refusal: Message | None = None  # refused at chunk 0 (a cap): its chunks are checked, not kept

    @property
    def name(self) -> str:
        what = f"checkpoint of {_whose(self.key)} after epoch {self.epoch}" if self.epoch is not None else \
            f"report of {_whose(self.key)}"
        return f"rank {self.rank}'s {what} (transfer {self.id[:8]})"

    def add(self, frame: Message, seq: int) -> str | None:
        """Take chunk ``seq``; None when it belongs, else why the transfer is dropped."""
        if seq != self.received:
            return f"its chunk {seq + 1} of {self.total} came where chunk {self.received + 1} was due"
        for name in FIXED_FIELDS:
            if frame.get(name) != getattr(self, name):
                return f"its chunk {seq + 1} names another {name} than its chunk 1"
        self.received += 1
        if self.epoch is None:
            return None
        try:
            chunk = base64.b64decode(frame.get("data", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            return f"its chunk {seq + 1} is not base64"
        if len(chunk) > CHUNK_BYTES:
            return f"its chunk {seq + 1} holds {len(chunk)} bytes, more than a chunk's {CHUNK_BYTES}"
        self.size += len(chunk)
        if self.size > MAX_CHECKPOINT_BYTES:  # cannot happen within MAX_CHUNKS chunks: kept as the cap itself
            return f"it exceeds MAX_CHECKPOINT_BYTES={MAX_CHECKPOINT_BYTES}"
        if self.refusal is None:
            self.parts.append(chunk)
        return None


class AttemptReceiver:
    """One attempt's side of the reports: its ranks' transfers in flight and their fetches.

    ``refusal``: the reason of the first final failure answer it gave (the attempt's failure is then
    final: the launcher does not retry it)."""

    def __init__(self, reports: RunReports, size: int, attempt: int = 0) -> None:
        self.reports = reports
        self.ranks = range(size)
        self.attempt = attempt
        self.refusal: str | None = None
        self._transfers: dict[int, _Transfer] = {}  # the chunked transfer in flight, per rank
        self._dropped: dict[int, tuple[str, str]] = {}  # per rank: the last dropped transfer's id, and why
        self._fetches: dict[tuple[int, str], int] = {}
        self._closed = False
        self._keeping = 0  # reports being kept (written to the store) now
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    @property
    def store(self) -> CheckpointStore:
        return self.reports.store

    def close(self) -> None:
        """The attempt ended: refuse everything from now on, drop what is in flight, and wait (up to
        ``CLOSE_WAIT_S``) for a report being kept to finish, so none is kept once the next attempt starts."""
        with self._lock:
            self._closed = True
            self._transfers.clear()
            self._idle.wait_for(lambda: self._keeping == 0, timeout=CLOSE_WAIT_S)

    # -- reports ----------------------------------------------------------------------------------

    def receive(self, rank: int, frame: Message) -> Message | None:
        """One report frame of ``rank``: the answer to a report's last frame (the ack, or a failure frame
        with the reason), None to any other frame."""
        transfer_id, key, seq, total = (frame.get(name) for name in ("transfer", "key", "seq", "total"))
        if (not valid_transfer_id(transfer_id) or not valid_key(key) or isinstance(seq, bool) or isinstance(total, bool)
                or not isinstance(seq, int) or not isinstance(total, int) or not 0 <= seq < total):
            return None  # not a report frame this protocol sends: nothing to answer it with
        last = seq + 1 == total
        with self._lock:
            if self._closed:
                return self._failed(f"rank {rank}'s report of {_whose(key)} reached attempt {self.attempt} after it "
                                    "ended; the next attempt takes its reports afresh", final=False) if last else None
            if seq == 0:
                transfer = self._start(rank, transfer_id, key, total, frame)
                if isinstance(transfer, dict):
                    return transfer if last else None
                if total > 1:
                    replaced = self._transfers.get(rank)
                    if replaced is not None:
                        self._drop(replaced, f"another transfer ({transfer_id[:8]}) began before its chunk "
                                             f"{replaced.received + 1} of {replaced.total}")
                    self._transfers[rank] = transfer
            else:
                transfer = self._transfers.get(rank)  # type: ignore[assignment]
                if transfer is None or transfer.id != transfer_id:  # never taken into another transfer
                    if not last:
                        return None
                    dropped_id, why = self._dropped.get(rank, ("", "an earlier chunk of it never arrived"))
                    if dropped_id != transfer_id:
                        why = "an earlier chunk of it never arrived"
                    return self._failed(f"rank {rank}'s report of {_whose(key)} (transfer {transfer_id[:8]}) was "
                                        f"dropped by the driver: {why}", final=False)
            problem = transfer.add(frame, seq)
            if problem is not None:
                self._drop(transfer, problem)
                return self._failed(f"{transfer.name} was dropped: {problem}", final=False) if last else None
            if not last:
                return None
            if self._transfers.get(rank) is transfer:  # a one-frame report leaves a transfer in flight alone
                del self._transfers[rank]
            if transfer.refusal is not None:
                return transfer.refusal
            self._keeping += 1
        try:
            return self._keep(transfer, frame.get("metrics"), frame)
        finally:
            with self._lock:
                self._keeping -= 1
                self._idle.notify_all()

    def _drop(self, transfer: _Transfer, why: str) -> None:
        """``transfer`` never completes: named in one warning; its rank is told why at its last frame."""
        if self._transfers.get(transfer.rank) is transfer:
            del self._transfers[transfer.rank]
        self._dropped[transfer.rank] = (transfer.id, why)
        logger.warning("%s dropped: %s", transfer.name, why)

    def _start(self, rank: int, transfer_id: str, key: str, total: int, frame: Message) -> _Transfer | Message:
        """A transfer's chunk 0: what it fixes, checked; a failure answer when it cannot be a report at all."""
        epoch, digest = frame.get("epoch"), frame.get("sha256")
        has_checkpoint = "epoch" in frame
        if has_checkpoint and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0
                               or not valid_sha256(digest)):
            return self._failed(f"rank {rank}'s checkpoint of {_whose(key)} names no epoch or sha256 in its "
                                "chunk 1", final=False)
        if not has_checkpoint and (total != 1 or "location" in frame):
            return self._failed(f"rank {rank}'s report of {_whose(key)} without a checkpoint must be one frame",
                                final=False)
        transfer = _Transfer(transfer_id, rank, key, epoch if has_checkpoint else None, total,
                             digest if has_checkpoint else None)
        refusal = None
        if has_checkpoint and rank != CHIEF_RANK:
            refusal = f"only rank {CHIEF_RANK} reports checkpoints; rank {rank} attached one to {_whose(key)}"
        elif total > MAX_CHUNKS:
            refusal = (f"{transfer.name} is {total} chunks of {CHUNK_BYTES} bytes, over the "
                       f"MAX_CHECKPOINT_BYTES={MAX_CHECKPOINT_BYTES} ({MAX_CHUNKS} chunks) the driver holds for one "
                       "transfer: give the run a checkpoint_dir (rank 0 then writes it to storage itself) or make "
                       "the checkpoint smaller")
        else:
            refusal = self.reports.admit_key(rank, key)
        if refusal is not None:
            logger.warning("%s refused: %s", transfer.name, refusal)
            transfer.refusal = self._failed(refusal, final=True)
        return transfer

    def _keep(self, transfer: _Transfer, metrics: Any, frame: Message) -> Message:
        """A whole transfer: its checkpoint checked and stored, then its metrics kept; or why not."""
        if not isinstance(metrics, dict):
            return self._failed(f"{transfer.name} carries no metrics (a dict) on its last frame", final=False)
        if "location" in frame:
            return self._keep_stored(transfer, metrics, frame.get("location"))
        checkpoint = None
        if transfer.epoch is not None:
            data = b"".join(transfer.parts)
            if sha256_of(data) != transfer.sha256:
                logger.warning("%s dropped: it arrived damaged (its sha256 differs)", transfer.name)
                return self._failed(f"{transfer.name} arrived damaged: its sha256 differs from the one rank "
                                    f"{transfer.rank} sent", final=False)
            try:
                checkpoint = self.store.put(transfer.epoch, data, transfer.key)  # None: not newer than the one kept
            except CheckpointError as error:
                logger.error("%s not kept: %s", transfer.name, error)
                return self._failed(str(error), final=True)
        return self.reports.keep(transfer.rank, transfer.key, metrics, checkpoint)

    def _keep_stored(self, transfer: _Transfer, metrics: dict[str, Any], location: Any) -> Message:
        """A report naming where rank 0 wrote its checkpoint (a run with a ``checkpoint_dir``)."""
        if transfer.epoch is None or not isinstance(location, str) or transfer.total != 1:
            return self._failed(f"{transfer.name} names no stored checkpoint", final=False)
        checkpoint = self.store.record(transfer.key, Checkpoint(transfer.epoch, location=location,
                                                                sha256=transfer.sha256))
        return self.reports.keep(transfer.rank, transfer.key, metrics, checkpoint)

    # -- fetches ----------------------------------------------------------------------------------

    def fetch(self, rank: int, frame: Message) -> list[Message]:
        """The answer to ``rank`` asking for a key's latest checkpoint: its frames (one saying there is
        none), or a failure frame naming why it is refused."""
        key = frame.get("key", "")
        with self._lock:
            if self._closed:
                return [self._failed(f"rank {rank} asked attempt {self.attempt} for a checkpoint after it ended",
                                     final=False, kind=FETCH_FAILED)]
            if rank not in self.ranks:
                return [self._failed(f"rank {rank} is not a rank of attempt {self.attempt}", final=True,
                                     kind=FETCH_FAILED)]
            if not valid_key(key):
                return [self._failed(f"rank {rank} asked for the checkpoint of {key!r}, which is not a key",
                                     final=True, kind=FETCH_FAILED)]
            refusal = self.reports.admit_key(rank, key)
            count = self._fetches[(rank, key)] = self._fetches.get((rank, key), 0) + 1
            if refusal is None and count > MAX_FETCHES_PER_KEY:
                refusal = (f"rank {rank} asked for the checkpoint of {_whose(key)} more than MAX_FETCHES_PER_KEY="
                           f"{MAX_FETCHES_PER_KEY} times in attempt {self.attempt}: a rank needs it once, when "
                           "it starts")
            if refusal is not None:
                logger.warning("a fetch refused: %s", refusal)
                return [self._failed(refusal, final=True, kind=FETCH_FAILED)]
        try:
            return checkpoint_frames(self.store.latest(key))
        except CheckpointError as error:  # the kept file changed or went away since it was checked
            logger.error("rank %d's fetch of %s not answered with a checkpoint: %s", rank, _whose(key), error)
            return [self._failed(str(error), final=True, kind=FETCH_FAILED)]

    def _failed(self, reason: str, final: bool, kind: str = REPORT_FAILED) -> Message:
        """A failure answer; the first final one is kept as this attempt's ``refusal``."""
        if final and self.refusal is None:
            self.refusal = reason
        return failure_answer(kind, reason, final)
