"""Checkpoints as files (no Spark, no ranks): locations and Hadoop's s3a, the plan-time probe, atomic writes
with a sha256 and a manifest, torn and corrupt files named and passed over, epochs that only go up, the
driver told only where (``checkpoint_dir``), and the job's run state keeping its own folder under it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sparkml_mnist.errors import ConfigError
from sparkml_mnist.launcher import checkpoints
from sparkml_mnist.launcher.channel import ChannelServer
from sparkml_mnist.launcher.checkpoints import (
    Checkpoint, CheckpointError, CheckpointFiles, filesystem, probe, pyarrow_uri, sha256_of,
)
from sparkml_mnist.launcher.driver.reports import RunReports
from sparkml_mnist.launcher.driver.store import CheckpointStore
from sparkml_mnist.launcher.policy import FailurePolicy
from sparkml_mnist.launcher.protocol import report_frames
from sparkml_mnist.launcher.rank.context import RankContext
from sparkml_mnist.launcher.spec import LaunchSpec

KEY = "variant1"
LOOPBACK = "127.0.0.1"
SECRET = "s" * 64


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# -- locations -------------------------------------------------------------------------------------


def test_hadoops_s3a_is_pyarrows_s3_and_paths_are_local(tmp_path: Path, monkeypatch) -> None:
    assert pyarrow_uri("s3a://bucket/runs?region=us-east-1") == "s3://bucket/runs?region=us-east-1"
    assert pyarrow_uri("s3://bucket/runs") == "s3://bucket/runs"
    monkeypatch.chdir(tmp_path)
    assert pyarrow_uri("ckpt") == str(tmp_path / "ckpt")  # the ranks run elsewhere: made absolute here
    fs, path = filesystem("s3a://bucket/runs?region=us-east-1")  # the region given: nothing is asked of AWS
    assert (fs.type_name, path) == ("s3", "bucket/runs")
    for local in ("/dbfs/ckpt", "/Volumes/main/default/ckpt", f"file:{tmp_path}"):
        assert filesystem(local)[0].type_name == "local"


def test_the_probe_creates_writes_reads_and_cleans_or_says_in_one_line_what_failed(tmp_path: Path) -> None:
    assert probe(tmp_path / "new" / "ckpt") == str(tmp_path / "new" / "ckpt")
    assert names(tmp_path / "new" / "ckpt") == []  # the probe file is gone
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(ConfigError) as caught:
        probe(tmp_path / "a-file" / "ckpt")
    message = str(caught.value)
    assert message.startswith(f"checkpoint_dir '{tmp_path / 'a-file' / 'ckpt'}': cannot create the folder (")
    assert len(message.splitlines()) == 1 and "leave checkpoint_dir out" in message
    with pytest.raises(ConfigError, match=r"^checkpoint_dir 'nosuch://bucket/x': cannot open it \(") as caught:
        probe("nosuch://bucket/x")
    assert len(str(caught.value).splitlines()) == 1


# -- files: atomic, checked, only the latest good one kept ---------------------------------------------


def test_a_checkpoint_is_data_then_manifest_with_its_sha256_and_the_older_goes_once_it_checks_out(tmp_path) -> None:
    files = CheckpointFiles(tmp_path)
    first = files.write(KEY, 1, b"after 1")
    assert first.location == str(tmp_path / KEY / "epoch-000001.ckpt") and first.sha256 == sha256_of(b"after 1")
    files.write(KEY, 2, b"after 2")
    assert names(tmp_path / KEY) == ["epoch-000002.ckpt", "epoch-000002.json"]  # no temporary name left
    manifest = json.loads((tmp_path / KEY / "epoch-000002.json").read_text())
    assert manifest == {"epoch": 2, "file": "epoch-000002.ckpt", "bytes": 7, "sha256": sha256_of(b"after 2")}
    latest = CheckpointFiles(tmp_path).latest(KEY)  # another process: a rank of the next attempt, a new driver
    assert latest is not None and (latest.epoch, latest.data) == (2, b"after 2")
    assert files.keys() == [KEY] and files.latest("other") is None


def test_a_corrupt_checkpoint_is_named_and_the_previous_good_one_is_taken(tmp_path: Path, caplog) -> None:
    files = CheckpointFiles(tmp_path)
    files.write(KEY, 1, b"after 1")
    kept = {name: (tmp_path / KEY / name).read_bytes() for name in names(tmp_path / KEY)}
    files.write(KEY, 2, b"after 2")
    for name, data in kept.items():  # as if the driver died before epoch 1's files were removed
        (tmp_path / KEY / name).write_bytes(data)
    (tmp_path / KEY / "epoch-000002.ckpt").write_bytes(b"after 2, flipped")
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        latest = files.latest(KEY)
    assert latest is not None and (latest.epoch, latest.data) == (1, b"after 1")
    assert f"{tmp_path / KEY / 'epoch-000002.ckpt'}: corrupt checkpoint" in caplog.text
    (tmp_path / KEY / "epoch-000001.json").write_text("{not json")
    assert files.latest(KEY) is None and f"{tmp_path / KEY / 'epoch-000001.json'}: unreadable" in caplog.text


def test_a_torn_write_is_named_and_never_taken(tmp_path: Path, caplog) -> None:
    files = CheckpointFiles(tmp_path)
    files.write(KEY, 1, b"after 1")
    (tmp_path / KEY / ".epoch-000002.ckpt.partial").write_bytes(b"half of it")  # killed while writing
    (tmp_path / KEY / "epoch-000003.ckpt").write_bytes(b"all of it")  # killed before its manifest (object store)
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        latest = files.latest(KEY)
    assert latest is not None and latest.epoch == 1
    assert f"{tmp_path / KEY / 'epoch-000003.ckpt'}: a checkpoint without its manifest" in caplog.text
    files.write(KEY, 2, b"after 2")  # the retry goes on: the leftovers of older writes are cleaned
    assert names(tmp_path / KEY) == ["epoch-000002.ckpt", "epoch-000002.json", "epoch-000003.ckpt"]


def test_on_an_object_store_the_data_is_written_whole_then_the_manifest() -> None:
    from pyarrow.fs import FileSelector, _MockFileSystem

    store = _MockFileSystem()
    files = CheckpointFiles("/bucket/ckpt", fs=store)
    assert not files.atomic_rename
    written = files.write(KEY, 1, b"after 1")
    files.write(KEY, 2, b"after 2")
    assert sorted(info.base_name for info in store.get_file_info(FileSelector("/bucket/ckpt/variant1"))) == \
        ["epoch-000002.ckpt", "epoch-000002.json"]
    latest = files.latest(KEY)
    assert latest is not None and latest.data == b"after 2"
    with pytest.raises(CheckpointError, match="epoch-000001.ckpt: cannot read the checkpoint"):
        files.stored(1, written.location, written.sha256).data  # type: ignore[arg-type]  # removed


def test_a_stored_checkpoint_reads_and_checks_its_bytes_when_used(tmp_path: Path) -> None:
    written = CheckpointFiles(tmp_path).write("", 4, b"weights")
    lazy = Checkpoint(4, location=written.location, sha256=written.sha256)
    assert not lazy.loaded and lazy.data == b"weights" and lazy.loaded
    Path(written.location).write_bytes(b"changed")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"epoch-000004.ckpt: corrupt checkpoint: its sha256 is"):
        Checkpoint(4, location=written.location, sha256=written.sha256).data  # noqa: B018


# -- the driver's store --------------------------------------------------------------------------


def test_epochs_only_go_up(tmp_path: Path, caplog) -> None:
    store = CheckpointStore(tmp_path)
    store.put(3, b"after 3", KEY)
    with caplog.at_level(logging.WARNING):
        assert store.put(2, b"after 2", KEY) is None
    assert "after epoch 2 came after the one after epoch 3; not taken" in caplog.text
    assert CheckpointStore(tmp_path).latest(KEY).data == b"after 3"  # type: ignore[union-attr]
    assert CheckpointStore(tmp_path).epochs() == {KEY: 3}


def test_the_driver_keeps_only_where_a_checkpoint_is_not_its_bytes(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, direct=True)
    assert store.rank_location == str(tmp_path)
    written = CheckpointFiles(str(tmp_path)).write(KEY, 1, b"after 1")  # rank 0 wrote it
    heard = []
    reports = RunReports(store, on_report=lambda key, rank, metrics, ckpt: heard.append(ckpt)).attempt_receiver(2)
    frame, = report_frames(KEY, {"epoch": 1}, written)
    assert "data" not in frame and frame["location"] == written.location and frame["sha256"] == written.sha256
    assert reports.receive(0, frame) == {"type": "reported"}
    kept = store.latest(KEY)
    assert kept is not None and not kept.loaded and kept.data == b"after 1"  # read from storage, checked
    assert heard[0].data == b"after 1"  # the job's evaluator reads it so
    elsewhere = {**frame, "location": str(tmp_path / "other" / "epoch-000001.ckpt")}
    assert reports.receive(0, elsewhere) == {"type": "reported"} and heard[-1] is None  # metrics kept, not it


def test_without_checkpoint_dir_the_bytes_travel_and_are_checked(tmp_path: Path) -> None:
    reports = RunReports(CheckpointStore(tmp_path)).attempt_receiver(2)
    frames = list(report_frames(KEY, {"epoch": 1}, Checkpoint(1, b"after 1")))
    assert frames[-1]["sha256"] == sha256_of(b"after 1")
    damaged = reports.receive(0, {**frames[-1], "sha256": sha256_of(b"something else")})
    assert damaged is not None and damaged["type"] == "report-failed" and "arrived damaged" in damaged["reason"]
    assert not (tmp_path / KEY).exists()  # dropped, and the rank told at once
    assert reports.receive(0, frames[-1]) == {"type": "reported"}
    assert names(tmp_path / KEY) == ["epoch-000001.ckpt", "epoch-000001.json"]


def test_a_rank_writes_to_checkpoint_dir_itself_and_the_next_attempt_reads_it_there(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, direct=True)
    reports = RunReports(store).attempt_receiver(2)

    def on_event(rank: int, event: dict):
        return reports.receive(rank, event) if event["type"] == "report" else reports.fetch(rank, event)

    with ChannelServer(2, SECRET, on_event, LOOPBACK) as server:
        launch = LaunchSpec(size=2, backend="tf", policy=FailurePolicy(), driver_host=LOOPBACK,
                            driver_port=server.port, checkpoint_dir=store.rank_location, secret=SECRET)
        contexts = [RankContext(spec=launch.for_rank(rank, [LOOPBACK] * 2, [0, 0], [])) for rank in (0, 1)]
        from sparkml_mnist.launcher.channel import ChannelClient

        for context in contexts:
            context.channel = ChannelClient(LOOPBACK, server.port, context.rank, context.spec.channel_token)
        contexts[0].report(KEY, {"epoch": 1}, Checkpoint(1, b"after 1"))
        again = contexts[1].latest_checkpoint(KEY)
        assert again is not None and again.data == b"after 1"
        for context in contexts:
            context.channel.close()  # type: ignore[union-attr]
    assert names(tmp_path / KEY) == ["epoch-000001.ckpt", "epoch-000001.json"]
    assert store.epochs() == {KEY: 1}


# -- the runner and the job -----------------------------------------------------------------------


def test_the_runner_checks_its_checkpoint_dir_at_once(tmp_path: Path) -> None:
    from sparkml_mnist.launcher import HorovodRunner

    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="cannot create the folder"):
        HorovodRunner(np=-1, checkpoint_dir=tmp_path / "a-file" / "ckpt")
    assert HorovodRunner(np=-1, checkpoint_dir=tmp_path / "ckpt").checkpoint_dir == str(tmp_path / "ckpt")


def test_the_runners_own_store_is_under_sparks_local_dir(tmp_path: Path, monkeypatch) -> None:
    from sparkml_mnist.launcher.runner import DRIVER_STORE_PREFIX, LOCAL_DIRS_ENV, driver_store_folder

    monkeypatch.setenv(LOCAL_DIRS_ENV, f"{tmp_path / 'local'},/elsewhere")
    folder = driver_store_folder(None)
    assert folder.parent == tmp_path / "local" and folder.name.startswith(DRIVER_STORE_PREFIX)


def test_a_bad_checkpoint_dir_is_one_line_at_plan_time(tmp_path: Path) -> None:
    from sparkml_mnist.config import load_run
    from sparkml_mnist.job.plan import plan_job

    (tmp_path / "a-file").write_text("")
    run = load_run("sample").with_overrides(output=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "a-file" / "x"))
    with pytest.raises(ConfigError) as caught:
        plan_job(run)
    assert str(caught.value).startswith(f"{run.source}: field 'checkpoint_dir' (--checkpoint-dir) '")
    assert len(str(caught.value).splitlines()) == 1


def test_the_run_state_keeps_its_own_folder_under_checkpoint_dir(tmp_path: Path) -> None:
    from sparkml_mnist.config import load_run
    from sparkml_mnist.job.state import RunState

    output = tmp_path / "out"
    run = load_run("sample").with_overrides(output=str(output), checkpoint_dir=str(tmp_path / "ckpt"))
    with RunState.claim(output, run) as state:
        location = state.checkpoint_location
        assert location is not None and Path(location).parent == tmp_path / "ckpt"
        assert Path(location).name.startswith("out-") and state.checkpoints().direct
        state.checkpoints().files.write(KEY, 1, b"after 1")  # type: ignore[union-attr]  # rank 0 did
        assert state.holds_work()
    with RunState.claim(output, run, resume=True) as resumed:  # the driver was killed: --resume finds it
        assert resumed.checkpoint_location == location and resumed.checkpoints().epochs() == {KEY: 1}
        resumed.complete()
    assert not Path(location).exists() and (tmp_path / "ckpt").is_dir()
