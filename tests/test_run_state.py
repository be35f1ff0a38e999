"""The run's state beside its output: claimed once, refused to a second run, read back by --resume."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
from pathlib import Path

import pytest

from sparkml_mnist.config import load_run
from sparkml_mnist.errors import ConfigError
from sparkml_mnist.job.metrics import evaluate
from sparkml_mnist.report import VariantResult
from sparkml_mnist.job.state import RunState, state_folder, stored_overwrite, stored_run

OTHER_UID = 4321  # a user who is not this one (the tests run as root in CI's container)


def a_result(tmp_path: Path) -> VariantResult:
    import numpy as np

    model = tmp_path / "variant1.keras"
    model.write_bytes(b"model")
    probabilities = np.eye(10)[np.arange(20) % 10]
    return VariantResult(
        name="variant1", description="d", np=2, epochs=2, history={"loss": [1.0, 0.5]},
        evaluation=evaluate(np.arange(20) % 10, probabilities), parameter_count=3, model_files=[model],
        attempts=[{"number": 1, "outcome": "succeeded"}], seed=7, deterministic=True,
    )


def _try_claim(output: str, queue) -> None:
    try:
        RunState.claim(Path(output), load_run("sample"))
        queue.put("claimed")
    except ConfigError as error:
        queue.put(str(error))


def test_a_second_process_cannot_claim_a_claimed_output(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with RunState.claim(output, load_run("sample")):
        queue = multiprocessing.get_context("spawn").Queue()
        other = multiprocessing.get_context("spawn").Process(target=_try_claim, args=(str(output), queue))
        other.start()
        other.join(60)
        message = queue.get(timeout=5)
    assert message.startswith(f"{output}: another run (pid ") and "is writing this output now" in message


def test_an_unfinished_run_is_resumed_not_overwritten_by_accident(tmp_path: Path) -> None:
    output = tmp_path / "out"
    run = load_run("sample").with_overrides(epochs=3, output=str(output))
    RunState.claim(output, run).release()  # as if the driver died
    with pytest.raises(ConfigError, match=r"an unfinished run left its state .* --resume"):
        RunState.claim(output, run)
    assert stored_run(output).epochs == 3 and stored_run(output).source.endswith("(resumed)")
    with RunState.claim(output, run, resume=True):
        pass
    with RunState.claim(output, run, overwrite=True) as fresh:
        assert sorted(p.name for p in fresh.folder.iterdir()) == [".lock", "state.json"]


def test_a_resume_keeps_overwrite_and_finds_the_output_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    """Started with --overwrite onto an old report, a run must be resumable; its output was relative."""
    monkeypatch.chdir(tmp_path)
    run = load_run("sample").with_overrides(epochs=3, output="out")
    RunState.claim(Path("out"), run, overwrite=True).release()
    RunState.claim(Path("kept"), run.with_overrides(output="kept")).release()
    monkeypatch.chdir(tmp_path.parent)
    output = tmp_path / "out"
    assert stored_run(output).output == str(output) and stored_overwrite(output)
    assert not stored_overwrite(tmp_path / "kept")


def test_a_broken_state_file_is_a_clear_error(tmp_path: Path) -> None:
    output = tmp_path / "out"
    state_folder(output).mkdir(mode=0o700, parents=True)
    (state_folder(output) / "state.json").write_text('{"version": 1}')
    with pytest.raises(ConfigError, match=r"cannot read the run's state .* --overwrite"):
        stored_run(output)


def test_nothing_to_resume_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="there is no unfinished run to resume"):
        stored_run(tmp_path / "never")
    with pytest.raises(ConfigError, match="there is no unfinished run to resume"):
        RunState.claim(tmp_path / "never", load_run("sample"), resume=True)


def test_a_finished_variant_round_trips_with_its_model(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with RunState.claim(output, load_run("sample")) as state:
        assert state.finished("variant1") is None
        kept = state.save_finished(a_result(tmp_path))
        again = state.finished("variant1")
    assert again is not None and again.to_dict() == kept.to_dict()
    assert again.model_files[0].read_bytes() == b"model" and again.model_files[0].parent == state_folder(output) / "variants" / "variant1"
    assert again.attempts == [{"number": 1, "outcome": "succeeded"}] and again.seed == 7 and again.deterministic


# -- the state folder is this user's own (a shared parent folder: another user may make it first) -------------


def _planted(output: Path, folder: Path | None = None) -> Path:
    """A state folder as another user would plant it: the run's settings and a checkpoint of theirs."""
    folder = folder or state_folder(output)
    (folder / "checkpoints" / "variant1").mkdir(parents=True)
    (folder / "checkpoints" / "variant1" / "epoch-000005.ckpt").write_bytes(b"their model")
    (folder / "state.json").write_text('{"version": 1, "run": {}, "overwrite": false, "checkpoints": null}')
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry under ``folder`` with its owner, mode and bytes: 'nothing touched' compares two of these."""
    entries = {}
    for path in sorted(folder.rglob("*")) + [folder]:
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        entries[str(path.relative_to(folder))] = (info.st_uid, info.st_mode, content)
    return entries


def _refused_and_untouched(output: Path, folder: Path, words: str) -> None:
    """Claiming, resuming and planning ``output`` are each refused naming ``words``; ``folder`` stays as it was."""
    from sparkml_mnist.cli.commands import EXIT_USAGE, exit_code
    from sparkml_mnist.job.state import check_state_folder

    before = _snapshot(folder)
    run = load_run("sample").with_overrides(output=str(output))
    for attempt in (lambda: RunState.claim(output, run), lambda: RunState.claim(output, run, overwrite=True),
                    lambda: RunState.claim(output, run, resume=True), lambda: stored_run(output),
                    lambda: check_state_folder(output)):
        with pytest.raises(ConfigError, match=words) as caught:
            attempt()
        message = str(caught.value)
        assert len(message.splitlines()) == 1 and exit_code(caught.value) == EXIT_USAGE
        assert str(state_folder(output)) in message and ("remove" in message or "chmod" in message)
    assert _snapshot(folder) == before
    assert not [p for p in output.parent.iterdir() if ".probe-" in p.name]


def test_a_state_folder_open_to_others_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    output = tmp_path / "out"
    folder = _planted(output)
    folder.chmod(0o755)
    _refused_and_untouched(output, folder, r"open to other users \(mode 0755, this tool makes it 0700\)")
    folder.chmod(0o770)
    _refused_and_untouched(output, folder, r"open to other users \(mode 0770")


def test_a_state_folder_of_another_user_is_refused_and_left_as_it_is(tmp_path: Path, monkeypatch) -> None:
    output = tmp_path / "out"
    folder = _planted(output)
    folder.chmod(0o700)
    if os.getuid() == 0:  # as root: really another user's
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, OTHER_UID, OTHER_UID, follow_symlinks=False)
        _refused_and_untouched(output, folder, rf"belongs to another user \(uid {OTHER_UID}\), not to uid 0")
    else:  # this user's folder, seen as another user sees it
        monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 1)
        _refused_and_untouched(output, folder, r"belongs to another user")


def test_a_state_folder_that_is_a_link_is_refused_and_its_target_left_as_it_is(tmp_path: Path) -> None:
    output = tmp_path / "out"
    theirs = _planted(output, tmp_path / "theirs")
    theirs.chmod(0o700)
    state_folder(output).symlink_to(theirs, target_is_directory=True)
    _refused_and_untouched(output, theirs, "the run's state folder is a link or not a folder")
    assert state_folder(output).is_symlink()


@pytest.mark.parametrize("name", [".lock", "state.json", "credentials.json"])
def test_a_link_in_the_state_folder_is_refused_and_its_target_left_as_it_is(tmp_path: Path, name: str) -> None:
    output = tmp_path / "out"
    RunState.claim(output, load_run("sample").with_overrides(output=str(output))).release()
    folder = state_folder(output)
    target = tmp_path / "theirs.json"
    target.write_text('{"version": 1, "run": {}, "overwrite": false, "checkpoints": null}')
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(target)
    _refused_and_untouched(output, folder, "a link or not a plain file|a link where the run's state keeps a file")
    assert target.read_text().startswith('{"version": 1, "run": {}')


def test_a_fresh_state_folder_is_0700_even_under_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0o000)
    try:
        with RunState.claim(tmp_path / "out", load_run("sample")) as state:
            assert stat.S_IMODE(state.folder.stat().st_mode) == 0o700
            assert stat.S_IMODE((state.folder / "state.json").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_on_a_filesystem_without_owners_and_modes_the_state_folder_is_used(tmp_path: Path, monkeypatch) -> None:
    """A FUSE mount reporting fixed attributes (DBFS, UC volumes: 0777) does not keep the mode: not refused."""
    from sparkml_mnist.job import state_folder as folder_checks

    output = tmp_path / "out"
    RunState.claim(output, load_run("sample")).release()
    state_folder(output).chmod(0o777)
    with pytest.raises(ConfigError, match="open to other users"):
        stored_run(output)
    monkeypatch.setattr(folder_checks, "keeps_owners_and_modes", lambda folder: False)
    assert stored_run(output).name == "sample"


def test_credentials_are_masked_in_state_json_and_resume_reads_the_inputs_as_given(tmp_path: Path) -> None:
    from sparkml_mnist.job.state import CREDENTIALS_FILE, STATE_FILE

    output = tmp_path / "out"
    train, test = "s3a://AKIAEXAMPLE:hunter2secret@bucket/mnist/train.txt", "https://host/test.txt?sig=hunter3sig&x=1"
    checkpoints = "s3a://AKIAEXAMPLE:hunter2secret@bucket/ckpt"
    run = load_run("sample").with_overrides(output=str(output), train=train, test=test)
    with RunState.claim(output, run) as state:
        state.checkpoint_location = None
    document = (state_folder(output) / STATE_FILE).read_text()
    assert "hunter2secret" not in document and "hunter3sig" not in document and "AKIAEXAMPLE" not in document
    saved = json.loads(document)
    assert saved["run"]["train"] == "s3a://***@bucket/mnist/train.txt"
    assert saved["run"]["test"] == "https://host/test.txt?sig=***&x=1"
    assert saved["masked"] == ["run.train", "run.test"]
    kept = state_folder(output) / CREDENTIALS_FILE
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert json.loads(kept.read_text()) == {"run": {"train": train, "test": test}}
    resumed = stored_run(output)
    assert (resumed.train, resumed.test) == (train, test)

    # The checkpoint folder under a credentialed checkpoint_dir: masked too, found again by --resume.
    other = tmp_path / "other"
    RunState.claim(other, run.with_overrides(output=str(other))).release()
    stored = state_folder(other)
    document = json.loads((stored / STATE_FILE).read_text())
    document["checkpoints"] = "s3a://***@bucket/ckpt/other-1"
    document["masked"] = document["masked"] + ["checkpoints"]
    (stored / STATE_FILE).write_text(json.dumps(document))
    hidden = json.loads((stored / CREDENTIALS_FILE).read_text())
    (stored / CREDENTIALS_FILE).write_text(json.dumps({**hidden, "checkpoints": f"{checkpoints}/other-1"}))
    with RunState.claim(other, run, resume=True) as state:
        assert state.checkpoint_location == f"{checkpoints}/other-1"

    (state_folder(output) / CREDENTIALS_FILE).unlink()  # lost: say so, do not resume with masked inputs
    with pytest.raises(ConfigError, match=r"state.json: cannot read the run's state \(its credentials.json.*missing"):
        stored_run(output)


def test_a_run_without_credentials_writes_no_credentials_file(tmp_path: Path) -> None:
    from sparkml_mnist.job.state import CREDENTIALS_FILE

    with RunState.claim(tmp_path / "out", load_run("sample")) as state:
        assert not (state.folder / CREDENTIALS_FILE).exists()
        assert json.loads((state.folder / "state.json").read_text())["masked"] == []


# -- leftovers of killed runs: cleaned by the next run into the same output, once it holds the claim ----------


def _leftovers(tmp_path: Path) -> dict[str, Path]:
    """What SIGKILLed runs leave beside and in the state of ``out`` (and of other outputs, and of another user)."""
    state = state_folder(tmp_path / "out")
    folders = {
        "partial": tmp_path / ".out.partial-0123abcd",
        "old": tmp_path / ".out.old-89abcdef",
        "other output's partial": tmp_path / ".output2.partial-0123abcd",
        "other output's old": tmp_path / ".out2.old-0123abcd",
        "not this tool's name": tmp_path / ".out.partial-mine",
        "another user's partial": tmp_path / ".out.partial-fedcba98",
    }
    files = {
        "checkpoint partial": state / "checkpoints" / "variant1" / ".epoch-000002.ckpt.partial",
        "state partial": state / ".state.json.partial",
    }
    for path in folders.values():
        path.mkdir()
        (path / "report.json").write_text("{}")
    if os.getuid() == 0:
        os.chown(folders["another user's partial"], OTHER_UID, OTHER_UID)
    else:
        del folders["another user's partial"]
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half of it")
    return {**folders, **files}


def test_the_next_claim_of_an_output_cleans_what_killed_runs_into_it_left(tmp_path: Path) -> None:
    output = tmp_path / "out"
    run = load_run("sample").with_overrides(output=str(output))
    RunState.claim(output, run).release()  # killed (SIGKILL) mid-run: its state stays
    output.mkdir()
    (output / "report.json").write_text("{}")  # its report was in place, the old one not yet removed
    planted = _leftovers(tmp_path)
    with RunState.claim(output, run, resume=True):
        pass
    gone = {"partial", "old", "checkpoint partial", "state partial"}
    assert {name for name, path in planted.items() if not path.exists()} == gone
    assert (output / "report.json").exists() and (state_folder(output) / "state.json").exists()


def test_leftovers_are_left_while_another_run_holds_the_output(tmp_path: Path) -> None:
    output = tmp_path / "out"
    run = load_run("sample").with_overrides(output=str(output))
    with RunState.claim(output, run):
        planted = _leftovers(tmp_path)
        with pytest.raises(ConfigError, match="another run"):
            RunState.claim(output, run, overwrite=True)
        assert all(path.exists() for path in planted.values())


def test_a_report_set_aside_by_a_killed_overwrite_is_put_back(tmp_path: Path) -> None:
    """Killed between the two renames of --overwrite: no report under the name, the old one beside it."""
    output = tmp_path / "out"
    run = load_run("sample").with_overrides(output=str(output))
    old = tmp_path / ".out.old-0123abcd"
    old.mkdir()
    (old / "report.json").write_text("the old report")
    with pytest.raises(ConfigError, match=r"\.out\.old-0123abcd\) was put back .* --overwrite"):
        RunState.claim(output, run)
    assert (output / "report.json").read_text() == "the old report" and not old.exists()
    old.mkdir()  # again, now with --overwrite: put back, to be replaced by this run's report
    output.rename(tmp_path / "moved")
    (old / "report.json").write_text("the old report")
    with RunState.claim(output, run, overwrite=True):
        assert (output / "report.json").read_text() == "the old report"


# -- SIGHUP (a closed terminal or SSH session) is handled as SIGTERM: exit 130, the state kept for --resume -----


def test_the_cli_handles_sighup_and_sigterm_like_ctrl_c_while_it_runs(monkeypatch) -> None:
    from sparkml_mnist.cli import commands

    seen = {}

    def handler(args) -> None:
        seen.update({number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)})

    monkeypatch.setattr(commands, "_run_download", handler)
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    assert commands.main(["download-data", "unused"]) == 0
    assert seen == {signal.SIGTERM: commands._interrupt, signal.SIGHUP: commands._interrupt}
    assert {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)} == before

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # started under nohup: hangups stay ignored
    try:
        assert commands.main(["download-data", "unused"]) == 0
        assert seen[signal.SIGHUP] == signal.SIG_IGN and seen[signal.SIGTERM] == commands._interrupt
    finally:
        signal.signal(signal.SIGHUP, previous)


HANGUP_SCRIPT = """
import os, signal, sys, time
from sparkml_mnist.cli import commands
def hung_up(args):
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(30)
commands._run_download = hung_up
sys.exit(commands.main(["download-data", "unused"]))
"""


def test_a_hangup_ends_the_command_with_exit_130_not_killed(tmp_path: Path) -> None:
    """A real SIGHUP to a process that does no training: the interrupt path (exit 130, one line), not death."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", HANGUP_SCRIPT], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={**os.environ, "DATABRICKS_RUNTIME_VERSION": ""})
    assert done.returncode == 130, (done.returncode, done.stderr)
    assert done.stderr.startswith("sparkml-mnist: interrupted") and len(done.stderr.splitlines()) == 1
