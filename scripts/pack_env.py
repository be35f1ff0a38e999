"""Pack the executors' Python environment for ``spark-submit --archives``: a venv with the job's
dependencies and this package's wheel, packed with venv-pack.

    python scripts/pack_env.py [--flavour cpu|gpu] [--output dist/sparkml-mnist-env-cpu.tar.gz]
                               [--venv DIR] [--python-prefix PREFIX] [--force]
    spark-submit --archives dist/sparkml-mnist-env-cpu.tar.gz#environment \\
        --conf spark.pyspark.python=./environment/bin/python ... jobs/train_mnist.py ...

``--compress-level 0`` stores the files uncompressed inside the ``.tar.gz`` (still unpacked by ``tar``):
about 2.8 GB instead of 0.8 GB, packed in seconds instead of minutes of gzip (CI's choice).
Keep ``.tar.gz`` (or ``.zip``): Spark unpacks a plain ``.tar`` with Hadoop's Java untar, which refuses
the venv's ``bin/python`` link ("expanding bin/python3.11 would create entry outside of ..."), while a
``.tar.gz`` goes through the system's ``tar`` (measured with Spark 4.3, a standalone cluster).

Needs venv-pack in the Python that runs it (``pip install -e ".[pack]"``). The archive holds no Python
interpreter: its ``bin/python`` links to the Python that built it, so every node needs that Python at
the same prefix, or give ``--python-prefix`` (a prefix with the same major.minor on the nodes). Spark
itself is not packed: executors import pyspark from their own Spark installation.

``--venv DIR`` keeps the build venv: a later call reuses its dependencies while setup.py and the
Python are unchanged (only the wheel is reinstalled), and does nothing at all while the archive is
newer than every packaged source (its ``.stamp`` file records what it was built from).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
FLAVOURS = ("cpu", "gpu")  # setup.py extras: TensorFlow for CPUs, or with its CUDA wheels
# What a wheel build reads; copied so the build writes nothing into the checkout.
WHEEL_SOURCES = ("setup.py", "pyproject.toml", "README.md", "sparkml_mnist", "conf")
SKIPPED_IN_SOURCES = ("__pycache__", "*.pyc", "*.egg-info")
REQUIREMENTS_FILE = "setup.py"  # the dependency pins: the build venv is reused while it is unchanged
STAMP_SUFFIX = ".stamp"
DEFAULT_COMPRESS_LEVEL = 4  # venv-pack's own; 0 stores (gzip framing only): CI's choice, where the archive stays local
LOCK_SUFFIX = ".lock"
VENV_STAMP = ".sparkml-mnist-requirements"
# Left out of the archive: TensorFlow's C++ headers, for building custom ops; nothing imports them.
EXCLUDED = ("*/site-packages/tensorflow/include/*",)
PIP = ("-m", "pip", "install", "-q", "--disable-pip-version-check")
COMMAND_TIMEOUT_S = 3600


class PackError(RuntimeError):
    """A step of packing failed; the message says which and what to do."""


def build_wheel(dest: Path, repo: Path = REPO) -> Path:
    """This package's wheel, built into ``dest`` from a copy of its sources."""
    source = dest / "src"
    for name in WHEEL_SOURCES:
        origin = repo / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns(*SKIPPED_IN_SOURCES))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / name)
    dist = dest / "dist"
    # With setuptools at hand, build with it rather than fetch it into an isolated build environment.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("sparkml_mnist-*.whl")
    return wheel


def run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if result.returncode != 0:
        raise PackError(f"{' '.join(command)} failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")


def digest(paths: list[Path], *extra: str) -> str:
    """SHA-256 over the files (names and bytes, in order) and ``extra`` strings."""
    hasher = hashlib.sha256()
    for text in extra:
        hasher.update(text.encode() + b"\0")
    for path in paths:
        hasher.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return hasher.hexdigest()


def source_files() -> list[Path]:
    files = []
    for name in WHEEL_SOURCES:
        origin = REPO / name
        candidates = sorted(origin.rglob("*")) if origin.is_dir() else [origin]
        files += [p for p in candidates if p.is_file() and not any(p.match(s) or s in p.parts for s in SKIPPED_IN_SOURCES)]
    return files


def requirements_key(flavour: str) -> str:
    """What the build venv's dependencies depend on: setup.py's pins, the flavour and this Python."""
    return digest([REPO / REQUIREMENTS_FILE], flavour, sys.version)


def prepare_venv(venv: Path, wheel: Path, flavour: str, say: Callable[[str], None] = print) -> None:
    """Create ``venv`` with the wheel and its ``flavour`` extra, or reuse its dependencies when they are current."""
    stamp, key = venv / VENV_STAMP, requirements_key(flavour)
    if stamp.is_file() and stamp.read_text().strip() == key:
        say(f"reusing the dependencies in {venv}")
        run([str(venv / "bin" / "python"), *PIP, "--no-deps", "--force-reinstall", str(wheel)])
        return
    shutil.rmtree(venv, ignore_errors=True)
    say(f"creating {venv} with {wheel.name}[{flavour}] (TensorFlow comes from pip's cache, or minutes)")
    run([sys.executable, "-m", "venv", str(venv)])
    stamp.write_text("incomplete\n")  # ours from now on, but not reusable until the install succeeds
    run([str(venv / "bin" / "python"), *PIP, f"{wheel}[{flavour}]"])
    stamp.write_text(key + "\n")


def check_venv_folder(venv: Path) -> None:
    """``--venv`` is replaced at will: refuse a folder this script did not make (e.g. the project's .venv)."""
    if venv.exists() and not (venv / VENV_STAMP).is_file():
        raise PackError(f"{venv} exists and was not made by this script; give --venv a new folder (it is replaced at will)")


def archive_key(flavour: str, python_prefix: str | None, compress_level: int = DEFAULT_COMPRESS_LEVEL) -> str:
    """What the archive depends on: every packaged source, the flavour, this Python, the nodes' prefix, and
    how hard it is compressed."""
    return digest(source_files(), flavour, sys.version, python_prefix or "", str(compress_level))


def pack(venv: Path, output: Path, python_prefix: str | None, compress_level: int = DEFAULT_COMPRESS_LEVEL) -> None:
    try:
        import venv_pack
    except ImportError:
        raise PackError('venv-pack is not installed in this Python: pip install -e ".[pack]"') from None
    output.parent.mkdir(parents=True, exist_ok=True)
    filters = [("exclude", pattern) for pattern in EXCLUDED]
    try:
        venv_pack.pack(prefix=str(venv), output=str(output), python_prefix=python_prefix, force=True, filters=filters,
                       compress_level=compress_level)
    except venv_pack.VenvPackException as error:
        raise PackError(f"venv-pack could not pack {venv}: {error}") from None


def pack_environment(
    output: Path, flavour: str = "cpu", venv: Path | None = None, python_prefix: str | None = None,
    force: bool = False, say: Callable[[str], None] = print, compress_level: int = DEFAULT_COMPRESS_LEVEL,
) -> Path:
    """Build (or reuse) the venv and pack it to ``output``; nothing is done while ``output`` is current.

    One build per ``output`` at a time (a lock beside it): a second call waits, then finds it current.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_name(output.name + LOCK_SUFFIX), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _pack_environment(output, flavour, venv, python_prefix, force, say, compress_level)


def _pack_environment(
    output: Path, flavour: str, venv: Path | None, python_prefix: str | None, force: bool, say: Callable[[str], None],
    compress_level: int = DEFAULT_COMPRESS_LEVEL,
) -> Path:
    stamp = output.with_name(output.name + STAMP_SUFFIX)
    key = archive_key(flavour, python_prefix, compress_level)
    if not force and output.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        say(f"{output} is up to date")
        return output
    if venv is not None:
        check_venv_folder(venv)
    stamp.unlink(missing_ok=True)  # an archive left half-written below must not look current
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sparkml-mnist-pack-") as scratch:
        wheel = build_wheel(Path(scratch))
        target = venv or Path(scratch) / "venv"
        prepare_venv(target, wheel, flavour, say)
        installed = time.perf_counter()
        pack(target, output, python_prefix, compress_level)
    stamp.write_text(key + "\n")
    done = time.perf_counter()
    say(
        f"packed {output}: {output.stat().st_size / 1e6:,.0f} MB; {installed - started:.0f} s to build the venv, "
        f"{done - installed:.0f} s to pack"
    )
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavour", choices=FLAVOURS, default=FLAVOURS[0], help="TensorFlow for CPUs (default) or GPUs")
    parser.add_argument("--output", type=Path, help="the archive (default: dist/sparkml-mnist-env-<flavour>.tar.gz)")
    parser.add_argument("--venv", type=Path, help="keep the build venv here and reuse it (default: a temporary one)")
    parser.add_argument("--python-prefix", help="prefix of the nodes' Python, if not this one's (e.g. /usr)")
    parser.add_argument("--force", action="store_true", help="pack even if the archive is up to date")
    parser.add_argument("--compress-level", type=int, choices=range(10), default=DEFAULT_COMPRESS_LEVEL, metavar="0-9",
                        help=f"gzip level (default {DEFAULT_COMPRESS_LEVEL}, venv-pack's; 0: stored, about 3.5x "
                             "the size, seconds instead of minutes to pack)")
    args = parser.parse_args(argv)
    output = args.output or REPO / "dist" / f"sparkml-mnist-env-{args.flavour}.tar.gz"
    try:
        pack_environment(output.absolute(), args.flavour, args.venv and args.venv.absolute(), args.python_prefix, args.force,
                         compress_level=args.compress_level)
    except PackError as error:
        print(f"pack_env: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
