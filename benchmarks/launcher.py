"""Launcher start-up at np=2: from ``run()`` to the first training step, minus TensorFlow's import.

Usage: python benchmarks/launcher.py [--repeats N] [--out benchmarks/results/launcher.json]

Each measured run: a local[2] session (already warm: one unmeasured run first), two barrier
tasks, each rank's fresh process imports TensorFlow through keras_flavour (timed), builds the
strategy and a tiny tf_keras model, and fits two steps. ``startup_s`` per run is the slowest
rank's (first step - run() call - its TF import); the figure reported is the median over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sparkml_mnist.launcher import keras_flavour
from sparkml_mnist.launcher import HorovodRunner
from sparkml_mnist.cli.session import create_spark

NP = 2
MASTER = "local[2]"
GLOBAL_BATCH = 32
STEPS = 2
DEFAULT_REPEATS = 3
DEFAULT_OUT = Path(__file__).parent / "results" / "launcher.json"


def first_steps(context: Any) -> dict[str, float]:
    """The measured rank function: TF import, strategy, tiny model, two steps."""
    import numpy as np

    from sparkml_mnist.launcher.rank.callbacks import ProgressCallback
    from sparkml_mnist.training.inputs import ArrayRows, distributed_dataset

    keras = keras_flavour.keras()
    strategy = context.strategy
    strategy_ready_at = time.time()
    with strategy.scope():
        model = keras.Sequential([keras.layers.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
        model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    rows = GLOBAL_BATCH // context.size * STEPS
    x = np.random.default_rng(context.rank).random((rows, 28, 28, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(rows) % 10]
    model.fit(distributed_dataset(context, ArrayRows((x, y)), GLOBAL_BATCH, STEPS), epochs=1, steps_per_epoch=STEPS, verbose=0,
              callbacks=[ProgressCallback(context)])  # its first batch marks the first step
    return {"strategy_ready_at": strategy_ready_at}


def measure(runner: HorovodRunner) -> dict[str, Any]:
    records = runner.run_all(first_steps).records
    started = records[0].timings["run_started_at"]
    ranks = []
    for record in records:
        timings = record.timings
        ranks.append({
            "rank": record.rank,
            "to_process_start_s": timings["process_started_at"] - started,
            "tf_import_s": timings["tf_import_s"],
            "to_strategy_ready_s": record.value["strategy_ready_at"] - started,
            "to_first_step_s": timings["first_step_at"] - started,
            "startup_s": timings["first_step_at"] - started - timings["tf_import_s"],
        })
    return {
        "startup_s": max(rank["startup_s"] for rank in ranks),
        "tf_import_s": max(rank["tf_import_s"] for rank in ranks),
        "ranks": ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    spark = create_spark("launcher-benchmark", master=MASTER, conf={"spark.ui.enabled": "false"})
    runner = HorovodRunner(np=NP, spark=spark)
    measure(runner)  # warm-up: JVM code paths, Python worker start, file caches
    runs = [measure(runner) for _ in range(args.repeats)]
    spark.stop()
    result = {
        "startup_s": round(statistics.median(run["startup_s"] for run in runs), 3),
        "tf_import_s": round(statistics.median(run["tf_import_s"] for run in runs), 3),
        "np": NP,
        "master": MASTER,
        "runs": runs,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in ("startup_s", "tf_import_s")}))


if __name__ == "__main__":
    main()
