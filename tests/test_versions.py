"""Version guardrails: tested versions pass quietly, untested ones warn, impossible ones stop the job."""

from __future__ import annotations

import pytest

from sparkml_mnist.job.versions import VersionError, check_versions, enforce_versions

TESTED = {"pyspark": "4.3.0", "tensorflow": "2.21.0", "tf-keras": "2.21.0"}


def run(found: dict) -> list[str]:
    warnings: list[str] = []
    enforce_versions(warnings.append, found)
    return warnings


def test_this_environment_is_inside_the_tested_ranges():
    assert [c.problem for c in check_versions() if c.problem] == []


def test_tested_versions_pass_quietly():
    assert run(TESTED) == []


@pytest.mark.parametrize(
    "change,words",
    [
        ({"pyspark": "3.5.1"}, "pyspark 3.5.1 is outside the tested range"),
        ({"pyspark": "4.4.0"}, "pyspark 4.4.0 is outside the tested range"),
        ({"tensorflow": "2.22.0", "tf-keras": "2.22.0"}, "tensorflow 2.22.0 is outside the tested range"),
    ],
)
def test_untested_versions_warn_and_name_the_package(change, words):
    warnings = run({**TESTED, **change})
    assert any(words in w for w in warnings), warnings


@pytest.mark.parametrize(
    "change,words",
    [
        ({"pyspark": "3.4.1"}, "pyspark 3.4.1 cannot run this job"),
        ({"pyspark": None}, "pyspark is not installed"),
        ({"tf-keras": None}, "tf-keras is not installed (without it tf.keras is Keras 3"),
        ({"tf-keras": "2.20.1"}, "tf-keras 2.20.1 does not match tensorflow 2.21.0: install tf-keras==2.21.*"),
        ({"tensorflow": None}, "tensorflow is not installed"),
    ],
)
def test_versions_that_cannot_work_stop_the_job(change, words):
    with pytest.raises(VersionError) as caught:
        run({**TESTED, **change})
    assert words in str(caught.value)


def test_tensorflow_2_15_needs_no_tf_keras_and_is_tested():
    # The Horovod environment: TF 2.15's own tf.keras is Keras 2, and it is one of the tested ranges.
    assert run({"pyspark": "4.3.0", "tensorflow": "2.15.1", "tf-keras": None}) == []


def test_tensorflow_between_the_tested_ranges_warns():
    warnings = run({"pyspark": "4.3.0", "tensorflow": "2.18.0", "tf-keras": "2.18.0"})
    tf_warning = [w for w in warnings if "tensorflow 2.18.0 is outside the tested range" in w]
    assert len(tf_warning) == 1 and ">=2.21" in tf_warning[0] and ">=2.15.1" in tf_warning[0]  # both ranges named
