"""The one place a SparkSession is made: by an entry point, then passed down."""

from __future__ import annotations

import os
import sys

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
    submitted_master = SparkConf().get("spark.master", None) or os.environ.get("MASTER")
    chosen = master or submitted_master or LOCAL_MASTER
    if not submitted_master or master:
        builder = builder.master(chosen)
    if chosen.startswith("local") and not os.environ.get("PYSPARK_PYTHON"):
        # Local Python workers must run this interpreter (its venv has pyarrow, TF), not "python3".
        os.environ["PYSPARK_PYTHON"] = sys.executable
    for key, value in {**DEFAULT_CONF, **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if not is_remote():  # Spark Connect has no SparkContext; its server owns the logs
        spark.sparkContext.setLogLevel(QUIET_LOG_LEVEL)
    return spark
