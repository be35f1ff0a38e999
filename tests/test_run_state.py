"""The run's state beside its output: claimed once, refused to a second run, read back by --resume."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from sparkml_mnist.config import load_run
from sparkml_mnist.errors import ConfigError
from sparkml_mnist.job.metrics import evaluate
from sparkml_mnist.report import VariantResult
from sparkml_mnist.job.state import RunState, state_folder, stored_overwrite, stored_run


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
    state_folder(output).mkdir(parents=True)
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
