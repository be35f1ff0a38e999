"""Make the bundled sample (package data) from the full MNIST files in ../shared/data/mnist-digits.

    python scripts/make_sample.py [--data DIR] [--train-rows 6000] [--test-rows 1000]

Takes the first rows of each file, keeping their order, compresses them with bzip2 -9 and writes
their SHA-256 checksums to SHA256SUMS beside them. The output is deterministic: running it again
gives the same bytes, which tests check against SHA256SUMS.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import itertools
import os
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sparkml_mnist" / "data" / "sample"
SOURCES = {"train": "mnist-digits-train.txt.bz2", "test": "mnist-digits-test.txt.bz2"}


def sample_name(split: str) -> str:
    return f"mnist-digits-{split}-sample.txt.bz2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("SPARKML_MNIST_DATA", "../shared/data/mnist-digits"))
    parser.add_argument("--train-rows", type=int, default=6000)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    sums = []
    for split, rows in (("train", args.train_rows), ("test", args.test_rows)):
        with bz2.open(Path(args.data) / SOURCES[split], "rb") as source:
            lines = list(itertools.islice(source, rows))
        if len(lines) != rows:
            raise SystemExit(f"{SOURCES[split]} has only {len(lines)} rows, {rows} asked for")
        payload = bz2.compress(b"".join(lines), compresslevel=9)
        (args.out / sample_name(split)).write_bytes(payload)
        sums.append(f"{hashlib.sha256(payload).hexdigest()}  {sample_name(split)}  rows={rows}\n")
        print(f"{sample_name(split)}: {rows} rows, {len(payload):,} bytes")
    (args.out / "SHA256SUMS").write_text("".join(sums))


if __name__ == "__main__":
    main()
