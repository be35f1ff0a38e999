"""Same seed, same machine: are two runs' trained weights bit-identical, with and without ``--deterministic``?

    python benchmarks/determinism.py [--variant variant3] [--epochs 2] [--nps 1,2]

For each ``np`` and each setting (flag off, flag on) the job (``sparkml-mnist train`` on the bundled
sample) runs twice into fresh folders; the two saved models' weights are compared array by array
(largest absolute difference; identical or not), and the epochs' time is kept to show what the flag
costs. Writes benchmarks/results/determinism.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_FILE = HERE / "results" / "determinism.json"


def train(output: Path, variant: str, epochs: int, np_: int, deterministic: bool) -> dict:
    command = [str(Path(sys.executable).with_name("sparkml-mnist")), "-q", "train", "--variant", variant,
               "--epochs", str(epochs), "--np", str(np_), "--output", str(output)]
    if deterministic:
        command.append("--deterministic")
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((output / "report.json").read_text())["variants"][0]
    return {"epoch_seconds": max((r["epoch_seconds"] for r in report["rank_records"]), key=sum),
            "test_accuracy": report["test"]["accuracy"]}


def weights(folder: Path) -> list:
    from sparkml_mnist.launcher.keras_flavour import keras

    return keras().models.load_model(next(folder.rglob("*.keras")), compile=False).get_weights()


def compare(first: Path, second: Path) -> dict:
    import numpy as np

    pairs = list(zip(weights(first), weights(second)))
    return {"arrays": len(pairs),
            "identical": all(np.array_equal(a, b) for a, b in pairs),
            "max_abs_difference": float(max(np.max(np.abs(a - b)) for a, b in pairs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="variant3")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nps", default="1,2")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="determinism-") as folder:
        for np_ in (int(n) for n in args.nps.split(",")):
            for deterministic in (False, True):
                runs = [Path(folder) / f"np{np_}-{deterministic}-{i}" for i in range(2)]
                timings = [train(run, args.variant, args.epochs, np_, deterministic) for run in runs]
                row = {"np": np_, "deterministic": deterministic, **compare(*runs),
                       "epoch_seconds": [t["epoch_seconds"] for t in timings],
                       "test_accuracy": [t["test_accuracy"] for t in timings]}
                print(json.dumps(row), flush=True)
                rows.append(row)
    RESULT_FILE.write_text(json.dumps({
        "command": " ".join(["python", "benchmarks/determinism.py", *sys.argv[1:]]),
        "job": f"sparkml-mnist train --variant {args.variant} --epochs {args.epochs} (bundled sample, seed 42)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": rows,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
