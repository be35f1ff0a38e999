"""The bundled sample: real MNIST rows, the recorded checksums, and reproducible from the full files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from sparkml_mnist.data.paths import SAMPLE_FILES, sample_dir, sample_paths

REPO = Path(__file__).resolve().parents[1]
MAX_SAMPLE_BYTES = 2 * 1024 * 1024


def recorded_sums() -> dict[str, tuple[str, int]]:
    sums = {}
    for line in (sample_dir() / "SHA256SUMS").read_text().splitlines():
        digest, name, rows = line.split()
        sums[name] = (digest, int(rows.removeprefix("rows=")))
    return sums


def test_sample_files_match_their_recorded_checksums():
    sums = recorded_sums()
    assert set(sums) == set(SAMPLE_FILES.values())
    total = 0
    for name, (digest, _) in sums.items():
        payload = (sample_dir() / name).read_bytes()
        total += len(payload)
        assert hashlib.sha256(payload).hexdigest() == digest, f"{name} differs from SHA256SUMS"
    assert total < MAX_SAMPLE_BYTES


def test_sample_rows_are_as_recorded(spark):
    from sparkml_mnist.data.libsvm import load_libsvm

    sums = recorded_sums()
    paths = sample_paths()
    assert load_libsvm(spark, paths.train).num_rows == sums[SAMPLE_FILES["train"]][1]
    assert load_libsvm(spark, paths.test).num_rows == sums[SAMPLE_FILES["test"]][1]


def test_make_sample_reproduces_the_bundled_bytes(tmp_path, full_data_dir):
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_sample.py"), "--data", str(full_data_dir), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in SAMPLE_FILES.values():
        assert (tmp_path / name).read_bytes() == (sample_dir() / name).read_bytes()
    assert (tmp_path / "SHA256SUMS").read_text() == (sample_dir() / "SHA256SUMS").read_text()
