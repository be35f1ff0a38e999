"""spark-submit entry point: the same arguments as ``sparkml-mnist train``; it exits with the same codes.

With the package shipped as its wheel copied to a ``.zip`` (pyspark puts only ``.zip``/``.egg`` files of
``--py-files`` on the executors' path, never a ``.whl``) and executors that have the dependencies:

    spark-submit --master spark://HOST:7077 --conf spark.pyspark.python=/opt/mnist-env/bin/python \\
        --py-files dist/sparkml_mnist-0.1.0.zip jobs/train_mnist.py \\
        --data hdfs:///datasets/mnist-digits --np 2 --output /shared/reports/run-1

Or with everything the executors need in one packed environment (``python scripts/pack_env.py``); in
client mode the driver runs here, on a local Python with the package:

    spark-submit --master spark://HOST:7077 --archives dist/sparkml-mnist-env-cpu.tar.gz#environment \\
        --conf spark.pyspark.python=./environment/bin/python --conf spark.pyspark.driver.python=.venv/bin/python \\
        jobs/train_mnist.py --data hdfs:///datasets/mnist-digits --np 2 --output /shared/reports/run-1

See docs/production.md.
"""

import sys

from sparkml_mnist.cli.commands import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
