"""Memory and evaluation time as the data grows: MNIST x1, x4, x16 through the whole job (issue 23).

    python benchmarks/scale.py [--label before|after|NAME] [--source DIR] [--scales 1,4,16] [--steps 20]
                               [--cache DIR] [--driver-memory SIZE]

Scaled data: every row of the full MNIST files (``--data``, 60,000 train / 10,000 test rows) is
written k times, copy j with its 28x28 image rolled by (j % 4, j // 4) pixels (copy 0 is the row
itself), each row's copies one after the other, so the validation split (the last rows) stays the
copies of the original's last rows. Uncompressed LIBSVM (sorted 1-based indices, integer values)
under ``--cache`` (default: the temporary folder), made once and reused; never part of the repository.
x1 is byte for byte the decompressed original.

Each scale runs ``sparkml-mnist train --variant variant1 --np 2 --epochs 1 --max-steps-per-epoch N``
(``local[*]`` on this machine) in a fresh process, through a wrapper that records that process's own
``VmHWM`` at the end (the Python driver; Spark's JVM is its child and measured apart). While it runs,
this process polls ``/proc`` every 0.2 s for the driver's descendants: the JVM and Spark's Python
workers (their largest ``VmHWM``), and each rank process (``-m sparkml_mnist.launcher.rank.main
WORKDIR``): its ``VmHWM`` (the ranks also write it on their way out, through a ``sitecustomize`` on
``PYTHONPATH``), and its partition (``WORKDIR/partition.arrow``: file size and rows, before the rank
maps and unlinks it). The same ``sitecustomize`` records which ``sparkml_mnist`` each process
imported, so a ``--source`` run shows that the other checkout ran in the driver and in the ranks.
The TensorFlow-only baseline is a fresh process that imports tf_keras, builds variant 1 and fits
it for the same steps (and validation steps) on one random batch, then predicts one batch: no Spark,
no partition (also measured with pyarrow imported first, as a rank does). Evaluation seconds are
report.json's ``variants[].seconds.evaluate``; wall is measured from outside.

``--label before --source <checkout>`` runs another checkout with this interpreter (``PYTHONPATH``);
the checkout needs ``sparkml_mnist/conf`` linked to its ``conf/`` (the installed package maps it so;
without the link the editable install supplies this tree's conf, and the run stops saying so).
``--driver-memory 2g``: the working tree's x16 run does not fit Spark's default 1g (RESULTS.md).
Writes ``benchmarks/results/scale.json`` (other labels and scales are kept; a failed job is kept as
``x<k>_failed_driver_memory_<size>``) and, from ``after``, the issue's target figures:
``driver_rss_ratio_x16_x1``, ``rank_rss_over_partition`` (x16's worst rank: (rank peak - baseline) /
partition file bytes; every scale's in ``rank_rss_over_partition_by_scale``) and the evaluation
seconds at x16 against ``before``'s; ``before_figures`` holds before's own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from job_overhead import commit_of  # a sibling script: benchmarks/ is on sys.path when run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT_FILE = HERE / "results" / "scale.json"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mnist-digits"
FILES = {"train": "mnist-digits-train.txt", "test": "mnist-digits-test.txt"}
VARIANT = "variant1"
NP = 2
SIDE = 28
PIXELS = SIDE * SIDE
BYTES_PER_ROW = 800  # the rule of thumb for a partition row: 784 pixel bytes + label, position
RANK_MODULE = "sparkml_mnist.launcher.rank.main"
PARTITION_FILE = "partition.arrow"  # sparkml_mnist.launcher.spec.PARTITION_FILE (not imported: --source)
POLL_S = 0.2
PROBE_ENV = "SCALE_BENCH_PROBE_DIR"
MB = 1024 * 1024

# Written into a temporary folder put on PYTHONPATH: every Python process of the run imports it at start.
PROBE = '''
"""benchmarks/scale.py's probe: which sparkml_mnist each process imports; a rank's VmHWM at exit."""
import atexit, json, os, sys

_DIR = os.environ.get("%(env)s")


def _cmdline():
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return f.read().split(b"\\0")
    except OSError:
        return []


def _write(kind, **fields):
    try:
        path = os.path.join(_DIR, "%%s-%%d.json" %% (kind, os.getpid()))
        with open(path, "w") as f:
            json.dump(dict(fields, pid=os.getpid(), cmdline=[p.decode(errors="replace") for p in _cmdline()]), f)
    except Exception:
        pass


def _hwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])


class _WhichPackage:
    def find_spec(self, name, path=None, target=None):
        if name not in ("sparkml_mnist", "sparkml_mnist.conf"):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                _write("import-" + name, name=name, origin=spec.origin and os.path.realpath(spec.origin))
                return spec
        return None


if _DIR:
    sys.meta_path.insert(0, _WhichPackage())
    if b"%(rank)s" in _cmdline():
        _exit = os._exit

        def _recording_exit(code):
            _write("rank-exit", vmhwm_kb=_hwm_kb())
            _exit(code)

        os._exit = _recording_exit
        atexit.register(lambda: _write("rank-exit", vmhwm_kb=_hwm_kb()))
''' % {"env": PROBE_ENV, "rank": RANK_MODULE}


def vmhwm_kb(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                name = line.split(":", 1)[0]
                if name in fields:
                    found[name] = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return found


# --- scaled data ---------------------------------------------------------------------------------


def shifts(copies: int) -> list[tuple[int, int]]:
    """Copy j's (dx, dy): (0, 0) first, then every offset in {0..3}^2, x fastest."""
    return [(j % 4, j // 4) for j in range(copies)]


def make_scaled(data: Path, cache: Path, scale: int) -> dict[str, Any]:
    """``cache/x<scale>/mnist-digits-{train,test}.txt`` (made once); their rows and bytes."""
    folder = cache / f"x{scale}"
    done = folder / "made.json"
    if done.exists():
        return json.loads(done.read_text())
    import numpy as np
    from scipy import sparse
    from sklearn.datasets import dump_svmlight_file, load_svmlight_file

    if scale > 16:
        raise SystemExit("scales up to 16 (the 16 offsets in {0..3}^2)")
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, Any] = {"scale": scale}
    for split, name in FILES.items():
        source = data / f"{name}.bz2"
        x, y = load_svmlight_file(str(source), n_features=PIXELS)
        images = np.asarray(x.todense(), dtype=np.uint8).reshape(-1, SIDE, SIDE)
        labels = y.astype(np.int64)
        target = folder / name
        partial = target.with_suffix(".part")
        with open(partial, "wb") as out:
            for start in range(0, len(images), 2000):
                chunk = images[start:start + 2000]
                copies = np.stack([np.roll(chunk, (dy, dx), axis=(1, 2)) for dx, dy in shifts(scale)], axis=1)
                rows = sparse.csr_matrix(copies.reshape(-1, PIXELS).astype(np.float64))
                dump_svmlight_file(rows, np.repeat(labels[start:start + 2000], scale), out, zero_based=False)
        partial.rename(target)
        made[split] = {"path": str(target), "rows": len(images) * scale, "bytes": target.stat().st_size}
        if scale == 1:
            made[split]["md5"] = hashlib.md5(target.read_bytes()).hexdigest()  # noqa: S324 - SOURCE.md's checksum
    done.write_text(json.dumps(made, indent=2) + "\n")
    return made


# --- inside the measured processes ---------------------------------------------------------------


def driver_wrapper(record: str, argv: list[str]) -> None:
    """``sparkml-mnist`` in this process, then this process's own VmHWM (the Python driver's)."""
    from sparkml_mnist.cli.commands import main

    code = 1
    try:
        code = main(argv)
    finally:
        import sparkml_mnist

        Path(record).write_text(json.dumps({"vmhwm_kb": vmhwm_kb(), "exit_code": code,
                                            "package": sparkml_mnist.__file__}))
    sys.exit(code)


def baseline(steps: int, with_imports: bool) -> None:
    """TensorFlow only: tf_keras, variant 1 built and fitted for ``steps`` (+ validation) on one random batch."""
    if with_imports:
        import pyarrow  # noqa: F401 - what a rank imports besides TensorFlow to read its partition
        from pyspark import cloudpickle  # noqa: F401
    import sparkml_mnist
    from sparkml_mnist.config import load_data_spec, load_variant
    from sparkml_mnist.launcher import keras_flavour
    from sparkml_mnist.training.models import build_model

    tf = keras_flavour.tensorflow()
    spec = load_data_spec()
    batch = 128 // NP
    images = tf.random.uniform((batch, *spec.image_shape))
    labels = tf.one_hot(tf.random.uniform((batch,), maxval=10, dtype=tf.int32), 10)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    model = build_model(load_variant(VARIANT))
    model.fit(data, epochs=1, steps_per_epoch=steps, validation_data=data, validation_steps=steps, verbose=0)
    model.predict(images, verbose=0)
    print(json.dumps({"vmhwm_kb": vmhwm_kb(), "package": sparkml_mnist.__file__}))


def sklearn_end_to_end(train: str, test: str, steps: int) -> None:
    """The one-process way without Spark: sklearn reads both files, tf_keras fits variant 1 for the job's
    capped steps (and validation steps) on all of the machine's cores, then scores the whole test set.

    The same work as the job's run at that scale except the report and plots; prints wall seconds per
    phase and this process's VmHWM.
    """
    started = time.perf_counter()
    import numpy as np
    from sklearn.datasets import load_svmlight_file

    from sparkml_mnist.config import load_variant
    from sparkml_mnist.launcher import keras_flavour
    from sparkml_mnist.training.models import build_model

    keras_flavour.tensorflow()
    imported = time.perf_counter()
    variant = load_variant(VARIANT)

    def images(path: str) -> tuple[Any, Any]:
        x, y = load_svmlight_file(path, n_features=PIXELS, dtype=np.float32)
        dense = x.toarray()
        dense /= np.float32(255)  # in place: one dense copy, as a careful user would
        return dense.reshape(-1, SIDE, SIDE, 1), y.astype(np.int64)

    x_train, y_train = images(train)
    x_test, y_test = images(test)
    read = time.perf_counter()
    cut = len(x_train) - int(len(x_train) * variant.validation_split)  # Keras's validation_split: the last rows
    eye = np.eye(10, dtype=np.float32)
    model = build_model(variant)
    model.fit(x_train[:cut], eye[y_train[:cut]], batch_size=128, epochs=1, steps_per_epoch=steps,
              validation_data=(x_train[cut:][: steps * 128], eye[y_train[cut:][: steps * 128]]), verbose=0)
    trained = time.perf_counter()
    accuracy = float((model.predict(x_test, batch_size=1024, verbose=0).argmax(axis=1) == y_test).mean())
    scored = time.perf_counter()
    print(json.dumps({"vmhwm_kb": vmhwm_kb(), "imports_s": imported - started, "read_s": read - imported,
                      "train_s": trained - read, "evaluate_s": scored - trained, "test_accuracy": accuracy}))


def measure_sklearn(files: dict[str, Any], steps: int) -> dict[str, Any]:
    """``sklearn_end_to_end`` in a fresh process, timed from outside like the job's run."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", CUDA_VISIBLE_DEVICES="-1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    command = [sys.executable, str(Path(__file__).resolve()), "_sklearn", files["train"]["path"],
               files["test"]["path"], str(steps)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "peak_rss_mb": measured.pop("vmhwm_kb") / 1024, **measured}


# --- the orchestrator ----------------------------------------------------------------------------


class Poller(threading.Thread):
    """Every ``POLL_S``: the root's descendants in /proc, each kind's peak VmHWM, each rank's partition."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.done = root, threading.Event()
        self.driver_kb = 0
        self.jvm_kb: dict[int, int] = {}
        self.worker_kb: dict[int, int] = {}
        self.rank_kb: dict[int, int] = {}
        self.partitions: dict[int, dict[str, Any]] = {}
        self.rank_split: dict[int, dict[str, int]] = {}  # a rank's RSS split at its largest polled VmRSS

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            self.done.wait(POLL_S)

    def sample(self) -> None:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    ppid = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
        self.driver_kb = max(self.driver_kb, vmhwm_kb(self.root) or 0)
        stack = list(children.get(self.root, []))
        while stack:
            pid = stack.pop()
            stack.extend(children.get(pid, []))
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            kb = vmhwm_kb(pid) or 0
            if RANK_MODULE.encode() in cmdline:
                self.rank_kb[pid] = max(self.rank_kb.get(pid, 0), kb)
                split = status_kb(pid, ("VmRSS", "RssAnon", "RssFile", "RssShmem"))
                if split.get("VmRSS", 0) > self.rank_split.get(pid, {}).get("VmRSS", 0):
                    self.rank_split[pid] = split
                if pid not in self.partitions:
                    self.partitions[pid] = partition_of(Path(cmdline[-2].decode()) if not cmdline[-1] else
                                                        Path(cmdline[-1].decode()))
            elif cmdline and cmdline[0].endswith(b"java"):
                self.jvm_kb[pid] = max(self.jvm_kb.get(pid, 0), kb)
            elif b"pyspark.daemon" in cmdline or b"pyspark.worker" in cmdline:
                self.worker_kb[pid] = max(self.worker_kb.get(pid, 0), kb)


def partition_of(workdir: Path) -> dict[str, Any]:
    path = workdir / PARTITION_FILE
    try:
        size = path.stat().st_size
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (OSError, ValueError) as error:  # already mapped and unlinked by the rank, or being written
        return {"seen": False, "why": str(error)}
    return {"seen": True, "bytes": size, "rows": rows}


def run_scale(scale: int, files: dict[str, Any], source: Path | None, steps: int, driver_memory: str | None,
              log_folder: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"scale-x{scale}-") as folder:
        folder_path = Path(folder)
        probe = folder_path / "probe"
        probe.mkdir()
        (probe / "sitecustomize.py").write_text(PROBE)
        records = folder_path / "records"
        records.mkdir()
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1")
        env[PROBE_ENV] = str(records)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(source) if source else None, str(probe), os.environ.get("PYTHONPATH")) if p)
        if driver_memory:
            env["PYSPARK_SUBMIT_ARGS"] = f"--driver-memory {driver_memory} pyspark-shell"
        output = folder_path / "out"
        driver_record = folder_path / "driver.json"
        command = [sys.executable, str(Path(__file__).resolve()), "_driver", str(driver_record), "train",
                   "--variant", VARIANT, "--np", str(NP), "--epochs", "1", "--max-steps-per-epoch", str(steps),
                   "--train", files["train"]["path"], "--test", files["test"]["path"], "--output", str(output)]
        log = log_folder / f"scale-x{scale}.log"
        load_before = os.getloadavg()[0]  # the machine is shared: how busy it was when this run started
        started = time.perf_counter()
        with open(log, "w") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=folder)
            poller = Poller(process.pid)
            poller.start()
            code = process.wait()
        wall = time.perf_counter() - started
        poller.done.set()
        poller.join()
        if code != 0:
            text = log.read_text()
            first = next((line for line in text.splitlines() if "Error" in line or "error:" in line), "")
            raise JobFailed({"exit_code": code, "first_error": first.strip(), "wall_s": wall, "log": str(log),
                             "driver_memory": driver_memory or "Spark's default (1g)", "load_before": load_before})
        driver = json.loads(driver_record.read_text())
        report = json.loads((output / "report.json").read_text())
        imports = [json.loads(p.read_text()) for p in records.glob("import-*.json")]
        exited = [json.loads(path.read_text()) for path in records.glob("rank-exit-*.json")]
        exits = {record["pid"]: record["vmhwm_kb"] for record in exited}
    variant = report["variants"][0]
    by_pid = {record["pid"]: record["rank"] for record in variant.get("rank_records", []) if "pid" in record}
    ranks = []
    for order, pid in enumerate(sorted(poller.rank_kb)):
        peak_kb = max(poller.rank_kb[pid], exits.get(pid) or 0)
        part = poller.partitions.get(pid, {"seen": False})
        ranks.append({
            "rank": by_pid.get(pid, order), "pid": pid, "peak_rss_mb": peak_kb / 1024,
            "peak_from": "exit" if (exits.get(pid) or 0) >= poller.rank_kb[pid] else "poll",
            # at the largest VmRSS polled: anonymous memory, file pages (libraries, the mapped partition), shmem
            "rss_split_at_polled_max_mb": {k: v / 1024 for k, v in poller.rank_split.get(pid, {}).items()},
            "partition_bytes": part.get("bytes"), "partition_rows": part.get("rows"),
            "partition_rows_x800_bytes": part["rows"] * BYTES_PER_ROW if part.get("rows") else None,
        })
    ranks.sort(key=lambda r: r["rank"])
    # sparkml_mnist/__init__.py and conf/__init__.py (the package's sparkml_mnist.conf): two levels below the checkout
    packages = sorted({str(Path(which["origin"] or "?").parent.parent) for which in imports})
    rank_packages = sorted({str(Path(which["origin"] or "?").parent.parent) for which in imports
                            if RANK_MODULE in which["cmdline"]})
    return {
        "train_rows": files["train"]["rows"], "test_rows": files["test"]["rows"],
        "load_before": load_before,
        "wall_s": wall,
        "evaluate_s": variant["seconds"]["evaluate"],
        "test_accuracy": variant.get("test", {}).get("accuracy"),
        "driver_peak_rss_mb": driver["vmhwm_kb"] / 1024,
        "driver_peak_rss_polled_mb": poller.driver_kb / 1024,
        "jvm_peak_rss_mb": max(poller.jvm_kb.values(), default=0) / 1024 or None,
        "python_worker_peak_rss_mb": max(poller.worker_kb.values(), default=0) / 1024 or None,
        "rank_peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
        "partition_bytes": [r["partition_bytes"] for r in ranks],
        "partition_rows": [r["partition_rows"] for r in ranks],
        "ranks": ranks,
        "driver_memory": driver_memory or "Spark's default (1g)",
        "code_in_driver": str(Path(driver["package"]).parent.parent),
        "code_in_ranks": rank_packages,  # sparkml_mnist and its conf, as each process imported them
        "code_anywhere": packages,  # the driver, Spark's Python workers and the ranks
    }


class JobFailed(RuntimeError):
    """The job exited non-zero; ``args[0]``: what the results keep of it."""


def measure_baseline(source: Path | None, steps: int, with_imports: bool) -> dict[str, Any]:
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", CUDA_VISIBLE_DEVICES="-1")
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
        env[name] = "1"  # what a rank gets at np=2 on local[2] (one core per task)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), env.get("PYTHONPATH")) if p)
    command = [sys.executable, str(Path(__file__).resolve()), "_baseline", str(steps)]
    command += ["imports"] if with_imports else []
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {"rss_mb": measured["vmhwm_kb"] / 1024, "package": measured["package"].rsplit("/sparkml_mnist/", 1)[0]}


def measure_sklearn_scales(result: dict[str, Any], args: argparse.Namespace, scales: list[int]) -> None:
    """The ``sklearn`` entry at each scale, and beside it the job's ``after`` run of the same scale."""
    kept = result.setdefault("sklearn", {})
    kept["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    kept["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    kept["note"] = ("one process: load_svmlight_file (train, test), dense float32, tf_keras variant 1 fitted "
                    "for the same capped steps and validation steps on all cores, the whole test set scored; "
                    "no report or plots")
    for scale in scales:
        files = make_scaled(args.data, args.cache, scale)
        measured = measure_sklearn(files, args.steps)
        job = result.get("after", {}).get(f"x{scale}")
        if job:
            measured["job_wall_s"] = job["wall_s"]
            measured["job_over_sklearn_wall"] = job["wall_s"] / measured["wall_s"]
            measured["job_driver_peak_rss_mb"] = job["driver_peak_rss_mb"]
            measured["job_rank_peak_rss_mb"] = max(job["rank_peak_rss_mb"])
        kept[f"x{scale}"] = measured
        print(f"sklearn x{scale}: " + json.dumps(measured), flush=True)
        RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's three figures, from ``after`` (and ``before``'s x16 evaluation); ``before``'s own beside them."""
    found = figures(result.get("after", {}))
    if "x16" in result.get("after", {}) and "x16" in result.get("before", {}):
        found["evaluate_x16_after_s"] = result["after"]["x16"]["evaluate_s"]
        found["evaluate_x16_before_s"] = result["before"]["x16"]["evaluate_s"]
        found["evaluate_x16_after_over_before"] = found["evaluate_x16_after_s"] / found["evaluate_x16_before_s"]
    found["before_figures"] = figures(result.get("before", {}))
    return found


def figures(after: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if "x1" in after and "x16" in after:
        found["driver_rss_ratio_x16_x1"] = after["x16"]["driver_peak_rss_mb"] / after["x1"]["driver_peak_rss_mb"]
    # (rank peak - baseline) / partition file bytes, the worst rank of each scale; the key is x16's, where the
    # partition is largest and the ranks' fixed costs (strategy, gRPC, pyarrow) weigh least.
    overs = {key: max((rss - after["baseline_rss_mb"]) * MB / part
                      for rss, part in zip(run["rank_peak_rss_mb"], run["partition_bytes"]) if part)
             for key, run in sorted(after.items(), key=lambda item: (len(item[0]), item[0]))
             if isinstance(run, dict) and "rank_peak_rss_mb" in run and any(run["partition_bytes"])}
    if overs:
        found["rank_rss_over_partition_by_scale"] = overs
        found["rank_rss_over_partition"] = overs.get("x16")
    if "x1" in after and "x16" in after and all(after[k]["partition_bytes"][0] for k in ("x1", "x16")):
        # How a rank's peak grows with its partition: MB of peak per MB of partition from x1 to x16.
        grown = max(after["x16"]["rank_peak_rss_mb"]) - max(after["x1"]["rank_peak_rss_mb"])
        found["rank_rss_growth_per_partition_byte"] = grown * MB / (
            after["x16"]["partition_bytes"][0] - after["x1"]["partition_bytes"][0])
    return found


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_driver":
        driver_wrapper(sys.argv[2], sys.argv[3:])
    if len(sys.argv) > 4 and sys.argv[1] == "_sklearn":
        sklearn_end_to_end(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    if len(sys.argv) > 2 and sys.argv[1] == "_baseline":
        baseline(int(sys.argv[2]), with_imports=sys.argv[3:] == ["imports"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after",
                        help="before / after feed the targets; any other label (e.g. after-1g) is kept beside them")
    parser.add_argument("--source", type=Path, help="another checkout to run (PYTHONPATH), e.g. the commit before")
    parser.add_argument("--scales", default="1,4,16", help="comma list of copies per row (1..16)")
    parser.add_argument("--steps", type=int, default=20, help="--max-steps-per-epoch of the one epoch")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with the full MNIST .bz2 files")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sparkml-mnist-scale",
                        help="where the scaled files are made (outside the repository)")
    parser.add_argument("--driver-memory", help="spark.driver.memory for the runs (default: Spark's, 1g)")
    parser.add_argument("--sklearn", action="store_true",
                        help="measure the one-process way (sklearn reads, tf_keras fits) at each scale instead "
                             "(kept under sklearn; the job's runs are left as they are)")
    parser.add_argument("--note", default="", help="what the measured code is, in words (kept in the results)")
    args = parser.parse_args()
    scales = [int(part) for part in args.scales.split(",")]
    checkout = (args.source or REPO).resolve()
    expected = str(checkout)

    result = json.loads(RESULT_FILE.read_text()) if RESULT_FILE.exists() else {}
    if args.sklearn:  # the job runs' header (their date, machine) stays theirs
        measure_sklearn_scales(result, args, scales)
        return
    result.update({
        "command": f"sparkml-mnist train --variant {VARIANT} --np {NP} --epochs 1 --max-steps-per-epoch "
                   f"{args.steps} --train <xK train> --test <xK test>   (benchmarks/scale.py)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steps": args.steps,
    })
    label = result.setdefault(args.label, {})
    label.update({"source": commit_of(checkout), "note": args.note})
    for with_imports, key in ((False, "baseline_rss_mb"), (True, "baseline_with_pyarrow_rss_mb")):
        measured = measure_baseline(args.source, args.steps, with_imports)
        if measured["package"] != expected:
            raise SystemExit(f"the baseline imported sparkml_mnist from {measured['package']}, not {expected}")
        label[key] = measured["rss_mb"]
        print(f"{args.label}: {key} {measured['rss_mb']:.0f} MB", flush=True)
    data = result.setdefault("data", {})
    for scale in scales:
        files = make_scaled(args.data, args.cache, scale)
        data[f"x{scale}"] = {split: {"rows": files[split]["rows"], "bytes": files[split]["bytes"]}
                             for split in FILES}
        try:
            measured = run_scale(scale, files, args.source, args.steps, args.driver_memory,
                                 Path(tempfile.gettempdir()))
        except JobFailed as failed:
            memory = (args.driver_memory or "default").lower()
            label[f"x{scale}_failed_driver_memory_{memory}"] = failed.args[0]
            print(f"{args.label} x{scale}: FAILED {json.dumps(failed.args[0])}", flush=True)
            RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
            continue
        wrong = {measured["code_in_driver"], *measured["code_anywhere"]} - {expected}
        if wrong or not measured["code_in_ranks"]:
            raise SystemExit(f"x{scale}: sparkml_mnist or its conf came from {sorted(wrong)} (ranks: "
                             f"{measured['code_in_ranks']}), not only {expected}")
        label[f"x{scale}"] = measured
        print(f"{args.label} x{scale}: " + json.dumps({k: measured[k] for k in (
            "wall_s", "evaluate_s", "driver_peak_rss_mb", "jvm_peak_rss_mb", "rank_peak_rss_mb", "partition_bytes")}),
            flush=True)
        result.update(targets(result))
        RESULT_FILE.parent.mkdir(exist_ok=True)
        RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")  # after each scale: a long run keeps its part
    print(json.dumps(targets(result)))


if __name__ == "__main__":
    main()
