"""The one place a SparkSession is made: by an entry point, then passed down."""

from __future__ import annotations

import atexit
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from pyspark import SparkConf
from pyspark.errors import PySparkException
from pyspark.sql import SparkSession
from pyspark.sql.utils import is_remote

from sparkml_mnist.cli import jvm
from sparkml_mnist.config.platform import load_platform_settings
from sparkml_mnist.errors import ConfigError

LOCAL_MASTER = "local[*]"
QUIET_LOG_LEVEL = "ERROR"
VERBOSE_LOG_LEVEL = "WARN"  # Spark's own default
DRIVER_JAVA_OPTIONS = "spark.driver.extraJavaOptions"
LOG4J_CONFIG_OPTION = "log4j2.configurationFile"
QUIET_LOG4J_FILE = "log4j2-quiet.properties"
# Spark's console progress bar interleaves with the job's own per-epoch progress lines.
DEFAULT_CONF = {"spark.ui.showConsoleProgress": "false"}
REMOTE_ENV = "SPARK_REMOTE"
JVM_START_FAILED = "JAVA_GATEWAY_EXITED"  # PySpark's error condition: the JVM ended before it answered
GATEWAY_PORT_ENV = "PYSPARK_GATEWAY_PORT"  # set by spark-submit for the Python it runs: its JVM is already up
REMOTE_SCHEME = "sc://"
CONNECT_DEFAULT_PORT = 15002
CONNECT_PROBE_TIMEOUT_S = 10.0
SPARK_CONF_DIR_ENV = "SPARK_CONF_DIR"
SPARK_DEFAULTS_FILE = "spark-defaults.conf"
# A line of Java's properties format as Spark reads spark-defaults.conf: the key ends at the first blank, '=' or ':'.
PROPERTY_LINE = re.compile(r"^(?P<key>[^\s=:]+)\s*[=:\s]\s*(?P<value>.*)$")
PROPERTY_COMMENTS = ("#", "!")
# What puts folders on the driver JVM's class path (spark-class and Spark's launcher): Java cannot write or map a
# class archive over a class path with a folder that holds files ("Cannot have non-empty directory in paths").
CLASSPATH_FOLDER_ENVS = ("HADOOP_CONF_DIR", "YARN_CONF_DIR")
CLASSPATH_ENVS = ("SPARK_DIST_CLASSPATH", "SPARK_CLASSPATH")
DRIVER_CLASSPATH = "spark.driver.extraClassPath"


def create_spark(
    app_name: str,
    master: str | None = None,
    conf: dict[str, str] | None = None,
    verbose: bool = False,
    write_class_archive: bool = False,
) -> SparkSession:
    """Get or create the session; ``local[*]`` only when neither the caller nor spark-submit set a master.

    ``master="sc://HOST:PORT"``, or ``SPARK_REMOTE`` when no master is given, opens a Spark Connect
    session instead; a process that already holds a Connect session (a notebook) gets that one.
    A JVM this call starts gets ``conf/platform.yaml``'s ``local_jvm`` options and maps the class
    archive when there is one; with ``write_class_archive`` (the CLI) and none there yet, it writes
    it as it exits (sparkml_mnist.cli.jvm).
    """
    remote = master if master and master.startswith(REMOTE_SCHEME) else None
    if master is None:
        remote = os.environ.get(REMOTE_ENV) or None
        active = SparkSession.getActiveSession() if remote is None and is_remote() else None
        if active is not None:
            return active
    if remote:
        return connect_spark(app_name, remote, conf)
    builder = SparkSession.builder.appName(app_name)
    submitted_master = SparkConf().get("spark.master", None) or os.environ.get("MASTER")
    chosen = master or submitted_master or LOCAL_MASTER
    if not submitted_master or master:
        builder = builder.master(chosen)
    settings = {**DEFAULT_CONF, **(conf or {})}
    archive = None
    launching = _launches_jvm()
    if launching:
        options = users_driver_options(settings)
        if not verbose:  # Spark's start-up and task-failure lines off the console
            options = _with_quiet_log4j(options)
        jvm_settings = load_platform_settings().local_jvm
        path = class_archive_path() if jvm_settings.class_archive and not classpath_folders(settings) else None
        archive = (
            jvm.plan_archive(path, write_class_archive, jvm_settings.keep_unused_archive_days)
            if path is not None else None
        )
        settings[DRIVER_JAVA_OPTIONS] = jvm.java_options(options, jvm_settings, archive)
    if chosen.startswith("local") and not os.environ.get("PYSPARK_PYTHON"):
        # Local Python workers must run this interpreter (its venv has pyarrow, TF), not "python3".
        os.environ["PYSPARK_PYTHON"] = sys.executable
    for key, value in settings.items():
        if value or key != DRIVER_JAVA_OPTIONS:
            builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except BaseException as error:
        jvm.release(archive)
        if launching and getattr(error, "getCondition", lambda: None)() == JVM_START_FAILED:
            raise ConfigError(
                f"the driver JVM exited as it started (what spark-submit or Java said is above), with the options "
                f"{settings.get(DRIVER_JAVA_OPTIONS)!r}: check Java 17 is installed (JAVA_HOME or java on PATH), "
                f"and the options of {jvm.OPTIONS_ENV} or conf/platform.yaml's local_jvm.java_options and "
                f"{DRIVER_JAVA_OPTIONS}"
            ) from None
        raise
    if archive is not None and archive.writing is not None:
        process = getattr(_gateway(), "proc", None)
        jvm.started(archive, process.pid if process is not None else None)
        atexit.register(_close_jvm_console)
    if not is_remote():  # Spark Connect has no SparkContext; its server owns the logs
        spark.sparkContext.setLogLevel(VERBOSE_LOG_LEVEL if verbose else QUIET_LOG_LEVEL)
    return spark


def _gateway() -> Any:
    from pyspark import SparkContext

    return SparkContext._gateway  # type: ignore[attr-defined]


def _close_jvm_console() -> None:
    """At this process's exit: the JVM that writes the class archive outlives it by about 15 s, holding this
    process's stdout and stderr, so a pipe on the CLI's output (``| tee``) would wait for it. Its own
    streams are closed first; nothing of the run is left to print, and Java's archive notices are off."""
    gateway = _gateway()
    try:
        gateway.jvm.System.out.close()
        gateway.jvm.System.err.close()
    except Exception:  # noqa: BLE001 - the gateway is gone already: the JVM exits with this process anyway
        pass


def _launches_jvm() -> bool:
    """Whether the session about to be made starts its JVM here (not spark-submit's, not an earlier one)."""
    return _gateway() is None and GATEWAY_PORT_ENV not in os.environ


def class_archive_path() -> Path | None:
    """This machine's class archive for the JVM this process would start (None: no cache folder, no java)."""
    import pyspark

    folder, java = jvm.cache_folder(), jvm.java_runner()
    if folder is None or java is None:
        return None
    return jvm.archive_path(folder, java, str(spark_home()), pyspark.__version__)


def classpath_folders(settings: dict[str, str], environ: Mapping[str, str] | None = None) -> list[str]:
    """What would put a folder on the driver JVM's class path: the Spark conf folder when it holds files,
    Hadoop's and YARN's, or an extra class path. With one, Java refuses to write the class archive (it says
    so as the JVM exits) and does not map it, so the JVM runs without one."""
    environ = os.environ if environ is None else environ
    conf_dir = spark_conf_dir(environ)
    folders = [str(conf_dir)] if conf_dir.is_dir() and any(conf_dir.iterdir()) else []
    folders += [environ[name] for name in CLASSPATH_FOLDER_ENVS if environ.get(name)]
    folders += [environ[name] for name in CLASSPATH_ENVS if environ.get(name)]
    extra = settings.get(DRIVER_CLASSPATH) or SparkConf().get(DRIVER_CLASSPATH, None) or \
        spark_defaults(conf_dir).get(DRIVER_CLASSPATH)
    return [*folders, extra] if extra else folders


def users_driver_options(settings: dict[str, str]) -> str:
    """The driver's Java options the JVM would get without this module: the caller's conf, else a
    ``spark.*`` property set before the JVM, else spark-defaults.conf's (replaced, not merged, by a ``--conf``)."""
    return (settings.get(DRIVER_JAVA_OPTIONS) or SparkConf().get(DRIVER_JAVA_OPTIONS, None)
            or spark_defaults().get(DRIVER_JAVA_OPTIONS, ""))


def spark_home() -> Path:
    """The Spark installation spark-submit runs from: SPARK_HOME, else pip's pyspark package."""
    import pyspark

    return Path(os.environ.get("SPARK_HOME") or os.path.dirname(pyspark.__file__))


def spark_conf_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The conf folder spark-submit reads (and puts on the JVM's class path): SPARK_CONF_DIR, else Spark's conf/."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(SPARK_CONF_DIR_ENV) or spark_home() / "conf")


def spark_defaults(conf_dir: Path | None = None) -> dict[str, str]:
    """The properties of the spark-defaults.conf spark-submit reads (``SPARK_CONF_DIR``, else Spark's conf/).

    The options this module gives the JVM go as ``--conf``, which replaces that file's value of the same key:
    so what the file says is read here and kept, ours added to it. Values are trimmed, as Spark trims them.
    """
    try:
        text = ((conf_dir or spark_conf_dir()) / SPARK_DEFAULTS_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:  # no such file (pip's pyspark has none), or unreadable: spark-submit reads nothing either
        return {}
    properties = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(PROPERTY_COMMENTS) and (match := PROPERTY_LINE.match(line)):
            properties[match["key"]] = match["value"].strip()
    return properties


def _with_quiet_log4j(options: str) -> str:
    """The driver's Java options with the package's quiet log4j2 configuration, unless one is given."""
    if LOG4J_CONFIG_OPTION in options:
        return options
    from sparkml_mnist.config import default_conf_file

    return f"{options} -D{LOG4J_CONFIG_OPTION}={default_conf_file(QUIET_LOG4J_FILE)}".strip()


def connect_spark(app_name: str, url: str, conf: dict[str, str] | None = None) -> SparkSession:
    """A Spark Connect session at ``url``: a ConfigError, not a PySpark error or a long retry, when there is none."""
    try:
        parsed = urlparse(url)
        host, port = parsed.hostname, parsed.port or CONNECT_DEFAULT_PORT
    except ValueError as error:
        raise ConfigError(f"{url!r} is not a Spark Connect URL sc://HOST:PORT ({error})") from None
    try:  # the Connect client retries an unreachable server for many minutes before failing
        socket.create_connection((host, port), timeout=CONNECT_PROBE_TIMEOUT_S).close()
    except OSError as error:
        raise ConfigError(
            f"cannot reach the Spark Connect server at {host}:{port} ({error.strerror or error}): "
            f"check the sc:// URL (--master or {REMOTE_ENV}) and that the server is running"
        ) from None
    builder = SparkSession.builder.remote(url).appName(app_name)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    try:
        return builder.getOrCreate()
    except PySparkException as error:
        raise ConfigError(
            f"cannot open a Spark Connect session at {url}: {error}. A process that already runs a classic "
            "SparkSession (local mode, spark-submit) cannot also hold a Spark Connect one: use a separate process"
        ) from None
