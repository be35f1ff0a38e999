"""Configuration files load into typed objects; every mistake names the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparkml_mnist.config import DataSpec, from_mapping, load_data_spec, load_yaml
from sparkml_mnist.errors import ConfigError

GOOD = {
    "num_features": 784,
    "image_shape": [28, 28, 1],
    "num_classes": 10,
    "max_pixel_value": 255,
    "train_file": "mnist-digits-train.txt",
    "test_file": "mnist-digits-test.txt",
    "databricks_data_dir": "dbfs:/databricks-datasets/mnist-digits/data-001/",
}


def test_shipped_data_conf_loads():
    spec = load_data_spec()
    assert spec == from_mapping(DataSpec, GOOD, "test")
    assert spec.image_shape == (28, 28, 1)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"num_features": -1}, "field 'num_features' must be a positive integer"),
        ({"num_features": "784"}, "field 'num_features' must be int"),
        ({"num_classes": True}, "field 'num_classes' must be int"),
        ({"image_shape": [28, 28]}, "field 'image_shape' must be a list of 3 values"),
        ({"image_shape": [28, 0, 1]}, "field 'image_shape' must be three positive integers"),
        ({"image_shape": [28, 27, 1]}, "holds 756 values but 'num_features' is 784"),
        ({"colour": "red"}, "unknown field(s) colour"),
        ({"train_file": None}, "field 'train_file' must be str"),
    ],
)
def test_bad_data_spec_names_the_field(change, words):
    settings = {**GOOD, **change}
    with pytest.raises(ConfigError) as caught:
        from_mapping(DataSpec, settings, "conf/data.yaml")
    assert str(caught.value).startswith("conf/data.yaml: ")
    assert words in str(caught.value)


def test_missing_field_is_named():
    settings = dict(GOOD)
    del settings["num_classes"]
    with pytest.raises(ConfigError, match="conf/data.yaml: missing required field 'num_classes'"):
        from_mapping(DataSpec, settings, "conf/data.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("num_features: 784\nimage_shape: [28, 28\nnum_classes: 10\n")
    with pytest.raises(ConfigError, match=rf"{path}, line \d+: invalid YAML"):
        load_yaml(path)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_yaml(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(listing)


# --- variants --------------------------------------------------------------------------------------

from sparkml_mnist.config import available_variants, load_variant  # noqa: E402

VARIANT = """\
name: variant5
description: a fifth variant, added by this file alone
layers:
  - {type: conv2d, filters: 4, kernel_size: [3, 3], activation: relu}
  - {type: flatten}
  - {type: dense, units: 10, activation: softmax}
optimizer: adam
loss: categorical_crossentropy
epochs: 3
batch_size: 128
validation_split: 0.1
"""


def test_the_four_lab_variants_ship_with_the_lab_settings():
    assert available_variants() == ["variant1", "variant2", "variant3", "variant4"]
    settings = {name: load_variant(name) for name in available_variants()}
    assert [settings[n].epochs for n in available_variants()] == [20, 15, 15, 15]
    assert [settings[n].optimizer for n in available_variants()] == ["adam", "adam", "adam", "sgd"]
    assert [settings[n].validation_split for n in available_variants()] == [0.1, 0.1, 0.0, 0.0]
    assert all(v.batch_size == 128 for v in settings.values())
    assert settings["variant1"].lab.parameters == 149010 and settings["variant3"].lab.parameters == 600810


def test_a_fifth_variant_is_a_yaml_file(tmp_path):
    path = tmp_path / "variant5.yaml"
    path.write_text(VARIANT)
    variant = load_variant(str(path))
    assert variant.name == "variant5" and len(variant.layers) == 3
    assert variant.layers[0].kernel_size == (3, 3)


@pytest.mark.parametrize(
    "old,new,words",
    [
        ("{type: flatten}", "{type: flaten}", "field 'layers[1].type' is 'flaten'; expected one of conv2d"),
        ("epochs: 3", "epochs: -3", "field 'epochs' must be a positive integer"),
        ("epochs: 3\n", "", "missing required field 'epochs'"),
        ("optimizer: adam", "optimizer: adamw2", "field 'optimizer' is 'adamw2'"),
        ("filters: 4,", "filters: 0,", "field 'layers[0].filters' must be a positive integer, got 0"),
        ("kernel_size: [3, 3]", "kernel_size: [3]", "field 'layers[0].kernel_size' must be a list of 2 values"),
        ("kernel_size: [3, 3]", "kernel_size: [3, -1]", "field 'layers[0].kernel_size' must be two positive integers"),
        ("activation: relu}", "activation: relux}", "field 'layers[0].activation' is 'relux'"),
        ("{type: flatten}", "{type: flatten, units: 3}", "unknown field(s) layers[1].units"),
        ("{type: flatten}", "{type: dense, units: many}", "field 'layers[1].units' must be int"),
        ("name: variant5", "name: ../escape", "field 'name' is '../escape': use letters, digits"),
        ("epochs: 3\n", "epochs: 3\nlab: {test_accuracy: 99.1}\n", "field 'lab.test_accuracy' must be in [0, 1)"),
        ("validation_split: 0.1", "validation_split: 1.5", "field 'validation_split' must be in [0, 1)"),
        ("batch_size: 128", "batch_size: many", "field 'batch_size' must be int"),
    ],
)
def test_bad_variant_names_file_and_field(tmp_path, old, new, words):
    path = tmp_path / "bad.yaml"
    assert old in VARIANT
    path.write_text(VARIANT.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_variant(str(path))
    assert str(caught.value).startswith(f"{path}: ")
    assert words in str(caught.value)


def test_unknown_variant_name_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown variant 'variant9'; available: variant1, variant2"):
        load_variant("variant9")


def test_global_batch_must_split_evenly_across_replicas():
    from sparkml_mnist.job.plan import check_replicas

    variant = load_variant("variant1")
    check_replicas(variant, 2)
    with pytest.raises(ConfigError, match="field 'batch_size' \\(128\\) is not divisible by the 3 replicas"):
        check_replicas(variant, 3)
    assert variant.with_epochs(2).epochs == 2 and variant.with_epochs(None).epochs == 20


def test_xla_with_several_ranks_is_refused_where_it_cannot_run():
    from dataclasses import replace

    from sparkml_mnist.launcher.placement import Placement
    from sparkml_mnist.job.plan import check_xla

    two, one = Placement(size=2, on_driver=False), Placement(size=1, on_driver=False)
    plain = load_variant("variant3")
    assert plain.jit_compile is False  # the shipped default (benchmarks/RESULTS.md, "XLA")
    check_xla(plain, two, on_gpus=False)
    xla = replace(plain, jit_compile=True)
    check_xla(xla, one, on_gpus=False)  # one rank: no collectives to compile
    check_xla(xla, two, on_gpus=True)  # XLA collectives exist on GPUs
    with pytest.raises(ConfigError, match=r"variant3.yaml: field 'jit_compile' is true, but 2 ranks .* CPU devices"):
        check_xla(xla, two, on_gpus=False)
    with pytest.raises(ConfigError, match="the 'horovod' backend's all-reduce cannot be compiled"):
        check_xla(xla, Placement(size=2, on_driver=False, backend="horovod"), on_gpus=True)


def test_jit_compile_must_be_a_boolean(tmp_path):
    text = (Path(load_variant("variant1").source).read_text()).replace("jit_compile: false", "jit_compile: maybe")
    path = tmp_path / "variant1.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="field 'jit_compile' must be bool"):
        load_variant(str(path))


def test_run_backend_is_checked_once_where_np_is_parsed():
    from sparkml_mnist.config import load_run
    from sparkml_mnist.job.plan import plan_job

    run = load_run("sample")
    assert run.backend == "tf" and run.with_overrides(backend="horovod").backend == "horovod"
    with pytest.raises(ConfigError, match="field 'backend' is 'mpi'; choose one of tf, horovod"):
        plan_job(run.with_overrides(backend="mpi"))


def test_run_overrides_go_through_the_loader_and_name_the_file():
    from sparkml_mnist.config import load_run

    run = load_run("sample")
    with pytest.raises(ConfigError, match=r"sample.yaml \(with command-line overrides\): field 'epochs' must be a positive"):
        run.with_overrides(epochs=-1)
    with pytest.raises(ConfigError, match="field 'variants' names a variant twice"):
        run.with_overrides(variants="variant1,variant1")
    assert run.with_overrides(variants="variant2").variants == ("variant2",)


def test_two_variant_files_with_one_name_are_refused(tmp_path):
    from sparkml_mnist.config import load_run

    for copy in ("a.yaml", "b.yaml"):
        (tmp_path / copy).write_text(VARIANT)
    run = load_run("sample").with_overrides(variants=f"{tmp_path / 'a.yaml'},{tmp_path / 'b.yaml'}")
    with pytest.raises(ConfigError, match="two variants named variant5"):
        run.load_variants()


# hdfs: is refused by tests/test_cli.py (before Spark starts)
@pytest.mark.parametrize("uri", ["s3a://bucket/reports", "dbfs:/tmp/reports", "file://otherhost/x"])
def test_an_output_the_report_writer_cannot_write_is_refused_before_any_work(uri):
    from sparkml_mnist.config import load_run
    from sparkml_mnist.job.plan import plan_job

    with pytest.raises(ConfigError, match=r"field 'output' \(--output\) .*the report is written by the driver"):
        plan_job(load_run("sample").with_overrides(output=uri))


def test_a_local_file_uri_output_is_its_path(tmp_path):
    from sparkml_mnist.config import load_run
    from sparkml_mnist.job.plan import plan_job

    plan = plan_job(load_run("sample").with_overrides(output=f"file://{tmp_path}/run-1"))
    assert plan.output == tmp_path / "run-1"
    assert plan_job(load_run("sample").with_overrides(output=f"file:{tmp_path}/run-2")).output == tmp_path / "run-2"
    assert plan_job(load_run("sample").with_overrides(output="out/run-3")).output == Path("out/run-3")


def test_a_non_empty_output_folder_is_a_config_error_at_plan_time(tmp_path):
    from sparkml_mnist.config import load_run
    from sparkml_mnist.job.plan import plan_job

    report = {"generator": "sparkml-mnist", "schema_version": 1, "variants": [],
              "files": {"markdown": "report.md", "comparison_plot": "comparison.png"}}
    (tmp_path / "report.json").write_text(json.dumps(report))  # this tool's report: --overwrite may replace it
    run = load_run("sample").with_overrides(output=str(tmp_path))
    with pytest.raises(ConfigError, match="output folder exists and is not empty"):
        plan_job(run)
    assert plan_job(run, overwrite=True).output == tmp_path


def test_max_steps_per_epoch_is_a_run_setting_and_a_flag_and_caps_training_and_validation_steps():
    from sparkml_mnist.cli.commands import _run_config, build_parser
    from sparkml_mnist.config import load_run
    from sparkml_mnist.data.split import plan_shards
    from sparkml_mnist.training.inputs import steps_per_epoch
    from sparkml_mnist.training.loop import VariantPlan

    run = load_run("sample")
    assert run.max_steps_per_epoch is None and load_run("lab").max_steps_per_epoch is None  # whole epochs
    assert run.with_overrides(max_steps_per_epoch=20).max_steps_per_epoch == 20
    with pytest.raises(ConfigError, match="field 'max_steps_per_epoch' must be a positive integer, got 0"):
        run.with_overrides(max_steps_per_epoch=0)
    assert _run_config(build_parser().parse_args(["train", "--max-steps-per-epoch", "20"])).max_steps_per_epoch == 20
    assert _run_config(build_parser().parse_args(["train", "--max-steps-per-epoch", ""])).max_steps_per_epoch is None

    # Full MNIST at np=2, global batch 128: 421 training and 46 validation steps; the cap takes the smaller.
    shards = plan_shards(60_000, 2, 0.1)
    train, validation = (steps_per_epoch(rows, 128, 2) for rows in (shards.train_per_shard,
                                                                    shards.validation_per_shard))
    assert (train, validation) == (421, 46)
    capped = VariantPlan(load_variant("variant1"), shards, max_steps_per_epoch=20)
    assert (capped.capped(train), capped.capped(validation), capped.capped(7)) == (20, 20, 7)
    assert VariantPlan(load_variant("variant1"), shards).capped(train) == 421
