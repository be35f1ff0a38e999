"""spark-submit entry point: the same arguments as ``sparkml-mnist train``.

    spark-submit --master spark://HOST:7077 --py-files sparkml_mnist-*.whl jobs/train_mnist.py \\
        --data hdfs:///datasets/mnist-digits --np 2 --output /shared/reports/run-1
"""

import sys

from sparkml_mnist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
