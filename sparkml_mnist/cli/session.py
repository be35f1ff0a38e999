"""The one place a SparkSession is made: by an entry point, then passed down."""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

from pyspark import SparkConf
from pyspark.errors import PySparkException
from pyspark.sql import SparkSession
from pyspark.sql.utils import is_remote

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
REMOTE_SCHEME = "sc://"
CONNECT_DEFAULT_PORT = 15002
CONNECT_PROBE_TIMEOUT_S = 10.0


def create_spark(
    app_name: str, master: str | None = None, conf: dict[str, str] | None = None, verbose: bool = False
) -> SparkSession:
    """Get or create the session; ``local[*]`` only when neither the caller nor spark-submit set a master.

    ``master="sc://HOST:PORT"``, or ``SPARK_REMOTE`` when no master is given, opens a Spark Connect
    session instead; a process that already holds a Connect session (a notebook) gets that one.
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
    if not verbose and not _jvm_running():  # Spark's start-up and task-failure lines off the console
        builder = builder.config(DRIVER_JAVA_OPTIONS, _with_quiet_log4j(SparkConf().get(DRIVER_JAVA_OPTIONS, "")))
    if chosen.startswith("local") and not os.environ.get("PYSPARK_PYTHON"):
        # Local Python workers must run this interpreter (its venv has pyarrow, TF), not "python3".
        os.environ["PYSPARK_PYTHON"] = sys.executable
    for key, value in {**DEFAULT_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if not is_remote():  # Spark Connect has no SparkContext; its server owns the logs
        spark.sparkContext.setLogLevel(VERBOSE_LOG_LEVEL if verbose else QUIET_LOG_LEVEL)
    return spark


def _jvm_running() -> bool:
    from pyspark import SparkContext

    return SparkContext._gateway is not None  # type: ignore[attr-defined]


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
