"""Where a CLI run's CPU goes, by process: the driver JVM, the ranks, the CLI's own Python, Spark's Python workers.

    python benchmarks/cli_cpu.py [--repeats 2] [--label NAME] [-- CLI ARGS...]

The test suite is bound by CPU on the 2-core CI machine (both cores busy from its first minute), and
most of its work is CLI runs and ranks, so what one run costs in CPU-seconds, and in which process, is
what decides the suite's time. Runs ``sparkml-mnist -q train --variant variant1 --epochs 1 --np 2`` on
the bundled sample (or the CLI arguments given after ``--``) in a fresh process, under each way of
starting the driver JVM (``SPARKML_MNIST_JVM_OPTIONS``: the product's default, and the suite's quick C1
compiler), and reads every new process's user + system CPU from ``/proc`` every 0.2 s until the run
ends (a process's last reading counts: it may have exited between two). Linux only. Also times a bare
``import tensorflow`` (with ``TF_USE_LEGACY_KERAS=1``, as a rank imports it). Writes
``benchmarks/results/cli_cpu.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_FILE = HERE / "results" / "cli_cpu.json"
DEFAULT_ARGS = ("-q", "train", "--variant", "variant1", "--epochs", "1", "--np", "2")
SAMPLE_S = 0.2
# The driver JVM's options of the measured run (sparkml_mnist.cli.jvm): the product's default, the suite's.
JVM_STARTS = {"default": "", "c1": "-XX:TieredStopAtLevel=1"}
PROCESS_CLASSES = (  # the first whose marker is in the command line names the process
    ("rank", "launcher.rank.main"),
    ("python worker", "pyspark.daemon"),
    ("python worker", "pyspark.worker"),
    ("cli driver", "sparkml_mnist.cli"),
)


def process_class(command: str) -> str:
    if command.split(" ", 1)[0].endswith("java"):
        return "jvm"
    return next((name for name, marker in PROCESS_CLASSES if marker in command), "other")


def cpu_by_process(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command``; every new process's CPU-seconds, summed by class, and the run's wall time."""
    tick = os.sysconf("SC_CLK_TCK")
    before = {pid for pid in os.listdir("/proc") if pid.isdigit()}
    seen: dict[tuple[str, str], tuple[str, float]] = {}  # (pid, start time) -> (class, CPU-seconds)

    def sample() -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid in before:
                continue
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            key = (pid, fields[19])
            kind = seen[key][0] if key in seen and not cmdline else process_class(cmdline)  # a zombie has none
            seen[key] = (kind, (int(fields[11]) + int(fields[12])) / tick)

    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        sample()
        time.sleep(SAMPLE_S)
    sample()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {process.returncode}):\n{process.stderr.read()[-3000:]}")
    totals: dict[str, float] = collections.Counter()
    counts: dict[str, int] = collections.Counter()
    for kind, cpu in seen.values():
        totals[kind] += cpu
        counts[kind] += 1
    return {"wall_s": round(wall, 1), "cpu_s": {kind: round(cpu, 1) for kind, cpu in totals.most_common()},
            "processes": dict(counts), "total_cpu_s": round(sum(totals.values()), 1)}


def tensorflow_import() -> dict:
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, check=True, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--label", default="runs")
    parser.add_argument("cli_args", nargs="*", help="after --: the CLI's arguments (default: %(default)s)",
                        default=list(DEFAULT_ARGS))
    args = parser.parse_args()
    if not Path("/proc/self/stat").exists():
        raise SystemExit("cli_cpu.py reads /proc: Linux only")
    runs = []
    for repeat in range(args.repeats):
        for start, options in JVM_STARTS.items():
            with tempfile.TemporaryDirectory(prefix="cli-cpu-") as folder:
                command = [sys.executable, "-m", "sparkml_mnist.cli", *args.cli_args, "--output", f"{folder}/out"]
                env = {**os.environ, "SPARKML_MNIST_JVM_OPTIONS": options}
                measured = cpu_by_process(command, env)
            runs.append({"jvm": start, "repeat": repeat, **measured})
            print(json.dumps(runs[-1]), flush=True)
    imports = [tensorflow_import() for _ in range(args.repeats)]
    print(json.dumps({"import tensorflow": imports}), flush=True)
    results = json.loads(RESULT_FILE.read_text()) if RESULT_FILE.is_file() else {}
    results[args.label] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
        "cores": os.cpu_count(), "command": ["sparkml-mnist", *args.cli_args], "runs": runs,
        "import_tensorflow": imports,
    }
    RESULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULT_FILE.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
