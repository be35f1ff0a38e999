"""The training job end to end on local Spark: outputs, both ranks' records, evaluation, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparkml_mnist.cli.commands import EXIT_RUN_FAILED, EXIT_USAGE, main
from sparkml_mnist.config import load_run
from sparkml_mnist.job.run import run_job

CHANCE = 0.1


@pytest.fixture(scope="module")
def np2_report(spark, tmp_path_factory) -> Path:
    """variant1 for 2 epochs at np=2 on the bundled sample (5,400 training rows, 42 steps an epoch)."""
    output = tmp_path_factory.mktemp("job") / "np2"
    run = load_run("sample").with_overrides(variants="variant1", np=2, epochs=2, output=str(output))
    return run_job(spark, run)


def load_report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_np2_run_writes_every_output(np2_report):
    names = {p.name for p in np2_report.iterdir()}
    assert {"report.json", "report.md", "variant1-loss.png", "variant1-confusion.png", "comparison.png"} <= names
    assert list(np2_report.rglob("variant1.keras")), "the trained model is saved in the report folder"
    assert not list(np2_report.parent.glob(".*partial*")), "no partial folder is left behind"


def test_np2_run_records_both_ranks(np2_report):
    variant = load_report(np2_report)["variants"][0]
    ranks = variant["rank_records"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["pid"] for r in ranks}) == 2
    assert all(r["steps_per_epoch"] == 42 and r["train_rows"] == 2700 for r in ranks)
    assert all(r["determinism"]["op_determinism"] is False for r in ranks)  # only with --deterministic
    assert [a["outcome"] for a in variant["attempts"]] == ["succeeded"] and variant["deterministic"] is False
    history = variant["history"]
    assert len(history["loss"]) == 2 and len(history["val_loss"]) == 2
    assert history["loss"][1] < history["loss"][0]


def test_short_run_on_the_sample_beats_chance_by_far(np2_report):
    test = load_report(np2_report)["variants"][0]["test"]
    assert test["accuracy"] > 0.8 > 5 * CHANCE
    assert test["num_examples"] == 1000


def test_gathered_evaluation_equals_a_single_process_evaluation(spark, np2_report):
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.paths import sample_paths
    from sparkml_mnist.data.tensors import collect_tensors
    from sparkml_mnist.launcher.keras_flavour import keras

    model = keras().models.load_model(next(np2_report.rglob("variant1.keras")))
    x_test, y_test = collect_tensors(load_libsvm(spark, sample_paths().test))
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    test = load_report(np2_report)["variants"][0]["test"]
    assert test["accuracy"] == pytest.approx(accuracy, abs=1e-6)  # Keras reports float32
    assert test["loss"] == pytest.approx(loss, rel=1e-5)
    confusion = np.array(test["confusion_matrix"] if "confusion_matrix" in test else test["confusion"])
    assert confusion.sum() == 1000 and np.trace(confusion) == round(accuracy * 1000)


def test_plots_open_and_are_not_blank(np2_report):
    from PIL import Image

    for name in ("variant1-loss.png", "variant1-confusion.png", "comparison.png"):
        pixels = np.asarray(Image.open(np2_report / name).convert("RGB"), dtype=np.float32)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert pixels.std() > 10, f"{name} looks blank"


def test_np1_and_np2_take_the_same_steps_per_epoch(spark, tmp_path, np2_report):
    run = load_run("sample").with_overrides(variants="variant1", np=1, epochs=1, output=str(tmp_path / "np1"))
    ranks = load_report(run_job(spark, run))["variants"][0]["rank_records"]
    assert len(ranks) == 1 and ranks[0]["train_rows"] == 5400
    np2_steps = {r["steps_per_epoch"] for r in load_report(np2_report)["variants"][0]["rank_records"]}
    assert {ranks[0]["steps_per_epoch"]} == np2_steps == {42}


def test_existing_report_is_not_overwritten(spark, np2_report, capsys):
    assert main(["train", "--variant", "variant1", "--epochs", "1", "--output", str(np2_report)]) == EXIT_USAGE
    assert f"{np2_report}: output folder exists and is not empty" in capsys.readouterr().err
    assert (np2_report / "report.json").exists()


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--np", "0"], "field 'np' is 0"),
        (["--variant", "variant9"], "unknown variant 'variant9'"),
        (["--epochs", "-1"], "must be a positive integer"),
        (["--run-config", "nope"], "unknown run config 'nope'"),
        (["--np", "3"], "not divisible by the 3 replicas"),
        (["--data", "x", "--train", "y"], "either --data DIR or --train/--test"),
        (["--train", "only-train.txt"], "give both 'train' and 'test'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(spark, capsys, argv, words):
    assert main(["train", *argv]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparkml-mnist: error: ") and len(err.splitlines()) == 1
    assert words in err


def test_missing_data_folder_exits_1_naming_the_file(spark, tmp_path, capsys):
    missing = tmp_path / "nowhere"  # found by Spark's reader: the run started
    assert main(["train", "--data", str(missing), "--output", str(tmp_path / "out")]) == EXIT_RUN_FAILED
    assert f"{missing / 'mnist-digits-train.txt'}: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_full_disk_at_the_end_is_one_line_and_keeps_the_run_for_resume(spark, tmp_path, monkeypatch):
    import errno

    from sparkml_mnist.job import run as job_module
    from sparkml_mnist.report import ReportError
    from sparkml_mnist.job.state import state_folder

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    output = tmp_path / "out"
    run = load_run("sample").with_overrides(variants="variant1", np=-1, epochs=1, output=str(output))
    monkeypatch.setattr(job_module, "write_report", disk_full)
    with pytest.raises(ReportError) as caught:
        run_job(spark, run)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "No space left on device" in message and "--resume" in message
    kept = state_folder(output) / "variants" / "variant1"
    assert (kept / "result.json").is_file() and (kept / "variant1.keras").is_file()

    monkeypatch.undo()  # space again: --resume writes the report from what was kept, without training
    from sparkml_mnist.job.plan import plan_job
    from sparkml_mnist.job.state import stored_run

    lines: list[str] = []
    folder = run_job(spark, plan_job(stored_run(output), resume=True), log=lines.append)
    assert any("finished by an earlier attempt" in line for line in lines)
    assert load_report(folder)["variants"][0]["name"] == "variant1" and not state_folder(output).exists()
