"""The driver JVM the CLI starts: C1 only, and Spark's classes from an archive the first run writes.

The archive's rules are checked on files (who writes, who maps, what a killed writer leaves); one
fresh process's JVM writes a real archive and a second process's JVM maps it (its memory maps name it).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparkml_mnist.cli import jvm, session
from sparkml_mnist.config.platform import LocalJvmSettings

SETTINGS = LocalJvmSettings(java_options="-XX:TieredStopAtLevel=1", class_archive=True, keep_unused_archive_days=30)
WRITE_WAIT_S = 240.0
DEAD_PID = 2**22 + 12345  # above Linux's pid_max default: never a live process


def whole_archive(path: Path) -> None:
    path.write_bytes(jvm.DYNAMIC_ARCHIVE_MAGIC + b"\0" * 64)


def test_the_user_s_own_options_decide_where_they_speak():
    plan = jvm.ArchivePlan(Path("/c/a.jsa"), "-XX:SharedArchiveFile=/c/a.jsa -Xlog:cds*=off")
    options = functools.partial(jvm.java_options, environ={})
    assert options("", SETTINGS, plan) == "-XX:TieredStopAtLevel=1 -XX:SharedArchiveFile=/c/a.jsa -Xlog:cds*=off"
    assert options("-Dx=1 -XX:TieredStopAtLevel=4", SETTINGS, plan) == (
        "-Dx=1 -XX:TieredStopAtLevel=4 -XX:SharedArchiveFile=/c/a.jsa -Xlog:cds*=off"
    )
    assert options("-Xshare:off", SETTINGS, plan) == "-Xshare:off -XX:TieredStopAtLevel=1"
    assert options("", LocalJvmSettings("", False, 30), None) == ""


def test_spark_defaults_conf_s_driver_options_are_kept_beside_ours(tmp_path, monkeypatch):
    """A ``--conf`` replaces spark-defaults.conf's value of the same key, so the file's options are read and kept
    (by hand: its ``-D`` property reached a fresh JVM only after this; before, the JVM had none of it)."""
    (tmp_path / session.SPARK_DEFAULTS_FILE).write_text(
        "# a comment\n! another\n\nspark.master   local[1]\nspark.driver.extraJavaOptions  -Dproxy=on -Xss4m  \n"
        "spark.executor.memory=2g\nspark.driver.memory: 3g\n"
    )
    assert session.spark_defaults(tmp_path) == {
        "spark.master": "local[1]", "spark.driver.extraJavaOptions": "-Dproxy=on -Xss4m",
        "spark.executor.memory": "2g", "spark.driver.memory": "3g",
    }
    monkeypatch.setenv(session.SPARK_CONF_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(session, "SparkConf", dict)  # as before a JVM: this worker's session's JVM would answer
    assert session.users_driver_options({}) == "-Dproxy=on -Xss4m"
    assert session.users_driver_options({session.DRIVER_JAVA_OPTIONS: "-Dmine=1"}) == "-Dmine=1"  # the caller's wins
    assert jvm.java_options(session.users_driver_options({}), SETTINGS, None, {}) == (
        "-Dproxy=on -Xss4m -XX:TieredStopAtLevel=1"
    )
    monkeypatch.setenv(session.SPARK_CONF_DIR_ENV, str(tmp_path / "none-here"))
    assert session.users_driver_options({}) == ""


def test_a_folder_on_the_jvm_s_class_path_means_no_archive(tmp_path, monkeypatch):
    """Java refuses to write (and to map) an archive over a class path with a folder holding files: by hand, a
    CLI run with a spark-defaults.conf in SPARK_CONF_DIR ended with "Error occurred during initialization of
    VM: Cannot have non-empty directory in paths" and tried again each run; now it plans no archive."""
    monkeypatch.delenv(session.SPARK_CONF_DIR_ENV, raising=False)
    monkeypatch.setattr(session, "SparkConf", dict)  # as before a JVM
    empty, conf = tmp_path / "empty", tmp_path / "conf"
    empty.mkdir()
    conf.mkdir()
    assert session.classpath_folders({}, {session.SPARK_CONF_DIR_ENV: str(empty)}) == []
    assert session.classpath_folders({}, {session.SPARK_CONF_DIR_ENV: str(tmp_path / "none")}) == []
    (conf / session.SPARK_DEFAULTS_FILE).write_text("spark.master local[1]\n")
    assert session.classpath_folders({}, {session.SPARK_CONF_DIR_ENV: str(conf)}) == [str(conf)]
    empty_conf = {session.SPARK_CONF_DIR_ENV: str(empty)}
    assert session.classpath_folders({}, {**empty_conf, "HADOOP_CONF_DIR": "/etc/hadoop"}) == ["/etc/hadoop"]
    assert session.classpath_folders({session.DRIVER_CLASSPATH: "/opt/x"}, empty_conf) == ["/opt/x"]
    (empty / session.SPARK_DEFAULTS_FILE).write_text("spark.driver.extraClassPath /opt/y\n")
    assert session.classpath_folders({}, empty_conf) == [str(empty), "/opt/y"]


def test_the_environment_s_options_replace_the_conf_file_s():
    settings = LocalJvmSettings("-XX:TieredStopAtLevel=1", True, 30)
    assert jvm.java_options("-Dx=1", settings, None, {jvm.OPTIONS_ENV: "-Xss2m"}) == "-Dx=1 -Xss2m"
    assert jvm.java_options("-Dx=1", settings, None, {jvm.OPTIONS_ENV: ""}) == "-Dx=1"
    assert jvm.java_options("", LocalJvmSettings("", True, 30), None, {}) == ""  # the product's default: none


def test_the_cache_folder_follows_the_environment(tmp_path):
    assert jvm.cache_folder({jvm.CACHE_ENV: "None"}) is None
    assert jvm.cache_folder({jvm.CACHE_ENV: str(tmp_path)}) == tmp_path
    assert jvm.cache_folder({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "sparkml-mnist" / "jvm"


def test_a_process_without_a_home_runs_without_the_archive(monkeypatch):
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert jvm.cache_folder({}) is None


def test_one_archive_per_java_and_spark(tmp_path):
    java = tmp_path / "java"
    java.write_text("")
    first = jvm.archive_path(tmp_path, str(java), "/spark", "4.3.0")
    assert first == jvm.archive_path(tmp_path, str(java), "/spark", "4.3.0")
    assert first != jvm.archive_path(tmp_path, str(java), "/other-spark", "4.3.0")
    assert first != jvm.archive_path(tmp_path, str(java), "/spark", "4.3.1")
    os.utime(java, ns=(1, 1))  # a Java updated in place
    assert first != jvm.archive_path(tmp_path, str(java), "/spark", "4.3.0")


def test_only_a_writer_claims_and_one_at_a_time(tmp_path):
    archive = tmp_path / "cache" / "spark.jsa"
    assert jvm.plan_archive(archive, write=False) == jvm.ArchivePlan(archive)  # nothing to map, nothing claimed
    plan = jvm.plan_archive(archive, write=True)
    assert plan.writing == tmp_path / "cache" / f"spark.jsa.{os.getpid()}.writing"
    assert plan.options.startswith(f"-XX:ArchiveClassesAtExit={plan.writing} ")
    assert plan.lock.read_text() == str(os.getpid())
    assert jvm.plan_archive(archive, write=True) == jvm.ArchivePlan(archive)  # the lock's holder lives: no second writer
    jvm.release(plan)
    assert not plan.lock.exists()


def test_a_stale_claim_without_a_pid_is_taken_over_but_a_fresh_one_is_not(tmp_path):
    archive = tmp_path / "spark.jsa"
    lock = tmp_path / "spark.jsa.lock"
    lock.write_text("")  # a claimer between creating the lock and writing its pid
    assert jvm.plan_archive(archive, write=True) == jvm.ArchivePlan(archive)
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))  # ... or one that died there
    assert jvm.plan_archive(archive, write=True).writing is not None


def test_java_options_the_jvm_refuses_are_one_line_naming_them(tmp_path):
    env = {**os.environ, jvm.CACHE_ENV: str(tmp_path / "cache"), jvm.OPTIONS_ENV: "-Xmxbogus"}
    done = subprocess.run([sys.executable, "-m", "sparkml_mnist.cli", "data"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("sparkml-mnist")]
    assert len(ours) == 1 and "Traceback" not in done.stderr
    assert "the driver JVM exited as it started" in ours[0] and "-Xmxbogus" in ours[0] and jvm.OPTIONS_ENV in ours[0]
    assert not list((tmp_path / "cache").glob("*.lock"))  # the claim went with it


def test_a_writer_removes_archives_no_jvm_has_mapped_for_a_month(tmp_path):
    old, recent, foreign = tmp_path / "spark-old.jsa", tmp_path / "spark-recent.jsa", tmp_path / "notes.txt"
    for path in (old, recent, foreign):
        path.write_bytes(b"x")
    month_ago = time.time() - 31 * 86_400
    for path in (old, foreign):
        os.utime(path, (month_ago, month_ago))
    assert jvm.plan_archive(tmp_path / "spark.jsa", write=False, unused_days=30).writing is None
    assert old.exists()  # only a writer tidies
    assert jvm.plan_archive(tmp_path / "spark.jsa", write=True, unused_days=30).writing is not None
    assert not old.exists() and recent.exists() and foreign.exists()


def test_a_finished_writer_s_file_is_put_in_place_and_mapped(tmp_path):
    archive = tmp_path / "spark.jsa"
    (tmp_path / "spark.jsa.lock").write_text(f"{DEAD_PID} {DEAD_PID + 1}")
    whole_archive(tmp_path / f"spark.jsa.{DEAD_PID}.writing")
    plan = jvm.plan_archive(archive, write=False)
    assert plan.options == f"-XX:SharedArchiveFile={archive} {jvm.QUIET_ARCHIVE_OPTIONS}"
    assert archive.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["spark.jsa"]


def test_a_writer_killed_while_writing_leaves_nothing_that_is_mapped(tmp_path):
    archive = tmp_path / "spark.jsa"
    (tmp_path / "spark.jsa.lock").write_text(str(DEAD_PID))
    (tmp_path / f"spark.jsa.{DEAD_PID}.writing").write_bytes(b"\0" * 4096)  # Java writes the header last
    assert jvm.plan_archive(archive, write=False) == jvm.ArchivePlan(archive)
    assert list(tmp_path.iterdir()) == []
    plan = jvm.plan_archive(archive, write=True)  # the next CLI run writes it again
    assert plan.writing is not None and plan.lock.is_file()


def test_a_live_writer_s_file_is_left_alone(tmp_path):
    archive = tmp_path / "spark.jsa"
    (tmp_path / "spark.jsa.lock").write_text(f"{DEAD_PID} {os.getpid()}")  # its JVM is still writing
    writing = tmp_path / f"spark.jsa.{DEAD_PID}.writing"
    whole_archive(writing)
    assert jvm.plan_archive(archive, write=True) == jvm.ArchivePlan(archive)
    assert writing.is_file() and not archive.exists()


def test_a_cache_folder_that_cannot_be_written_only_costs_the_archive(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert jvm.plan_archive(blocked / "spark.jsa", write=True) == jvm.ArchivePlan(blocked / "spark.jsa")


WRITER = """
from sparkml_mnist.cli.session import create_spark
create_spark("writer", master="local[1]", write_class_archive=True)  # as the CLI's commands call it
"""
MAPPED_PROBE = """
import json
from pyspark import SparkContext
from sparkml_mnist.cli.session import class_archive_path, create_spark
spark = create_spark("probe", master="local[1]")
maps = open(f"/proc/{SparkContext._gateway.proc.pid}/maps").read()
print(json.dumps({"archive": str(class_archive_path()), "mapped": str(class_archive_path()) in maps,
                  "options": spark.sparkContext.getConf().get("spark.driver.extraJavaOptions")}))
"""


def running(pid: int) -> bool:
    """Alive and not a zombie (/proc/PID/stat's state)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the JVM's memory maps from /proc")
def test_a_writer_s_jvm_writes_the_archive_as_it_exits_and_the_next_jvm_maps_it(tmp_path):
    env = {**os.environ, jvm.CACHE_ENV: str(tmp_path / "cache"), jvm.OPTIONS_ENV: "-XX:TieredStopAtLevel=1"}
    first = subprocess.run([sys.executable, "-c", WRITER], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "cds" not in first.stdout + first.stderr
    (lock,) = (tmp_path / "cache").glob("*.jsa.lock")
    python_pid, jvm_pid = (int(value) for value in lock.read_text().split())
    assert running(jvm_pid), "the output's pipes closed only once the writing JVM was done"  # `| tee` waited ~12 s
    deadline = time.monotonic() + WRITE_WAIT_S  # the JVM writes as it exits, after its Python process ended
    while Path(f"/proc/{jvm_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    (written,) = (tmp_path / "cache").glob(f"*.jsa.{python_pid}{jvm.WRITING_SUFFIX}")
    assert jvm.is_whole_archive(written)

    second = subprocess.run([sys.executable, "-c", MAPPED_PROBE], env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    seen = json.loads(second.stdout.strip().splitlines()[-1])
    assert seen["archive"] == str(written.with_name(written.name[: -len(f".{python_pid}{jvm.WRITING_SUFFIX}")]))
    assert Path(seen["archive"]).is_file() and not written.exists() and not lock.exists()
    assert seen["mapped"], seen  # the JVM did not refuse it
    assert "-XX:TieredStopAtLevel=1" in seen["options"] and f"-XX:SharedArchiveFile={seen['archive']}" in seen["options"]
