"""The job's own overhead for README's first command: wall time minus the ranks' time in epochs.

    python benchmarks/job_overhead.py [--source DIR] [--label NAME]

Runs ``sparkml-mnist train`` (conf/runs/sample.yaml: four variants, 5 epochs, np=2 on the bundled
sample) in a fresh process with a fresh output folder, measures its wall time from the outside, and
reads each variant's epoch times from report.json (the slowest rank's, epoch by epoch): overhead is
everything else (Spark and rank start-up, TensorFlow imports, data hand-off, evaluation, writing).
``--source`` runs another checkout of the project (e.g. the commit before a change) with this
interpreter. Writes benchmarks/results/job_overhead.json (``--label before`` keeps the other runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_FILE = HERE / "results" / "job_overhead.json"


def epochs_seconds(report: dict) -> float:
    total = 0.0
    for variant in report["variants"]:
        per_rank = [record["epoch_seconds"] or [] for record in variant["rank_records"]]
        total += sum(max(epoch) for epoch in zip(*per_rank))
    return total


def run_sample(source: Path | None) -> tuple[float, dict]:
    """README's first command in a fresh process (``source``: another checkout): its wall time and report.json."""
    with tempfile.TemporaryDirectory(prefix="job-overhead-") as folder:
        output = Path(folder) / "out"
        env = dict(os.environ)
        if source is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), env.get("PYTHONPATH")) if p)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "sparkml_mnist.cli", "train", "--output", str(output)],
                              capture_output=True, text=True, env=env, cwd=folder)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        return wall, json.loads((output / "report.json").read_text())


def measure(source: Path | None) -> dict:
    wall, report = run_sample(source)
    epochs = epochs_seconds(report)
    return {"wall_s": wall, "epochs_s": epochs, "overhead_s": wall - epochs,
            "test_accuracy": {v["name"]: v["test"]["accuracy"] for v in report["variants"]}}


def commit_of(checkout: Path) -> str:
    """The checkout's commit, so the figures name the code they measured (``+changes``: edits outside results)."""
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no", "--",
                            ".", ":!benchmarks/results"],
                           capture_output=True, text=True, check=True).stdout.strip()
    return f"commit {head}" + (" +changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="another checkout to run (PYTHONPATH), e.g. the commit before")
    parser.add_argument("--label", default="after", choices=("before", "after"))
    args = parser.parse_args()
    measured = measure(args.source)
    result = json.loads(RESULT_FILE.read_text()) if RESULT_FILE.exists() else {}
    result.update({
        "command": "sparkml-mnist train   (README's first command: conf/runs/sample.yaml)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    result[args.label] = {**measured, "source": commit_of(args.source or Path(__file__).resolve().parents[1])}
    if args.label == "after":
        result.update({key: measured[key] for key in ("wall_s", "epochs_s", "overhead_s")})
    if "before" in result:
        result["overhead_before_s"] = result["before"]["overhead_s"]
    RESULT_FILE.parent.mkdir(exist_ok=True)
    RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result[args.label]))


if __name__ == "__main__":
    main()
