"""GPU pinning through Spark's resource scheduling, with a fake GPU discovery script (no GPU needed).

Its own SparkSession in a subprocess, since the suite's local[2] session cannot change its
resources: ``local-cluster[1,2,1024]`` (one executor, two cores, two "GPUs") is the smallest
master on which Spark assigns GPU addresses to tasks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyspark

SCRIPT = r'''
import json, os, sys
from sparkml_mnist.cli.session import create_spark
from sparkml_mnist.launcher import HorovodRunner

def main():
    import os
    return os.environ.get("CUDA_VISIBLE_DEVICES")

discovery = sys.argv[1]
spark = create_spark("gpu-pinning", master="local-cluster[1,2,1024]", conf={
    "spark.ui.enabled": "false",
    "spark.worker.resource.gpu.amount": "2", "spark.worker.resource.gpu.discoveryScript": discovery,
    "spark.executor.resource.gpu.amount": "2", "spark.executor.resource.gpu.discoveryScript": discovery,
    "spark.task.resource.gpu.amount": "1",
})
records = HorovodRunner(np=2, spark=spark).run_all(main).records
print("RESULT " + json.dumps([[r.rank, r.value] for r in records]))
spark.stop()
'''
SCRIPT_TIMEOUT_S = 300


def test_two_ranks_get_distinct_gpus_pinned_before_tf(tmp_path: Path) -> None:
    discovery = tmp_path / "gpus.sh"
    discovery.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    discovery.chmod(0o755)
    script = tmp_path / "gpu_run.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "SPARK_HOME": str(Path(pyspark.__file__).parent),  # local-cluster starts its executor from here
        "PYSPARK_PYTHON": sys.executable,
    }
    done = subprocess.run([sys.executable, str(script), str(discovery)], capture_output=True, text=True,
                          env=env, timeout=SCRIPT_TIMEOUT_S)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and results, done.stderr[-3000:]
    pinned = dict(json.loads(results[0][len("RESULT "):]))
    assert sorted(pinned.values()) == ["0", "1"], pinned  # each rank one distinct GPU, set before TF
