"""The training job end to end on local Spark: outputs, both ranks' records, evaluation, CLI errors.

The finished run read here is ``trained_run`` (tests/conftest.py): the CLI in its own process,
variant1 and variant3 for 2 epochs at np=2 on the bundled sample, shared by the whole session.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparkml_mnist.cli.commands import EXIT_RUN_FAILED, EXIT_USAGE, main
from sparkml_mnist.config import load_run
from sparkml_mnist.job.run import run_job

CHANCE = 0.1
# The bundled sample: 6,000 training rows. variant1 holds out the last 10% (5,400 left), variant3 none.
TRAIN_ROWS_PER_RANK = {"variant1": 2700, "variant3": 3000}
STEPS_PER_EPOCH = {"variant1": 42, "variant3": 46}  # 2,700 // 64 and 3,000 // 64 (global batch 128 over 2)


def load_report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_the_run_writes_every_output(trained_run):
    folder = trained_run.output
    names = {p.name for p in folder.iterdir()}
    assert {"report.json", "report.md", "comparison.png", "models"} <= names
    for name in ("variant1", "variant3"):
        assert {f"{name}-loss.png", f"{name}-confusion.png"} <= names
        assert (folder / "models" / name / f"{name}.keras").is_file(), "the trained model is saved in the report folder"
    assert [v["name"] for v in trained_run.report["variants"]] == ["variant1", "variant3"]
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "no partial folder and no run state are left behind"


@pytest.mark.parametrize("name", ["variant1", "variant3"])
def test_the_run_records_both_ranks(trained_run, name):
    variant = trained_run.variant(name)
    ranks = variant["rank_records"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["pid"] for r in ranks}) == 2
    assert all(r["steps_per_epoch"] == STEPS_PER_EPOCH[name] and r["train_rows"] == TRAIN_ROWS_PER_RANK[name]
               for r in ranks)
    assert [a["outcome"] for a in variant["attempts"]] == ["succeeded"]
    history = variant["history"]
    assert len(history["loss"]) == 2 and history["loss"][1] < history["loss"][0]
    assert all(len(values) == 2 for values in history.values())
    assert ("val_loss" in history) == (name == "variant1")  # variant3 holds nothing out


def test_deterministic_is_recorded_for_the_variant_and_every_rank(trained_run):
    for variant in trained_run.report["variants"]:
        assert variant["deterministic"] is True and variant["seed"] == load_run("sample").seed
        assert all(r["determinism"]["op_determinism"] is True and r["determinism"]["inter_op_threads"] == 1
                   for r in variant["rank_records"])


def test_short_run_on_the_sample_beats_chance_by_far(trained_run):
    for variant in trained_run.report["variants"]:
        assert variant["test"]["accuracy"] > 0.8 > 5 * CHANCE, variant["name"]
        assert variant["test"]["num_examples"] == 1000


def driver_evaluation(model_file: Path, x_test: np.ndarray, y_test: np.ndarray):
    """What the job computed before issue 23: the whole test set predicted in one process, through sklearn."""
    from sparkml_mnist.job.metrics import evaluate
    from sparkml_mnist.launcher.keras_flavour import keras

    model = keras().models.load_model(model_file)
    return model, evaluate(y_test, model.predict(x_test, batch_size=1024, verbose=0))


def assert_rank_side_equals_driver_side(variant: dict, reference, loss_tolerance: float = 1e-6) -> None:
    """The report's figures (the ranks' sums) against the driver-side reference: exact, the loss to 1e-6."""
    from sparkml_mnist.report import Evaluation

    ours = Evaluation.from_dict(variant["test"])
    assert ours.accuracy == reference.accuracy, variant["name"]
    assert ours.loss == pytest.approx(reference.loss, abs=loss_tolerance), variant["name"]
    assert (ours.num_examples, ours.precision, ours.recall, ours.f1, ours.support, ours.confusion) == (
        reference.num_examples, reference.precision, reference.recall, reference.f1, reference.support,
        reference.confusion), variant["name"]


def assert_ranks_reported_sums(variant: dict, test_rows: int, ranks: int) -> None:
    """Each rank scored its ``row % ranks`` share and reported sums only; the report adds them up."""
    from sparkml_mnist.training.scoring import TEST_RECORD_KEY

    sums = [record[TEST_RECORD_KEY] for record in variant["rank_records"]]
    assert [s["examples"] for s in sums] == [len(range(rank, test_rows, ranks)) for rank in range(ranks)]
    assert set(sums[0]) == {"examples", "loss_sum", "confusion", "seconds", "attempt"}  # nothing row-sized
    assert np.array_equal(np.sum([s["confusion"] for s in sums], axis=0), variant["test"]["confusion_matrix"])
    assert variant["test"]["loss"] == pytest.approx(sum(s["loss_sum"] for s in sums) / test_rows, rel=1e-12)
    assert variant["seconds"]["evaluate"] == max(s["seconds"] for s in sums)  # the ranks score in parallel


def test_rank_side_evaluation_equals_a_single_process_evaluation(spark, trained_run):
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.paths import sample_paths
    from sparkml_mnist.data.tensors import collect_tensors

    x_test, y_test = collect_tensors(load_libsvm(spark, sample_paths().test))
    for name in ("variant1", "variant3"):
        variant = trained_run.variant(name)
        model, reference = driver_evaluation(trained_run.output / "models" / name / f"{name}.keras", x_test, y_test)
        assert_rank_side_equals_driver_side(variant, reference)
        assert_ranks_reported_sums(variant, 1000, 2)
        loss, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
        test = variant["test"]
        assert test["accuracy"] == pytest.approx(accuracy, abs=1e-6), name  # Keras reports float32
        assert test["loss"] == pytest.approx(loss, rel=1e-5), name
        confusion = np.array(test["confusion_matrix"])
        assert confusion.sum() == 1000 and np.trace(confusion) == round(accuracy * 1000)


def test_rank_side_evaluation_equals_the_driver_side_on_full_mnist(spark, full_data_dir, tmp_path):
    """The one extra run: variant1, 1 epoch of 20 steps, np=2 on full MNIST; its 10,000 test rows scored by
    the ranks (5,000 each) give the driver-side figures of the same final weights: accuracy exactly, loss
    to 1e-6 (20 steps: the figures compared are of whatever weights training left)."""
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.data.paths import dataset_paths
    from sparkml_mnist.data.tensors import collect_tensors
    from sparkml_mnist.job.plan import plan_job

    run = load_run("sample").with_overrides(variants="variant1", np=2, epochs=1, max_steps_per_epoch=20,
                                            data=str(full_data_dir), output=str(tmp_path / "out"))
    folder = run_job(spark, plan_job(run), log=lambda line: None)
    variant = load_report(folder)["variants"][0]
    test = load_libsvm(spark, dataset_paths(str(full_data_dir)).test)
    try:
        x_test, y_test = collect_tensors(test)
    finally:
        test.release()
    _, reference = driver_evaluation(folder / "models" / "variant1" / "variant1.keras", x_test, y_test)
    assert reference.num_examples == 10_000
    assert_rank_side_equals_driver_side(variant, reference)
    assert_ranks_reported_sums(variant, 10_000, 2)


def test_np1_and_np2_take_the_same_steps_per_epoch():
    """N // B steps whatever the ranks: np=1 takes 5,400 rows 128 at a time, np=2 2,700 rows 64 at a time."""
    from sparkml_mnist.data.split import plan_shards
    from sparkml_mnist.errors import ConfigError
    from sparkml_mnist.training.inputs import steps_per_epoch

    steps = {}
    for ranks in (1, 2):
        plan = plan_shards(6000, ranks, 0.1)
        assert plan.train_per_shard == 5400 // ranks
        steps[ranks] = steps_per_epoch(plan.train_per_shard, 128, ranks)
    assert steps == {1: 42, 2: 42}
    assert steps_per_epoch(3000, 128, 2) == 46 and steps_per_epoch(64, 128, 2) == 1
    with pytest.raises(ConfigError, match="63 rows, fewer than one step of 64 rows per rank"):
        steps_per_epoch(63, 128, 2, "validation")


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


def test_missing_data_folder_exits_1_naming_the_file_and_leaves_nothing_to_resume(spark, tmp_path, capsys):
    from sparkml_mnist.job.state import state_folder

    missing = tmp_path / "nowhere"  # found by Spark's reader: the run started
    argv = ["train", "--data", str(missing), "--output", str(tmp_path / "out")]
    assert main(argv) == EXIT_RUN_FAILED
    assert f"{missing / 'mnist-digits-train.txt'}: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not state_folder(tmp_path / "out").exists()
    assert main(argv) == EXIT_RUN_FAILED  # the same command again: the same error, not "unfinished run: --resume"
    assert "no such file or directory" in capsys.readouterr().err


def test_a_filesystem_spark_cannot_read_is_one_data_error_naming_the_path(spark, tmp_path):
    from sparkml_mnist.data.libsvm import load_libsvm
    from sparkml_mnist.errors import DataError

    with pytest.raises(DataError, match=r"nosuchfs://bucket/train.txt.*cannot be read as LIBSVM"):
        load_libsvm(spark, "nosuchfs://bucket/train.txt")


def kept_result(tmp_path: Path):
    """variant1 as a run keeps it once trained (its result and model in the run's state)."""
    from sparkml_mnist.job.metrics import evaluate
    from sparkml_mnist.report import VariantResult

    model = tmp_path / "variant1.keras"
    model.write_bytes(b"model")
    labels = np.arange(50) % 10
    return VariantResult(name="variant1", description="d", np=-1, epochs=1, history={"loss": [0.5]},
                         evaluation=evaluate(labels, np.eye(10)[labels]), parameter_count=3, model_files=[model])


def test_a_full_disk_at_the_end_is_one_line_and_keeps_the_run_for_resume(spark, tmp_path, monkeypatch):
    """The report write fails after every variant was kept: the state stays, and --resume writes it.

    A kept variant is never trained again, so the run here trains nothing: the variant is put in the
    run's state as a finished run leaves it (a run stopped after training, then resumed, also gets here).
    """
    import errno

    from sparkml_mnist.job import run as job_module
    from sparkml_mnist.job.plan import plan_job
    from sparkml_mnist.job.state import RunState, state_folder, stored_run
    from sparkml_mnist.report import ReportError

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    output = tmp_path / "out"
    run = load_run("sample").with_overrides(variants="variant1", np=-1, epochs=1, output=str(output))
    with RunState.claim(output, run) as state:
        state.save_finished(kept_result(tmp_path))
    monkeypatch.setattr(job_module, "write_report", disk_full)
    with pytest.raises(ReportError) as caught:
        run_job(spark, plan_job(stored_run(output), resume=True))
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "No space left on device" in message and "--resume" in message
    kept = state_folder(output) / "variants" / "variant1"
    assert (kept / "result.json").is_file() and (kept / "variant1.keras").is_file()

    monkeypatch.undo()  # space again: --resume writes the report from what was kept, without training
    lines: list[str] = []
    folder = run_job(spark, plan_job(stored_run(output), resume=True), log=lines.append)
    assert any("finished by an earlier attempt" in line for line in lines)
    assert load_report(folder)["variants"][0]["name"] == "variant1" and not state_folder(output).exists()
    assert (folder / "models" / "variant1" / "variant1.keras").read_bytes() == b"model"  # kept, not retrained
