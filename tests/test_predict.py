"""Scoring with a trained model (issue 25): on the executors (``sparkml-mnist predict``, ``sparkml_mnist.predict``)
and through the logged MLflow pyfunc, from raw pixels in every form, with the report's own figures.

No training here: the session's trained run (variant1 and variant3, tests/conftest.py) is the model, the
bundled sample's 1,000 test rows the data. Its report's test accuracy was counted by the ranks from the
same rows: a served model that scaled its input differently (or not at all) gives other predictions.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sparkml_mnist.cli.commands import EXIT_USAGE, main
from sparkml_mnist.config import load_data_spec
from sparkml_mnist.data.paths import sample_paths
from sparkml_mnist.errors import ConfigError
from sparkml_mnist.job import serving

OUTPUT_COLUMNS = ["row", "label", "prediction", "probability"]  # the data stage's columns but the pixels, then ours


@pytest.fixture(scope="module")
def sample_test(spark):
    """The sample's test file through the data stage (row, label, pixels: 784 bytes), kept for the module."""
    from sparkml_mnist.data.libsvm import load_libsvm

    data = load_libsvm(spark, sample_paths().test)
    yield data
    data.release()


@pytest.fixture(scope="module")
def raw_test_rows() -> tuple[np.ndarray, np.ndarray]:
    """The same rows read without Spark (sklearn's LIBSVM reader): raw pixel values (n, 784) and labels."""
    from sklearn.datasets import load_svmlight_file

    spec = load_data_spec()
    features, labels = load_svmlight_file(sample_paths().test, n_features=spec.num_features)
    return features.toarray().astype(np.int16), labels.astype(np.int32)


@pytest.fixture(scope="module")
def array_parquet(raw_test_rows, tmp_path_factory) -> Path:
    """The test rows as Parquet with an ``image`` column of 784 raw values (array<smallint>) and a label."""
    pixels, labels = raw_test_rows
    path = tmp_path_factory.mktemp("array-input") / "test.parquet"
    images = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), pixels.shape[1]).cast(pa.list_(pa.int16()))
    pq.write_table(pa.table({"label": labels, "image": images}), path)
    return path


def accuracy(frame, prediction: str = "prediction") -> float:
    from pyspark.sql import functions as F

    totals = frame.agg(F.count(F.lit(1)).alias("rows"),
                       F.sum((F.col("label") == F.col(prediction)).cast("long")).alias("correct")).collect()[0]
    return totals["correct"] / totals["rows"]


def best_variant(trained_run) -> dict:
    return max(trained_run.report["variants"], key=lambda entry: entry["test"]["accuracy"])


# -- scoring on the executors ---------------------------------------------------------------------------------


def test_the_cli_scores_a_libsvm_file_with_the_runs_best_model_at_its_reports_accuracy(spark, trained_run, tmp_path,
                                                                                       capsys):
    output = tmp_path / "predictions"
    assert main(["predict", "--model", str(trained_run.output), "--data", sample_paths().test,
                 "--output", str(output)]) == 0
    best = best_variant(trained_run)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote 1,000 predictions of {best['name']} of ") and str(output) in line
    written = spark.read.parquet(str(output))
    assert written.columns == OUTPUT_COLUMNS
    assert dict(written.dtypes) == {"row": "bigint", "label": "int", "prediction": "int", "probability": "array<float>"}
    assert accuracy(written) == best["test"]["accuracy"]  # exactly: the ranks' own count
    first = written.orderBy("row").first()
    assert len(first["probability"]) == 10 and abs(sum(first["probability"]) - 1) < 1e-5
    assert first["prediction"] == int(np.argmax(first["probability"]))


def test_predict_from_an_array_column_of_raw_values_gives_the_variants_accuracy(spark, trained_run, sample_test,
                                                                               array_parquet):
    """A named variant, a Parquet input with 784 raw values a row: the same predictions as the data stage's bytes."""
    from sparkml_mnist import predict

    variant = trained_run.variant("variant1")
    from_bytes = predict(sample_test, trained_run.output, variant="variant1")
    from_arrays = predict(spark.read.parquet(str(array_parquet)), trained_run.output, variant="variant1")
    assert from_arrays.columns == ["label", "image", "prediction", "probability"]  # its own columns kept
    assert accuracy(from_bytes) == accuracy(from_arrays) == variant["test"]["accuracy"]
    assert variant["test"]["accuracy"] != best_variant(trained_run)["test"]["accuracy"], "the variants must differ"


@pytest.mark.mlflow
def test_the_logged_pyfunc_under_spark_udf_takes_raw_pixels_as_bytes_and_as_arrays(spark, trained_run, sample_test,
                                                                                   array_parquet, tmp_path):
    """The model as the job logs it (``serving.log_pyfunc``, in a local store): ``mlflow.pyfunc.spark_udf``
    over the data stage's ``pixels`` (no column named: the signature names it) and over 784 raw values."""
    mlflow = pytest.importorskip("mlflow")
    from pyspark.sql import functions as F

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("predict", artifact_location=(tmp_path / "artifacts").as_uri())
        examples = sample_test.frame.limit(3).toPandas()["pixels"]  # the input example: raw pixels
        with mlflow.start_run(experiment_id=experiment):
            info = serving.log_pyfunc(trained_run.output / "models" / "variant1" / "variant1.keras", examples)
        udf = mlflow.pyfunc.spark_udf(spark, info.model_uri, env_manager="local")
    finally:
        mlflow.set_tracking_uri(None)

    def predicted(probabilities):
        return F.array_position(probabilities, F.array_max(probabilities)).cast("int") - 1  # numpy's argmax

    expected = trained_run.variant("variant1")["test"]["accuracy"]
    over_bytes = sample_test.frame.withColumn("predicted", predicted(udf()))
    over_arrays = spark.read.parquet(str(array_parquet)).withColumn("predicted", predicted(udf("image")))
    assert accuracy(over_bytes, "predicted") == accuracy(over_arrays, "predicted") == expected


# -- what the served model takes: raw pixels in every form, scaled as training scales -------------------------


def test_every_form_of_raw_pixels_gives_the_same_rows(raw_test_rows):
    import pandas as pd

    spec = load_data_spec()
    pixels = raw_test_rows[0][:4]
    as_bytes = [row.astype(np.uint8).tobytes() for row in pixels]
    forms = [pixels, pixels.reshape(-1, 28, 28), pixels.reshape(-1, 28, 28, 1).astype(np.float32), as_bytes,
             pd.Series(as_bytes), pd.Series(list(pixels)), [row.tolist() for row in pixels],
             pd.DataFrame({"pixels": as_bytes}), {"pixels": pixels.reshape(-1, 28, 28, 1)}, pd.DataFrame(pixels)]
    for form in forms:
        np.testing.assert_array_equal(serving.raw_pixel_rows(form, spec), pixels.astype(np.uint8))


def test_the_model_input_is_the_data_stages_scaling_bit_for_bit(raw_test_rows):
    """The served input equals what the driver's reference evaluation feeds the model (``images_and_labels``)."""
    from sparkml_mnist.data.tensors import images_and_labels

    pixels, labels = raw_test_rows
    rows = pixels.astype(np.uint8)
    table = pa.table({"label": labels, "pixels": pa.array([row.tobytes() for row in rows], pa.binary())})
    reference, _ = images_and_labels(table)
    np.testing.assert_array_equal(np.asarray(serving.model_input(rows)), reference)


@pytest.mark.parametrize("form,words", [
    (np.full((2, 784), 0.5, np.float32), "row 0, pixel 0 is 0.5, not a whole number 0..255 (already scaled?"),
    (np.full((2, 784), 256), "is 256, not a whole number"),
    ([b"\0" * 784, b"\0" * 783], "row 1 holds 783 pixel bytes, not 784"),
    (np.zeros((2, 785)), "an array of shape (2, 785) is not images of 784 pixels"),
    ([[1] * 784, None], "row 1 has no pixels (null)"),
    (["text", "more"], "not pixels"),
])
def test_what_is_not_raw_pixels_is_refused_naming_it(form, words):
    with pytest.raises(ConfigError) as caught:
        serving.raw_pixel_rows(form)
    assert words in str(caught.value)


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------------


def run_predict(capsys, *argv: str) -> tuple[int, str]:
    """The exit code and the error: exactly one line (a library's warning may come before it: MLflow's store)."""
    code = main(["predict", *argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sparkml-mnist: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return code, errors[0]


def test_a_model_that_does_not_load_is_one_line_before_spark_work(tmp_path, capsys, monkeypatch):
    from sparkml_mnist.launcher.keras_flavour import keras

    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a model")
    other = tmp_path / "other.keras"  # a Keras model, but not one for MNIST's images
    keras().Sequential([keras().Input((10,)), keras().layers.Dense(3)]).save(other)
    foreign = tmp_path / "foreign-mlflow-model"  # an MLflow model folder without this tool's keras artifact
    foreign.mkdir()
    (foreign / "MLmodel").write_text("flavors:\n  sklearn: {pickled_model: model.pkl}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    output = tmp_path / "out"
    cases = [(broken, f"model {broken} does not load as a Keras model"),
             (other, f"model {other} takes (10,) and gives 3 values a row"),
             (tmp_path / "missing", "no such file or folder"),
             (tmp_path, "a folder without report.json or MLmodel"),
             (foreign, "is an MLflow model, but not one this tool logged")]
    if importlib.util.find_spec("mlflow") is not None:
        cases.append(("runs:/0123456789abcdef0123456789abcdef/model", "cannot be fetched from MLflow"))
    for model, words in cases:
        code, err = run_predict(capsys, "--model", str(model), "--data", "sample", "--output", str(output))
        assert code == EXIT_USAGE and words in err, err
    assert not output.exists()


def test_an_unknown_variant_names_the_runs_models(trained_run, tmp_path, capsys):
    code, err = run_predict(capsys, "--model", str(trained_run.output), "--variant", "variant9", "--data", "sample",
                            "--output", str(tmp_path / "out"))
    assert code == EXIT_USAGE and "--variant variant9" in err and "variant1, variant3" in err
    assert not (tmp_path / "out").exists()


def test_an_output_that_exists_is_refused_and_left_as_it_was(trained_run, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    code, err = run_predict(capsys, "--model", str(trained_run.output), "--data", "sample", "--output", str(output))
    assert code == EXIT_USAGE and f"--output {output} exists" in err
    code, err = run_predict(capsys, "--model", str(trained_run.output), "--data", "sample", "--output", str(output),
                            "--overwrite")  # --overwrite replaces only a folder of a Spark writer's output
    assert code == EXIT_USAGE and "holds 'notes.txt', which no Spark writer wrote" in err
    assert [entry.name for entry in output.iterdir()] == ["notes.txt"] and (output / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("table,words", [
    (pa.table({"pixels": ["a", "b"], "label": [1, 2]}), "column 'pixels' is string, not pixels"),
    (pa.table({"pixels": [b"\0" * 784, b"\0" * 783], "label": [1, 2]}), "column 'pixels' has a row of 783 bytes, not 784"),
    (pa.table({"image": [[0] * 784, [0] * 785]}), "column 'image' has a row of 785 values, not 784"),
    (pa.table({"image": [[0] * 784, [0.5] * 784]}), "column 'image' holds 0.5, not a whole number 0..255"),
])
def test_a_column_that_is_not_pixels_is_one_line_and_nothing_is_written(spark, trained_run, tmp_path, capsys,
                                                                        table, words):
    data, output = tmp_path / "input.parquet", tmp_path / "out"
    pq.write_table(table, data)
    code, err = run_predict(capsys, "--model", str(trained_run.output), "--data", str(data), "--output", str(output))
    assert code == EXIT_USAGE and f"{data}: {words}" in err, err
    assert not output.exists()
