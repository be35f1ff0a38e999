"""The one place a SparkSession is made: by an entry point, then passed down."""

from __future__ import annotations

import os

from pyspark import SparkConf
from pyspark.sql import SparkSession
from pyspark.sql.utils import is_remote

LOCAL_MASTER = "local[*]"
QUIET_LOG_LEVEL = "ERROR"
# Spark's console progress bar interleaves with the job's own per-epoch progress lines.
DEFAULT_CONF = {"spark.ui.showConsoleProgress": "false"}


def create_spark(app_name: str, master: str | None = None, conf: dict[str, str] | None = None) -> SparkSession:
    """Get or create the session; ``local[*]`` only when neither the caller nor spark-submit set a master."""
    builder = SparkSession.builder.appName(app_name)
    if master:
        builder = builder.master(master)
    elif not SparkConf().contains("spark.master") and not os.environ.get("MASTER"):
        builder = builder.master(LOCAL_MASTER)
    for key, value in {**DEFAULT_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if not is_remote():  # Spark Connect has no SparkContext; its server owns the logs
        spark.sparkContext.setLogLevel(QUIET_LOG_LEVEL)
    return spark
