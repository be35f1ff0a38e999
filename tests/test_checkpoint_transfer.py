"""Checkpoints crossing the channel, and what the driver holds for them (the integrity half of the issue).

In-process, through an attempt's receiver as the channel feeds it: a transfer's key, epoch, chunk count
and sha256 are fixed by its chunk 0 and its random id, so two transfers never complete as one; an ended
attempt's receiver completes nothing; epochs only go up and a failed write leaves no file of its own;
a driver's disk that refuses a checkpoint is answered at once with the reason, and the rank raises an
error that is not retried; caps on a transfer's bytes, on keys per rank and on fetches are refusals
naming the cap. One launched run (np=2) shows the failing disk end to end: one attempt, the clear
error, and heartbeats flowing while rank 0 waited for the driver's answer.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pyspark import cloudpickle

from sparkml_mnist.errors import LaunchError
from sparkml_mnist.launcher import checkpoints
from sparkml_mnist.launcher.checkpoints import Checkpoint, CheckpointError, CheckpointFiles, sha256_of
from sparkml_mnist.launcher.driver import attempt as attempt_module
from sparkml_mnist.launcher.driver import reports as reports_module
from sparkml_mnist.launcher.driver.reports import RunReports
from sparkml_mnist.launcher.driver.store import CheckpointStore
from sparkml_mnist.launcher.failures import (
    EXCEPTION, REFUSED, RankError, RankFailedError, ReportRefusedError, error_kind, is_final,
)
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.protocol import (
    CHUNK_BYTES, FETCH_FAILED, REPORT_FAILED, REPORTED, checkpoint_from_frames, report_frames,
)
from sparkml_mnist.launcher.rank import context as context_module
from sparkml_mnist.launcher.rank.context import RankContext
from sparkml_mnist.launcher.spec import LaunchSpec

cloudpickle.register_pickle_by_value(sys.modules[__name__])

KEY = "variant1"
SIZE = 2
LOOPBACK = "127.0.0.1"
SECRET = "s" * 64
ID_A, ID_B = "a" * 32, "b" * 32
WAIT_S = 30.0  # how long a blocked step is waited for before the test gives up on it (not an assertion)
FULL_DISK = os.strerror(errno.ENOSPC)
BEAT_POLL_S = 0.1


def three_chunks(fill: int) -> bytes:
    return bytes([fill]) * (2 * CHUNK_BYTES + 10)


def frames_of(epoch: int, data: bytes, transfer: str, key: str = KEY, metrics: dict | None = None) -> list[dict]:
    return list(report_frames(key, metrics or {"epoch": epoch}, Checkpoint(epoch, data), transfer))


def feed(receiver: reports_module.AttemptReceiver, rank: int, frames: list[dict]) -> list[dict | None]:
    return [receiver.receive(rank, frame) for frame in frames]


def files_in(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


class FullDisk(CheckpointFiles):
    """The driver's folder on a disk that fills while a checkpoint is written: part of the file (the
    data file, or its manifest once the data is in place) lands under its temporary name, then the
    write fails with ENOSPC (as a real full disk does)."""

    def __init__(self, location: Path, fail_from_epoch: int = 0, failing: str = checkpoints.DATA_SUFFIX) -> None:
        super().__init__(location)
        self.fail_from_epoch = fail_from_epoch
        self.failing = failing

    def _put(self, folder: str, name: str, data: bytes) -> None:
        if int(name[len("epoch-"):].split(".")[0]) < self.fail_from_epoch or not name.endswith(self.failing):
            super()._put(folder, name, data)
            return
        with open(f"{folder}/.{name}{checkpoints.PARTIAL_SUFFIX}", "wb") as out:
            out.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, FULL_DISK)


class FakeChannel:
    """A rank's channel that answers every request with ``answer`` and keeps what was sent."""

    disabled = False

    def __init__(self, answer: dict) -> None:
        self.answer = answer
        self.sent: list[dict] = []

    def send(self, frame: dict) -> bool:
        self.sent.append(frame)
        return True

    def request(self, frame: dict, replies: Any) -> list[dict]:
        self.sent.append(frame)
        assert replies(self.answer)
        return [self.answer]


def rank_context(rank: int, channel: Any) -> RankContext:
    launch = LaunchSpec(size=SIZE, backend="tf", policy=FailurePolicy(), driver_host=LOOPBACK, driver_port=1,
                        secret=SECRET)
    return RankContext(spec=launch.for_rank(rank, [LOOPBACK] * SIZE, [0] * SIZE, []), channel=channel)


# -- one transfer's chunks, and only its own -------------------------------------------------------------


def test_interleaved_transfers_never_complete_as_one_checkpoint(tmp_path: Path, caplog) -> None:
    store = CheckpointStore(tmp_path)
    receiver = RunReports(store).attempt_receiver(SIZE)
    a, b = frames_of(4, three_chunks(0xAA), ID_A), frames_of(5, three_chunks(0xBB), ID_B)
    assert [frame["transfer"] for frame in a] == [ID_A] * 3 and all(frame["sha256"] for frame in a)
    # A's head, then B's last chunk (B's chunk 0 and 1 lost): before, this completed as epoch 5 holding A's head.
    answers = feed(receiver, 0, a[:2] + b[2:])
    assert answers[:2] == [None, None] and answers[2]["type"] == REPORT_FAILED and not answers[2]["final"]
    assert f"transfer {ID_B[:8]}" in answers[2]["reason"] and store.latest(KEY) is None
    # B starts while A is in flight: A is dropped (named once), B completes whole, A's tail is refused.
    receiver = RunReports(store).attempt_receiver(SIZE)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=reports_module.__name__):
        answers = feed(receiver, 0, [a[0], b[0], a[1], a[2], b[1], b[2]])
    assert answers[:3] == [None, None, None] and answers[5] == {"type": REPORTED}
    assert answers[3]["type"] == REPORT_FAILED and "another transfer" in answers[3]["reason"]
    kept = store.latest(KEY)
    assert kept is not None and (kept.epoch, kept.data) == (5, three_chunks(0xBB))
    assert caplog.text.count(f"(transfer {ID_A[:8]}) dropped") == 1
    metrics_only, = report_frames("scored", {"n": 1}, None)  # a one-frame report leaves a transfer alone
    assert feed(RunReports(store).attempt_receiver(SIZE), 0, [a[0], metrics_only, a[1], a[2]])[1:] == \
        [{"type": REPORTED}, None, {"type": REPORTED}]


@pytest.mark.parametrize("field,value", [("key", "other"), ("epoch", 6), ("total", 4), ("sha256", "0" * 64),
                                         ("seq", 2)])
def test_every_later_chunk_must_match_what_chunk_zero_fixed(tmp_path: Path, field: str, value: Any, caplog) -> None:
    store = CheckpointStore(tmp_path)
    receiver = RunReports(store).attempt_receiver(SIZE)
    a = frames_of(4, three_chunks(0xAA), ID_A)
    changed = {**a[1], field: value}  # a chunk that names another key, epoch... than chunk 0 (or skips one)
    with caplog.at_level(logging.WARNING, logger=reports_module.__name__):
        answers = feed(receiver, 0, [a[0], changed, a[2]])
    assert answers[2]["type"] == REPORT_FAILED and store.latest(KEY) is None and store.latest("other") is None
    assert caplog.text.count("dropped") == 1  # one warning for the transfer, none for its later chunks
    assert feed(receiver, 0, a)[-1] == {"type": REPORTED}  # the rank's next report goes through
    assert store.latest(KEY).data == three_chunks(0xAA)  # type: ignore[union-attr]


def test_an_ended_attempts_receiver_completes_nothing_and_the_next_starts_afresh(tmp_path: Path) -> None:
    reports = RunReports(CheckpointStore(tmp_path))
    first = reports.attempt_receiver(SIZE, attempt=1)
    a = frames_of(4, three_chunks(0xAA), ID_A)
    feed(first, 0, a[:2])
    first.close()
    second = reports.attempt_receiver(SIZE, attempt=2)
    late = first.receive(0, a[2])  # the ended attempt's connection delivers its last chunk
    assert late is not None and late["type"] == REPORT_FAILED and "attempt 1 after it ended" in late["reason"]
    assert second.receive(0, a[2])["type"] == REPORT_FAILED  # type: ignore[index]  # not in flight here
    fetched = first.fetch(1, {"type": "fetch_checkpoint", "key": KEY})
    assert fetched[0]["type"] == FETCH_FAILED and "after it ended" in fetched[0]["reason"]
    assert reports.store.latest(KEY) is None and reports.metrics == {}
    assert feed(second, 0, frames_of(5, b"after 5", ID_B))[-1] == {"type": REPORTED}
    assert checkpoint_from_frames(second.fetch(1, {"key": KEY})).data == b"after 5"  # type: ignore[union-attr]


# -- the store: epochs only go up, the previous checkpoint kept until the new one checks out -------------


@pytest.mark.parametrize("failing", [checkpoints.DATA_SUFFIX, checkpoints.MANIFEST_SUFFIX])
def test_a_failed_write_leaves_no_file_and_the_previous_checkpoint_stays(tmp_path: Path, failing: str) -> None:
    store = CheckpointStore(FullDisk(tmp_path, fail_from_epoch=2, failing=failing))
    store.put(1, b"after 1", KEY)
    with pytest.raises(CheckpointError) as caught:
        store.put(2, b"after 2", KEY)
    message = str(caught.value)
    assert f"in its folder {tmp_path} ({'[Errno 28] ' + FULL_DISK})" in message and "free space" in message
    assert files_in(tmp_path) == [f"{KEY}/epoch-000001.ckpt", f"{KEY}/epoch-000001.json"]  # no partial left
    assert store.latest(KEY).data == b"after 1"  # type: ignore[union-attr]
    assert CheckpointStore(tmp_path).epochs() == {KEY: 1}  # --resume finds the previous one


def test_a_slower_older_write_never_hides_or_removes_a_newer_one(tmp_path: Path, monkeypatch) -> None:
    store = CheckpointStore(tmp_path)
    writing_5, release_5 = threading.Event(), threading.Event()
    write = CheckpointFiles.write

    def slow_write(self: CheckpointFiles, key: str, epoch: int, data: bytes) -> Checkpoint:
        if epoch == 5:
            writing_5.set()
            release_5.wait(WAIT_S)
        return write(self, key, epoch, data)

    monkeypatch.setattr(CheckpointFiles, "write", slow_write)
    older = threading.Thread(target=store.put, args=(5, b"after 5", KEY))
    newer = threading.Thread(target=store.put, args=(6, b"after 6", KEY))
    older.start()
    assert writing_5.wait(WAIT_S)
    newer.start()
    newer.join(timeout=1.0)  # unserialized, epoch 6 would be written now, under epoch 5's feet
    release_5.set()
    older.join(WAIT_S)
    newer.join(WAIT_S)
    assert store.latest(KEY).epoch == 6  # type: ignore[union-attr]
    assert files_in(tmp_path) == [f"{KEY}/epoch-000006.ckpt", f"{KEY}/epoch-000006.json"]


def test_the_same_epoch_again_is_the_kept_checkpoint_or_not_taken(tmp_path: Path, caplog) -> None:
    store = CheckpointStore(tmp_path)
    kept = store.put(3, b"after 3", KEY)
    assert store.put(3, b"after 3", KEY) == store.latest(KEY) and kept is not None  # a repeated report
    with caplog.at_level(logging.WARNING):
        assert store.put(3, b"other bytes", KEY) is None
    assert "after epoch 3 came after the one after epoch 3; not taken" in caplog.text
    assert CheckpointStore(tmp_path).latest(KEY).data == b"after 3"  # type: ignore[union-attr]
    files = CheckpointFiles(tmp_path)  # rank 0 writing a checkpoint_dir itself: never replaced in place
    with pytest.raises(CheckpointError, match="already holds another checkpoint after epoch 3"):
        files.write(KEY, 3, b"other bytes")
    assert files.write(KEY, 3, b"after 3").sha256 == sha256_of(b"after 3")


def test_a_kept_file_whose_sha256_no_longer_matches_is_never_served_nor_resumed_from(tmp_path: Path) -> None:
    reports = RunReports(CheckpointStore(tmp_path))
    receiver = reports.attempt_receiver(SIZE)
    assert feed(receiver, 0, frames_of(2, b"after 2", ID_A))[-1] == {"type": REPORTED}
    (tmp_path / KEY / "epoch-000002.ckpt").write_bytes(b"after 2, flipped")
    answer, = receiver.fetch(1, {"key": KEY})
    assert answer["type"] == FETCH_FAILED and answer["final"]
    assert f"{tmp_path / KEY / 'epoch-000002.ckpt'}: corrupt checkpoint" in answer["reason"]
    resumed = CheckpointStore(tmp_path)  # the driver again, --resume
    assert resumed.latest(KEY) is None and resumed.epochs() == {}


# -- the driver's disk refuses a checkpoint ----------------------------------------------------------------


def test_a_failing_driver_disk_is_answered_at_once_with_the_reason(tmp_path: Path) -> None:
    reports = RunReports(CheckpointStore(FullDisk(tmp_path)))
    receiver = reports.attempt_receiver(SIZE)
    answers = feed(receiver, 0, frames_of(1, three_chunks(0xAA), ID_A))
    assert answers[:2] == [None, None]
    failed = answers[2]
    assert failed is not None and failed["type"] == REPORT_FAILED and failed["final"] is True
    assert str(tmp_path) in failed["reason"] and FULL_DISK in failed["reason"]
    assert receiver.refusal == failed["reason"] and reports.metrics == {}
    assert files_in(tmp_path) == []  # the partial data file is gone


def test_the_rank_raises_the_drivers_reason_final_only_when_no_retry_can_help() -> None:
    refused = {"type": REPORT_FAILED, "reason": "the driver cannot keep ... (No space left on device)", "final": True}
    chief = rank_context(0, FakeChannel(refused))
    with pytest.raises(ReportRefusedError, match=r"^rank 0: the driver did not keep the report of 'variant1': "
                                                 r"the driver cannot keep \.\.\. \(No space left on device\)$"):
        chief.report(KEY, {"epoch": 1}, Checkpoint(1, b"after 1"))
    dropped = {"type": REPORT_FAILED, "reason": "an earlier chunk of it never arrived", "final": False}
    with pytest.raises(LaunchError) as caught:
        rank_context(0, FakeChannel(dropped)).report(KEY, {"epoch": 1}, Checkpoint(1, b"after 1"))
    assert not isinstance(caught.value, ReportRefusedError)
    with pytest.raises(ReportRefusedError, match="did not send the checkpoint of 'variant1': over a cap"):
        capped = {"type": FETCH_FAILED, "reason": "over a cap", "final": True}
        rank_context(1, FakeChannel(capped)).latest_checkpoint(KEY)
    try:  # a function that wraps the error still fails as refused: the launcher does not retry it
        try:
            chief.report(KEY, {"epoch": 1}, Checkpoint(1, b"after 1"))
        except LaunchError as error:
            raise RuntimeError("training failed") from error
    except RuntimeError as wrapped:
        assert error_kind(wrapped) == REFUSED and error_kind(RuntimeError("other")) == EXCEPTION
    failure = RankFailedError(0, "host", RankError(kind=REFUSED, error_type="ReportRefusedError", message="x"))
    assert is_final(failure) and not is_final(LaunchError("a rank crashed"))


def test_an_attempt_that_was_refused_fails_finally_even_when_the_function_hid_it(tmp_path: Path) -> None:
    receiver = RunReports(CheckpointStore(FullDisk(tmp_path))).attempt_receiver(SIZE)
    feed(receiver, 0, frames_of(1, b"after 1", ID_A))
    other = LaunchError("rank 1 on host failed: ValueError: something else")
    final = attempt_module._final_if_refused(other, receiver)
    assert isinstance(final, ReportRefusedError) and is_final(final) and FULL_DISK in str(final)
    untouched = RunReports(CheckpointStore()).attempt_receiver(SIZE)
    assert attempt_module._final_if_refused(other, untouched) is other


# -- caps -------------------------------------------------------------------------------------------------


def test_a_checkpoint_over_the_byte_cap_is_refused_naming_it_and_not_held(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(reports_module, "MAX_CHUNKS", 2)
    store = CheckpointStore(tmp_path)
    receiver = RunReports(store).attempt_receiver(SIZE)
    answers = feed(receiver, 0, frames_of(1, three_chunks(0xAA), ID_A))
    assert answers[:2] == [None, None] and answers[2]["type"] == REPORT_FAILED and answers[2]["final"]
    assert "MAX_CHECKPOINT_BYTES" in answers[2]["reason"] and "checkpoint_dir" in answers[2]["reason"]
    assert store.latest(KEY) is None and receiver._transfers == {}
    monkeypatch.setattr(context_module, "MAX_CHECKPOINT_BYTES", CHUNK_BYTES)
    channel = FakeChannel({"type": REPORTED})
    with pytest.raises(ReportRefusedError, match="over the MAX_CHECKPOINT_BYTES"):  # the rank says so first
        rank_context(0, channel).report(KEY, {}, Checkpoint(1, three_chunks(0xAA)))
    assert channel.sent == []


def test_distinct_keys_per_rank_are_capped_with_a_refusal_naming_the_cap(monkeypatch) -> None:
    monkeypatch.setattr(reports_module, "MAX_KEYS_PER_RANK", 3)
    reports = RunReports(CheckpointStore())
    receiver = reports.attempt_receiver(SIZE)

    def report(rank: int, key: str) -> dict | None:
        frame, = report_frames(key, {"n": 1}, None)
        return receiver.receive(rank, frame)

    assert [report(1, f"k{i}") for i in range(3)] == [{"type": REPORTED}] * 3
    refused = report(1, "k3")
    assert refused is not None and refused["type"] == REPORT_FAILED and refused["final"]
    assert "MAX_KEYS_PER_RANK" in refused["reason"] and "rank 1" in refused["reason"]
    assert report(1, "k0") == {"type": REPORTED} and report(0, "k3") == {"type": REPORTED}
    assert 1 not in reports.metrics["k3"]
    fetched, = receiver.fetch(1, {"key": "k4"})  # a fetch of a new key counts too
    assert fetched["type"] == FETCH_FAILED and "MAX_KEYS_PER_RANK" in fetched["reason"]
    later = reports.attempt_receiver(SIZE)  # the cap is the run's, not an attempt's
    assert later.receive(1, next(report_frames("k5", {}, None)))["type"] == REPORT_FAILED  # type: ignore[index]


def test_fetches_are_answered_only_to_the_attempts_ranks_and_capped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(reports_module, "MAX_FETCHES_PER_KEY", 2)
    store = CheckpointStore(tmp_path)
    store.put(1, b"after 1", KEY)
    receiver = RunReports(store).attempt_receiver(SIZE)
    fetched = [checkpoint_from_frames(receiver.fetch(1, {"key": KEY})) for _ in range(2)]
    assert [checkpoint.data for checkpoint in fetched if checkpoint is not None] == [b"after 1"] * 2
    third, = receiver.fetch(1, {"key": KEY})
    assert third["type"] == FETCH_FAILED and "MAX_FETCHES_PER_KEY=2" in third["reason"]
    stranger, = receiver.fetch(SIZE, {"key": KEY})
    assert stranger["type"] == FETCH_FAILED and f"rank {SIZE} is not a rank of attempt" in stranger["reason"]
    assert checkpoint_from_frames(receiver.fetch(0, {"key": KEY})).data == b"after 1"  # type: ignore[union-attr]


# -- end to end: a driver whose disk is full --------------------------------------------------------------


def reports_a_checkpoint() -> None:
    """Rank 0 reports a two-chunk checkpoint; rank 1 has nothing to do."""
    from sparkml_mnist.launcher import get_context
    from sparkml_mnist.launcher.protocol import CHUNK_BYTES

    context = get_context()
    if context.rank == 0:
        context.report("ckpt", {"epoch": 1}, Checkpoint(1, b"w" * (CHUNK_BYTES + 10)))


def test_a_full_driver_disk_ends_the_run_after_one_attempt_with_the_reason(spark, tmp_path: Path,
                                                                            monkeypatch) -> None:
    from sparkml_mnist.launcher import HorovodRunner
    from sparkml_mnist.launcher.driver.watchdog import Watchdog

    beats: list[int] = []
    beat_during_put = threading.Event()
    heartbeat = Watchdog.heartbeat

    def counted(self: Watchdog, rank: int, beat: Any) -> None:
        if rank == 0:
            beats.append(rank)
        heartbeat(self, rank, beat)

    class SlowFullDisk(FullDisk):
        def _put(self, folder: str, name: str, data: bytes) -> None:
            seen = len(beats)  # rank 0 waits for the answer now: its heartbeats must still arrive
            for _ in range(int(WAIT_S / BEAT_POLL_S)):
                if len(beats) > seen + 1:
                    beat_during_put.set()
                    break
                time.sleep(BEAT_POLL_S)
            super()._put(folder, name, data)

    monkeypatch.setattr(Watchdog, "heartbeat", counted)
    folder = tmp_path / "driver-checkpoints"
    runner = HorovodRunner(np=SIZE, spark=spark, checkpoint_dir=CheckpointStore(SlowFullDisk(folder)),
                           policy=FailurePolicy(max_retries=2, heartbeat_interval_s=0.2))
    with pytest.raises(RankFailedError) as caught:
        runner.run(reports_a_checkpoint)
    error = caught.value
    assert [attempt.outcome for attempt in error.attempts] == ["failed"]  # type: ignore[attr-defined]
    assert error.rank == 0 and error.final and error.error.error_type == "ReportRefusedError"
    assert f"in its folder {folder} ([Errno 28] {FULL_DISK})" in str(error)
    assert beat_during_put.is_set()
    assert files_in(folder) == []
