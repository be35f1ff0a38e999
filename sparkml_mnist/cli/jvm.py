"""The driver JVM this process starts itself: Spark's classes mapped from an archive, and its options.

A run on local Spark spends its first seconds in a fresh JVM loading Spark's classes, on the cores the
ranks need next (about 5.5 s for the session and 7.5 s for the first read of the bundled sample on a
2-core machine, benchmarks/RESULTS.md). Java's AppCDS (Java 13+) cuts that to about 3 and 5.5 s: a JVM
started with ``-XX:ArchiveClassesAtExit=F`` writes the classes it loaded to ``F`` when it exits, and
later JVMs started with ``-XX:SharedArchiveFile=F`` map them instead of loading them again.
``conf/platform.yaml``'s ``local_jvm.java_options`` (or ``SPARKML_MNIST_JVM_OPTIONS``) add options of
one's own, e.g. the quick C1 compiler only for short runs on little data.

The first CLI run on a machine (per Java and Spark install) writes the archive: it claims a lock, and its
JVM writes a file of its own as it exits, after the run (about 15 s of one core, in the background at
a lower priority; the CLI closes that JVM's stdout and stderr as it exits, so a pipe on its output
ends with the run). The next run finds that JVM gone and the file whole (Java writes the archive's header last, so a
JVM killed while writing leaves a file without one), moves it into place and maps it. A JVM that finds an archive from another Java or another Spark ignores it
(``-Xshare:auto``, the default; its notice is silenced), so a stale archive costs speed, never a run.
Only a JVM this process launches is touched: spark-submit's, Databricks' and the executors' keep
their own options.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from sparkml_mnist.config.platform import LocalJvmSettings

CACHE_ENV = "SPARKML_MNIST_JVM_CACHE"  # the archive's folder; "none" turns the archive off
NO_CACHE = "none"
OPTIONS_ENV = "SPARKML_MNIST_JVM_OPTIONS"  # replaces conf/platform.yaml's local_jvm.java_options
CACHE_SUBFOLDER = ("sparkml-mnist", "jvm")
ARCHIVE_SUFFIX = ".jsa"
LOCK_SUFFIX = ".lock"
WRITING_SUFFIX = ".writing"
DYNAMIC_ARCHIVE_MAGIC = (0xF00BABA8).to_bytes(4, "little")  # HotSpot's CDS_DYNAMIC_ARCHIVE_MAGIC
WRITER_NICENESS = 10
SECONDS_A_DAY = 86_400
FRESH_LOCK_S = 5.0  # a lock without a readable pid yet: being written, unless older than this
# An archive that does not fit (another Java, moved jars) is dropped with a notice on stdout; the
# class path's check has its own tag.
QUIET_ARCHIVE_OPTIONS = "-Xlog:cds*=off -Xlog:class+path*=off"
# Options by which the user's own driver options already decide the JIT or class sharing.
JIT_OPTIONS = ("-XX:TieredStopAtLevel", "-XX:-TieredCompilation", "-XX:+TieredCompilation")
SHARING_OPTIONS = ("-XX:SharedArchiveFile", "-XX:ArchiveClassesAtExit", "-Xshare")


@dataclass(frozen=True)
class ArchivePlan:
    """What this process's JVM does with the class archive: map it, write it, or neither."""

    archive: Path
    options: str = ""
    writing: Path | None = None  # the file this JVM writes at its exit (we hold the lock)
    lock: Path | None = None


def cache_folder(environ: Mapping[str, str] | None = None) -> Path | None:
    """``SPARKML_MNIST_JVM_CACHE``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` + ``sparkml-mnist/jvm``."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(CACHE_ENV, "").strip()
    if chosen.lower() == NO_CACHE:
        return None
    if chosen:
        return Path(chosen)
    base = environ.get("XDG_CACHE_HOME", "").strip()
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):  # no HOME and no passwd entry (some containers): no archive
            return None
    return Path(base, *CACHE_SUBFOLDER)


def java_runner(environ: Mapping[str, str] | None = None) -> str | None:
    """The ``java`` that Spark's ``spark-class`` runs: ``$JAVA_HOME/bin/java``, else the one on PATH."""
    environ = os.environ if environ is None else environ
    home = environ.get("JAVA_HOME", "").strip()
    found = os.path.join(home, "bin", "java") if home else shutil.which("java", path=environ.get("PATH"))
    return os.path.realpath(found) if found and os.path.exists(found) else None


def archive_path(folder: Path, java: str, spark_home: str, spark_version: str) -> Path:
    """One archive per Java build and Spark install: the name hashes what the JVM would otherwise refuse."""
    stat = os.stat(java)
    key = "|".join((java, str(stat.st_size), str(stat.st_mtime_ns), os.path.realpath(spark_home), spark_version))
    return folder / f"spark-{spark_version}-{hashlib.sha256(key.encode()).hexdigest()[:16]}{ARCHIVE_SUFFIX}"


def plan_archive(archive: Path, write: bool, unused_days: float | None = None) -> ArchivePlan:
    """Map ``archive`` when it exists (or a finished writer left it); else, with ``write``, claim writing it.

    A writer also removes the folder's other archives that no JVM has mapped for ``unused_days`` (those
    of a deleted virtual environment or an older Spark: 170 MB each).
    """
    lock = archive.with_name(archive.name + LOCK_SUFFIX)
    try:
        if not archive.is_file() and not _holder_alive(lock):
            _promote_finished(archive)
            lock.unlink(missing_ok=True)  # its writer is done
        if archive.is_file():
            return ArchivePlan(archive, f"-XX:SharedArchiveFile={archive} {QUIET_ARCHIVE_OPTIONS}")
        if not write:
            return ArchivePlan(archive)
        archive.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _claim(lock):
            return ArchivePlan(archive)
        if unused_days is not None:
            _remove_unused(archive, unused_days)
    except OSError:  # a read-only or foreign cache folder: run without an archive
        return ArchivePlan(archive)
    writing = archive.with_name(f"{archive.name}.{os.getpid()}{WRITING_SUFFIX}")
    return ArchivePlan(archive, f"-XX:ArchiveClassesAtExit={writing} {QUIET_ARCHIVE_OPTIONS}", writing, lock)


def started(plan: ArchivePlan, jvm_pid: int | None) -> None:
    """The writing JVM runs: the lock names it too (it outlives this process while it writes), and once
    this process exits it writes at a lower priority, so that what runs next keeps its cores."""
    if plan.lock is None or jvm_pid is None:
        return
    try:
        plan.lock.write_text(f"{os.getpid()} {jvm_pid}")
    except OSError:
        return
    atexit.register(_lower_priority, jvm_pid)


def _lower_priority(pid: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, pid, WRITER_NICENESS)
    except (OSError, AttributeError):  # gone already, or no priorities here (not POSIX)
        pass


def release(plan: ArchivePlan | None) -> None:
    """A JVM that did not start writes nothing: give the lock back."""
    if plan is not None and plan.lock is not None:
        plan.lock.unlink(missing_ok=True)
        if plan.writing is not None:
            plan.writing.unlink(missing_ok=True)


def _promote_finished(archive: Path) -> None:
    """No live writer: put the newest whole file a writer left in place; remove the others."""
    leftovers = sorted(archive.parent.glob(f"{archive.name}.*{WRITING_SUFFIX}"), key=_modified, reverse=True)
    for leftover in leftovers:
        try:
            if not archive.is_file() and is_whole_archive(leftover):
                os.replace(leftover, archive)
            else:
                leftover.unlink(missing_ok=True)
        except OSError:  # another process moved or removed it first
            pass


def _remove_unused(keep: Path, days: float) -> None:
    """Other archives not read for ``days`` (mapping a file sets its access time, at most daily under relatime)."""
    cutoff = time.time() - days * SECONDS_A_DAY
    for other in keep.parent.glob(f"*{ARCHIVE_SUFFIX}"):
        try:
            if other != keep and other.stat().st_atime < cutoff:
                other.unlink()
        except OSError:  # gone already, or not ours to remove
            pass


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def is_whole_archive(path: Path) -> bool:
    """Java writes a dynamic archive's header (its magic number first) after everything else."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(DYNAMIC_ARCHIVE_MAGIC)) == DYNAMIC_ARCHIVE_MAGIC
    except OSError:
        return False


def _claim(lock: Path) -> bool:
    """Create ``lock`` holding our pid; a lock whose processes are gone is taken over. False: another holds it."""
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            if _holder_alive(lock):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def _holder_alive(lock: Path) -> bool:
    """Whether the lock's process or its JVM (still writing) runs."""
    try:
        pids = [int(value) for value in lock.read_text().split()]
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # garbage: judge by its age
        pids = []
    if not pids:  # created, its pid not written yet (or garbage): a claim in progress unless it is old
        return time.time() - _modified(lock) < FRESH_LOCK_S
    return any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def java_options(
    existing: str, settings: LocalJvmSettings, plan: ArchivePlan | None, environ: Mapping[str, str] | None = None
) -> str:
    """``existing`` driver options plus ours (``SPARKML_MNIST_JVM_OPTIONS``, else the settings'), and the
    archive's, except where the user's own already decide."""
    environ = os.environ if environ is None else environ
    own = environ.get(OPTIONS_ENV, settings.java_options).strip()
    options = [existing.strip()] if existing.strip() else []
    if own and not any(flag in existing for flag in JIT_OPTIONS):
        options.append(own)
    if plan is not None and plan.options and not any(flag in existing for flag in SHARING_OPTIONS):
        options.append(plan.options)
    return " ".join(options)
