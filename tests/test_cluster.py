"""spark-submit on a REAL standalone cluster started by this module (a Master and two 1-core Workers
from pyspark's own ``spark-class`` launcher classes on 127.0.0.1), two ways of shipping the code:

1. the package as its wheel (``--py-files <wheel as .zip>``), executors on a Python that sees every
   dependency of this venv but NOT the editable install of this repository (its ``.pth`` finder is
   not processed there), so ``import sparkml_mnist`` is only possible from the shipped zip;
2. a packed environment (``--archives env.tar.gz#environment``, ``spark.pyspark.python=
   ./environment/bin/python``, built by scripts/pack_env.py): the executors' Python, TensorFlow and
   the package come only from the archive; the Python the executors would get otherwise has none.

Each run trains variant1 for one epoch at ``np=2`` on a slice of the bundled sample, and the two
ranks must have run in two different executor JVMs (``standalone_cluster.assert_ranks_ran_in_two_
executor_jvms``). Everything started is stopped, also on failure. Deselect with ``-m "not cluster"``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest
from spark_processes import LOG_TAIL_CHARS
from standalone_cluster import (
    PACK_SCRIPT,
    REPO,
    START_TIMEOUT_S,
    assert_ranks_ran_in_two_executor_jvms,
    bare_python,
    module_origins,
    pack_script,
    read_event_log,
    spark_properties,
    standalone_cluster,
    submit_job,
)

pytestmark = pytest.mark.cluster

# The packed environment is cached here (git-ignored) across runs: scripts/pack_env.py reuses the venv
# while setup.py is unchanged, and does nothing while the archive is newer than every packaged source.
PACK_CACHE = REPO / ".venv-pack"
ARCHIVE_ALIAS = "environment"  # the folder the archive is unpacked to in each executor's working dir
PACK_TIMEOUT_S = 1800.0  # TensorFlow from an empty pip cache on a slow network, then the packing
JOB_MODULES = ("sparkml_mnist", "pyarrow", "pandas", "tensorflow", "tf_keras", "yaml", "sklearn")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with standalone_cluster(tmp_path_factory.mktemp("cluster"), uuid.uuid4().hex) as started:
        yield started


@pytest.fixture(scope="module")
def packed_env() -> Path:
    archive = PACK_CACHE / "sparkml-mnist-env-cpu.tar.gz"
    built = subprocess.run(
        [sys.executable, str(PACK_SCRIPT), "--venv", str(PACK_CACHE / "venv-cpu"), "--output", str(archive)],
        capture_output=True, text=True, timeout=PACK_TIMEOUT_S,
    )
    sys.stdout.write(built.stdout)  # shown with -rA / on failure: reused or built, size and seconds
    if built.returncode != 0:
        pytest.fail(f"{PACK_SCRIPT} failed (exit {built.returncode}):\n{(built.stdout + built.stderr)[-LOG_TAIL_CHARS:]}")
    return archive


def python_without_the_editable_install(root: Path) -> Path:
    """A venv whose site-packages points at this venv's packages through a plain path entry.

    A directory named in a ``.pth`` file is added to ``sys.path``, but the ``.pth`` files inside
    it are not processed, so the editable install's import hook is absent there.
    """
    python = bare_python(root, "exec-venv")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=START_TIMEOUT_S,
    ).stdout.strip()
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "dependencies-of-work-venv.pth").write_text("\n".join(sorted(here)) + "\n")
    found = [origin is not None for origin in module_origins(python, ("pyspark", *JOB_MODULES), root)]
    assert found == [True, False] + [True] * 6, f"the executors' Python must see the dependencies but not sparkml_mnist: {found}"
    return python


def test_spark_submit_on_a_standalone_cluster_runs_the_ranks_in_two_executor_jvms(cluster, tmp_path):
    wheel = pack_script().build_wheel(tmp_path)
    # pyspark puts only .zip/.egg/.jar files of --py-files on the executors' sys.path (its
    # PACKAGE_EXTENSIONS); a .whl is shipped but never importable there. A wheel is a zip.
    shipped = wheel.with_suffix(".zip")
    shipped.write_bytes(wheel.read_bytes())
    python = python_without_the_editable_install(tmp_path)
    env = {**cluster.env, "PYSPARK_PYTHON": str(python), "PYSPARK_DRIVER_PYTHON": str(python)}
    submission = submit_job(cluster, tmp_path, "submit-wheel", env, {}, ["--py-files", str(shipped)])

    properties = spark_properties(read_event_log(submission.events))
    assert str(shipped) in properties.get("spark.submit.pyFiles", ""), "the wheel is shipped"
    assert_ranks_ran_in_two_executor_jvms(cluster, submission)


def test_a_packed_environment_is_the_executors_only_python(cluster, packed_env, tmp_path):
    # Without the archive the executors would run this Python: it has neither TensorFlow nor the package.
    elsewhere = bare_python(tmp_path, "no-tensorflow")
    assert module_origins(elsewhere, ("tensorflow", "sparkml_mnist", "pyarrow"), tmp_path) == [None] * 3
    env = {**cluster.env, "PYSPARK_PYTHON": str(elsewhere)}
    conf = {
        "spark.pyspark.python": f"./{ARCHIVE_ALIAS}/bin/python",
        "spark.pyspark.driver.python": sys.executable,  # client mode: the driver runs here, in the test's venv
    }
    try:
        submission = submit_job(cluster, tmp_path, "submit-archive", env, conf, ["--archives", f"{packed_env}#{ARCHIVE_ALIAS}"])
        check_the_archive_was_the_executors_python(cluster, submission, packed_env)
    finally:  # each executor unpacked 2+ GB; pytest keeps the last runs' temporary folders
        for unpacked in (p for d in cluster.worker_dirs for p in d.glob(f"app-*/*/{ARCHIVE_ALIAS}")):
            shutil.rmtree(unpacked, ignore_errors=True)


def check_the_archive_was_the_executors_python(cluster, submission, packed_env: Path) -> None:
    properties = spark_properties(read_event_log(submission.events))
    assert f"{packed_env}#{ARCHIVE_ALIAS}" in properties.get("spark.archives", ""), properties.get("spark.archives")
    assert not properties.get("spark.submit.pyFiles"), "no code is shipped beside the archive"
    for executor, folder in assert_ranks_ran_in_two_executor_jvms(cluster, submission).items():
        unpacked = folder / ARCHIVE_ALIAS
        assert (unpacked / "pyvenv.cfg").is_file(), f"executor {executor}: the archive is not unpacked in {folder}"
        # That Python (./environment/bin/python in the executor's working dir) finds every module the job
        # needs inside the unpacked archive, and nowhere else.
        origins = module_origins(unpacked / "bin" / "python", JOB_MODULES, folder)
        assert all(origin and Path(origin).is_relative_to(unpacked) for origin in origins), origins
