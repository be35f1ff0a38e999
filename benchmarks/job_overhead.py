"""The job's own overhead for README's first command: wall time minus the ranks' time in epochs.

    python benchmarks/job_overhead.py [--source DIR] [--label NAME]

Runs ``sparkml-mnist train`` (conf/runs/sample.yaml: four variants, 5 epochs, np=2 on the bundled
sample) in a fresh process with a fresh output folder, measures its wall time from the outside, and
reads each variant's epoch times from report.json (the slowest rank's, epoch by epoch): overhead is
everything else (Spark and rank start-up, TensorFlow imports, data hand-off, evaluation, writing).
``--source`` runs another checkout of the project (e.g. the commit before a change) with this
interpreter. Writes benchmarks/results/job_overhead.json (``--label before`` keeps the other runs).

The breakdown of the overhead (``breakdown`` in the JSON, a table in RESULTS.md) comes from a timeline:
the arrival time of each line the CLI prints (read from its stderr as it comes) and the ranks' own
wall-clock marks in report.json (each variant's start, first step, end, epoch seconds), on one clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULT_FILE = HERE / "results" / "job_overhead.json"


def epochs_seconds(report: dict) -> float:
    total = 0.0
    for variant in report["variants"]:
        per_rank = [record["epoch_seconds"] or [] for record in variant["rank_records"]]
        total += sum(max(epoch) for epoch in zip(*per_rank))
    return total


# Lines of the CLI's console that mark a phase's end (conf-independent wording of sparkml_mnist.job.run).
JVM_UP = re.compile(r"Using incubator modules|Setting default log level")  # Spark's first words: the JVM runs
SESSION_READY = re.compile(r"^reading and checking ")  # the session exists and the run is planned
READ_DONE = re.compile(r"training rows, .* test rows \(")
VARIANT_SCORED = re.compile(r"^(\S+): test accuracy ")
REPORT_WRITTEN = re.compile(r"^\s*report written \(")


def run_sample(source: Path | None) -> tuple[float, dict, list[tuple[float, str]]]:
    """README's first command in a fresh process (``source``: another checkout): its wall time, report.json
    and its console lines, each with its arrival time in seconds after the start (time.time() clock)."""
    with tempfile.TemporaryDirectory(prefix="job-overhead-") as folder:
        output = Path(folder) / "out"
        env = dict(os.environ)
        if source is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), env.get("PYTHONPATH")) if p)
        epoch_start, started = time.time(), time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "sparkml_mnist.cli", "train", "--output", str(output)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=folder)
        lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in process.stderr]
        code = process.wait()
        wall = time.perf_counter() - started
        if code != 0:
            raise RuntimeError("\n".join(line for _, line in lines[-40:]))
        report = json.loads((output / "report.json").read_text())
        report["_clock_start"] = epoch_start
        return wall, report, lines


def first(lines: list[tuple[float, str]], pattern: re.Pattern[str], last: bool = False) -> float | None:
    found = [at for at, line in lines if pattern.search(line)]
    return (found[-1] if last else found[0]) if found else None


def breakdown(wall: float, report: dict, lines: list[tuple[float, str]]) -> dict[str, Any]:
    """Where the time outside epochs went, in order; each figure in seconds (``None``: its mark not seen)."""
    start = report["_clock_start"]
    variants = []
    for variant in report["variants"]:
        records = variant["rank_records"]
        epochs = [max(epoch) for epoch in zip(*[r["epoch_seconds"] or [] for r in records])]
        began = min(r["started_at"] for r in records) - start
        first_step = max(r["first_step_at"] for r in records if r.get("first_step_at")) - start
        ended = max(r["ended_at"] for r in records) - start
        variants.append({"name": variant["name"], "started": began, "first_step": first_step, "ended": ended,
                         "epochs_s": sum(epochs), "first_epoch_s": epochs[0] if epochs else 0.0,
                         "steady_epoch_s": (sum(epochs[1:]) / (len(epochs) - 1)) if len(epochs) > 1 else None,
                         "scoring_s": max((r.get("test") or {}).get("seconds") or 0.0 for r in records)})
    jvm, session, read = first(lines, JVM_UP), first(lines, SESSION_READY), first(lines, READ_DONE)
    last_scored, written = first(lines, VARIANT_SCORED, last=True), first(lines, REPORT_WRITTEN)
    steps = {
        "python_imports_before_the_jvm_s": jvm,
        "jvm_and_session_s": session - jvm if session is not None and jvm is not None else None,
        "read_and_validate_s": read - session if read is not None and session is not None else None,
        "shard_and_rank_start_s": variants[0]["started"] - read if read is not None else None,
        "first_steps_s": sum(v["first_step"] - v["started"] for v in variants),
        # the first epoch's extra time over a steady one: tracing and the input's first batches
        "first_epochs_extra_s": sum(v["first_epoch_s"] - (v["steady_epoch_s"] or v["first_epoch_s"]) for v in variants),
        "rank_scoring_s": sum(v["scoring_s"] for v in variants),
        "between_variants_s": sum(b["started"] - a["ended"] for a, b in zip(variants, variants[1:])),
        "rest_inside_variants_s": sum((v["ended"] - v["first_step"]) - v["epochs_s"] - v["scoring_s"] for v in variants),
        "last_variant_evaluated_s": last_scored - variants[-1]["ended"] if last_scored is not None else None,
        "report_and_plots_s": written - last_scored if written is not None and last_scored is not None else None,
        "exit_s": wall - written if written is not None else None,
    }
    epochs = sum(v["epochs_s"] for v in variants)
    return {"steps": steps, "epochs_s": epochs, "first_epochs_s": sum(v["first_epoch_s"] for v in variants),
            "accounted_s": sum(value for value in steps.values() if value is not None) + epochs
            - steps["first_epochs_extra_s"], "wall_s": wall, "variants": variants}


def measure(source: Path | None) -> dict:
    wall, report, lines = run_sample(source)
    epochs = epochs_seconds(report)
    return {"wall_s": wall, "epochs_s": epochs, "overhead_s": wall - epochs,
            "test_accuracy": {v["name"]: v["test"]["accuracy"] for v in report["variants"]},
            "breakdown": breakdown(wall, report, lines)}


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
