"""What a lost rank costs: seconds from the failure to the next attempt's first training step.

Runs ``sparkml-mnist train`` (variant3, 3 epochs, np=2 on the bundled sample) in its own process,
SIGKILLs rank 1's process in the middle of epoch 2 (found through /proc, as an operator's kill would),
and reads the attempts the report records. Repeated ``--repeats`` times; writes
benchmarks/results/retry_cost.json.

    python benchmarks/retry_cost.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' own way of finding rank processes

from rank_processes import CliRun, rank_pids  # noqa: E402

RESULT_FILE = HERE / "results" / "retry_cost.json"
ARGS = ("train", "--variant", "variant3", "--epochs", "3", "--np", "2")
MID_EPOCH_S = 0.5
TIMEOUT_S = 900.0


def measure_once(folder: Path) -> dict:
    output = folder / "out"
    job = CliRun(*ARGS, "--output", str(output), log=folder / "cli.log")
    if not job.wait_for("variant3 epoch 1/3", TIMEOUT_S):
        raise RuntimeError(job.text()[-2000:])
    time.sleep(MID_EPOCH_S)
    os.kill(rank_pids()[1], signal.SIGKILL)
    killed_at = time.time()
    if job.finish(TIMEOUT_S) != 0:
        raise RuntimeError(job.text()[-2000:])
    variant = json.loads((output / "report.json").read_text())["variants"][0]
    failed, retried = variant["attempts"]
    return {
        "kill_to_failure_detected_s": failed["ended_at"] - killed_at,
        "failure_to_first_step_s": retried["seconds_from_failure_to_first_step"],
        "kill_to_first_step_s": retried["first_step_at"] - killed_at,
        "resumed_from_epoch": retried["resumed_from_epoch"],
        "epoch_seconds": variant["rank_records"][0]["epoch_seconds"],
        "test_accuracy": variant["test"]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="retry-cost-") as folder:
            runs.append(measure_once(Path(folder)))
            print(json.dumps(runs[-1]), flush=True)
    result = {
        "command": f"python benchmarks/retry_cost.py --repeats {args.repeats}",
        "job": "sparkml-mnist " + " ".join(ARGS) + " (bundled sample); rank 1 SIGKILLed 0.5 s into epoch 2",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
        "median_failure_to_first_step_s": statistics.median(r["failure_to_first_step_s"] for r in runs),
    }
    RESULT_FILE.parent.mkdir(exist_ok=True)
    RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT_FILE}")


if __name__ == "__main__":
    main()
