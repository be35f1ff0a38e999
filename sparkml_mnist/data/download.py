"""Canonical MNIST (IDX ``.gz``) from a mirror -> verified -> the Databricks LIBSVM ``.bz2`` files.

Clusters without ``/databricks-datasets`` need the two files the Databricks runtime ships. Building
them from the canonical IDX files, checked against their published checksums and converted with
the recipe of the shared data's SOURCE.md, gives the same bytes a user would get there.
Settings (mirror, file names, checksums) live in ``conf/download.yaml``.
"""

from __future__ import annotations

import bz2
import hashlib
import http.client
import io
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import urlopen

import numpy as np
from sklearn.datasets import dump_svmlight_file

from sparkml_mnist.config import DataSpec, default_conf_file, load_data_spec
from sparkml_mnist.config.loader import Invalid, from_mapping, load_file, positive, rule
from sparkml_mnist.data.idx import MIRROR_HINT, DownloadError, parse_idx
from sparkml_mnist.data.paths import COMPRESSED_SUFFIX, DatasetPaths
from sparkml_mnist.errors import ConfigError

DOWNLOAD_CONF_FILE = "download.yaml"
SPLITS = ("train", "test")  # output names come from conf/data.yaml's train_file / test_file
MIRROR_SCHEMES = ("http", "https", "file")
HASH_LENGTHS = {"sha256": 64, "md5": 32}  # algorithms accepted in the config, with their hex length
REQUIRED_HASH = "sha256"
BZIP2_LEVELS = range(1, 10)
TEMP_PREFIX = ".mnist-download-"
TEMP_SUFFIX = ".part"
TEMP_TOKEN_BYTES = 4
HASH_BLOCK_BYTES = 1 << 20
MANIFEST_VERSION = 1
# Each IDX file is read in pieces, whatever the mirror sends, and no longer than a deadline: the per-read
# ``timeout_s`` alone lets a mirror that drips a byte now and then hold the download forever.
READ_CHUNK_BYTES = 1 << 16
MAX_FILE_BYTES = 256 * 1024 * 1024  # the largest MNIST file (train-images) is 9.9 MB
DEADLINE_S = 900.0  # per file: 9.9 MB at ~11 KB/s

IDX_IMAGE_DIMS = 3  # images, rows, columns
IDX_LABEL_DIMS = 1

_LOG = logging.getLogger(__name__)


def _hex(length: int) -> "Callable[[str], str | None]":
    def check(value: str) -> str | None:
        text = value.strip().lower()
        ok = len(text) == length and all(c in "0123456789abcdef" for c in text)
        return None if ok else f"must be {length} hex digits, got {value!r}"

    return check


def _lowercase(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


@dataclass(frozen=True)
class Checksums:
    """A file's published checksums: sha256 is required and checked first, md5 too when given."""

    sha256: str = field(metadata=rule(_hex(HASH_LENGTHS["sha256"]), convert=_lowercase))
    md5: str | None = field(default=None, metadata=rule(_hex(HASH_LENGTHS["md5"]), convert=_lowercase))

    def items(self) -> list[tuple[str, str]]:
        return [(name, value) for name, value in (("sha256", self.sha256), ("md5", self.md5)) if value]


@dataclass(frozen=True)
class SplitFiles:
    """The two IDX files of one split."""

    images: str
    labels: str


def _plain_name(name: str) -> str | None:
    return None if name and Path(name).name == name else f"must be a plain file name, got {name!r}"


def _level(level: int) -> str | None:
    return None if level in BZIP2_LEVELS else f"must be 1..9, got {level}"


@dataclass(frozen=True)
class DownloadSpec:
    """``conf/download.yaml``: where to fetch, what to expect, how to write."""

    mirror_url: str
    timeout_s: float = field(metadata=rule(positive))
    bzip2_level: int = field(metadata=rule(_level))
    rows_per_chunk: int = field(metadata=rule(positive))
    manifest_file: str = field(metadata=rule(_plain_name))
    splits: dict[str, SplitFiles]
    checksums: dict[str, Checksums]  # IDX file name -> its checksums
    max_file_bytes: int = field(default=MAX_FILE_BYTES, metadata=rule(positive))  # a bigger file is refused
    deadline_s: float = field(default=DEADLINE_S, metadata=rule(positive))  # a file's whole download
    source: str = ""

    def validate(self) -> None:
        if sorted(self.splits) != sorted(SPLITS):
            raise Invalid("splits", f"must name exactly {list(SPLITS)}, got {sorted(self.splits)}")
        missing = sorted(set(self.file_names()) - set(self.checksums))
        if missing:
            raise Invalid("checksums", f"has no entry for {', '.join(missing)}")

    def file_names(self) -> list[str]:
        return [name for files in self.splits.values() for name in (files.images, files.labels)]

    def with_checksums(self, sha256_by_file: Mapping[str, str]) -> "DownloadSpec":
        """Expect these sha256 sums instead of the published ones (a private mirror, or tests)."""
        unknown = sorted(set(sha256_by_file) - set(self.file_names()))
        if unknown:
            raise ConfigError(f"checksums given for unknown file(s) {', '.join(unknown)}; expected {self.file_names()}")
        given = from_mapping(
            _GivenChecksums, {"checksums": {name: {"sha256": value} for name, value in sha256_by_file.items()}},
            "checksums given by the caller",
        )
        return replace(self, checksums={**self.checksums, **given.checksums},
                       source=f"{self.source} (with checksums given by the caller)")


@dataclass(frozen=True)
class _GivenChecksums:
    checksums: dict[str, Checksums]


def load_download_spec(path: str | Path | None = None) -> DownloadSpec:
    """``conf/download.yaml`` (or ``path``); read on each call, it is small."""
    return load_file(DownloadSpec, Path(path) if path is not None else default_conf_file(DOWNLOAD_CONF_FILE))


# ---------------------------------------------------------------------------------------------
# The download
# ---------------------------------------------------------------------------------------------


def download_mnist(
    target_dir: str | Path,
    mirror_url: str | None = None,
    *,
    force: bool = False,
    checksums: Mapping[str, str] | None = None,
    spec: DownloadSpec | None = None,
    data_spec: DataSpec | None = None,
    say: Callable[[str], None] | None = None,
) -> DatasetPaths:
    """Fetch, verify and convert MNIST into ``target_dir``; return the two LIBSVM ``.bz2`` files.

    Does nothing when both outputs are there and still match the manifest written with them
    (unless ``force``). Nothing is written until all four files are fetched, verified and parsed,
    and the outputs appear only by renaming complete temporary files, so a failure leaves the
    folder as it was. ``checksums`` (IDX file name -> sha256) replaces the published sums.
    """
    say = say or _LOG.info
    spec = spec or load_download_spec()
    if checksums:
        spec = spec.with_checksums(checksums)
    data_spec = data_spec or load_data_spec()
    mirror = normalise_mirror(mirror_url or spec.mirror_url)
    target = Path(target_dir)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} exists and is not a folder; give a folder for the MNIST files")
    outputs = {split: target / (_split_file(data_spec, split) + COMPRESSED_SUFFIX) for split in SPLITS}
    paths = DatasetPaths(train=str(outputs["train"]), test=str(outputs["test"]))
    manifest = target / spec.manifest_file

    if not force:
        problem = _cache_problem(manifest, outputs)
        if problem is None:
            say(
                f"{paths.train} and {paths.test} are already present and match {manifest.name}; "
                "nothing to do (--force downloads again)"
            )
            return paths
        say(f"{target}: {problem}; downloading from {mirror}")
    else:
        say(f"{target}: --force given; downloading from {mirror}")

    arrays = {}
    for split, files in spec.splits.items():
        images = parse_idx(_fetch_verified(mirror, files.images, spec, say), files.images)
        labels = parse_idx(_fetch_verified(mirror, files.labels, spec, say), files.labels)
        _check_split(images, labels, files, data_spec)
        arrays[split] = (images, labels)

    _write_outputs(target, outputs, manifest, arrays, spec, data_spec.num_classes, mirror, say)
    return paths


def _split_file(data_spec: DataSpec, split: str) -> str:
    return data_spec.train_file if split == "train" else data_spec.test_file


def normalise_mirror(url: str) -> str:
    """The mirror as a folder URL ending in ``/``; anything urllib cannot fetch is refused up front."""
    parsed = urlparse(url.strip())
    if parsed.scheme not in MIRROR_SCHEMES or (parsed.scheme != "file" and not parsed.netloc):
        raise ConfigError(
            f"mirror {url!r} is not an http://, https:// or file:// URL of a folder; "
            "give e.g. --mirror https://ossci-datasets.s3.amazonaws.com/mnist/"
        )
    text = url.strip()
    return text if text.endswith("/") else text + "/"


def _fetch_verified(mirror: str, name: str, spec: DownloadSpec, say: Callable[[str], None]) -> bytes:
    url = mirror + name
    payload = _fetch(url, spec.timeout_s, spec.max_file_bytes, spec.deadline_s)
    for algorithm, expected in spec.checksums[name].items():
        actual = hashlib.new(algorithm, payload).hexdigest()
        if actual != expected:
            raise DownloadError(
                f"{name} from {url}: {algorithm} checksum mismatch: expected {expected}, got {actual} "
                f"({len(payload):,} bytes); the download is corrupt or the mirror serves another file; "
                f"retry, or {MIRROR_HINT}"
            )
    say(f"  {name}: {len(payload):,} bytes, {', '.join(a for a, _ in spec.checksums[name].items())} verified")
    return payload


def _fetch(url: str, timeout_s: float, max_bytes: int = MAX_FILE_BYTES, deadline_s: float = DEADLINE_S) -> bytes:
    """The whole body of ``url``; every failure becomes a DownloadError naming the URL.

    At most ``max_bytes`` (a larger announced length is refused before the body is read), and done within
    ``deadline_s``: the deadline is checked between reads, each of which waits at most ``timeout_s``.
    """
    deadline = time.monotonic() + deadline_s
    try:
        with urlopen(url, timeout=min(timeout_s, deadline_s)) as response:
            announced = (response.headers.get("Content-Length") or "").strip()
            if announced.isdigit() and int(announced) > max_bytes:
                raise _too_large(url, max_bytes, f"the mirror announces {int(announced):,}")
            read = getattr(response, "read1", response.read)  # one read from the network at a time
            chunks, received = [], 0
            while chunk := read(READ_CHUNK_BYTES):
                received += len(chunk)
                if received > max_bytes:
                    raise _too_large(url, max_bytes, f"more than {max_bytes:,} arrived")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise DownloadError(
                        f"download of {url} did not finish within {deadline_s:g} s ({received:,} bytes arrived; "
                        f"deadline_s in conf/download.yaml); the mirror is too slow: retry, raise deadline_s, "
                        f"or {MIRROR_HINT}"
                    )
            return b"".join(chunks)
    except HTTPError as error:
        raise DownloadError(
            f"{url}: HTTP {error.code} {error.reason}; the mirror does not serve this file; {MIRROR_HINT}"
        ) from error
    except URLError as error:
        raise DownloadError(f"cannot reach {url} ({error.reason}); check the network, or {MIRROR_HINT}") from error
    except (OSError, http.client.HTTPException) as error:  # timeouts and broken transfers
        reason = str(error) or type(error).__name__
        raise DownloadError(f"download of {url} failed ({reason}); retry, or {MIRROR_HINT}") from error


def _too_large(url: str, max_bytes: int, found: str) -> DownloadError:
    return DownloadError(
        f"{url} is larger than {max_bytes:,} bytes ({found}), the limit (max_file_bytes in conf/download.yaml) "
        f"that no MNIST file comes near: the mirror serves something else; {MIRROR_HINT}"
    )


# ---------------------------------------------------------------------------------------------
# IDX -> arrays -> LIBSVM text
# ---------------------------------------------------------------------------------------------


def _check_split(images: np.ndarray, labels: np.ndarray, files: SplitFiles, data_spec: DataSpec) -> None:
    height, width = data_spec.image_shape[0], data_spec.image_shape[1]
    if images.ndim != IDX_IMAGE_DIMS or images.shape[1:] != (height, width):
        raise DownloadError(f"{files.images}: expected images of shape (N, {height}, {width}), got {images.shape}")
    if labels.ndim != IDX_LABEL_DIMS:
        raise DownloadError(f"{files.labels}: expected a 1-dimensional label file, got shape {labels.shape}")
    if len(labels) != len(images):
        raise DownloadError(
            f"{files.images} holds {len(images):,} images but {files.labels} holds {len(labels):,} labels; "
            "they must be a matching pair"
        )
    if len(labels) and int(labels.max()) >= data_spec.num_classes:
        raise DownloadError(f"{files.labels}: label {int(labels.max())} is outside 0..{data_spec.num_classes - 1}")


def libsvm_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Rows of images (any shape per image, row-major) as LIBSVM lines, exactly SOURCE.md's recipe:
    ``<label>`` then `` <index>:<value>`` for each nonzero pixel (1-based, increasing), then ``\\n``.

    sklearn's writer gives these bytes for integer arrays (a test holds it to the shared files)."""
    out = io.BytesIO()
    dump_svmlight_file(
        images.reshape(len(images), -1).astype(np.int32), labels.astype(np.int64), out, zero_based=False
    )
    return out.getvalue()


def _compressed_chunks(images: np.ndarray, labels: np.ndarray, spec: DownloadSpec, num_classes: int) -> Iterator[bytes]:
    """bzip2 output, converting ``rows_per_chunk`` images at a time to bound memory."""
    compressor = bz2.BZ2Compressor(spec.bzip2_level)
    for start in range(0, len(images), spec.rows_per_chunk):
        stop = start + spec.rows_per_chunk
        yield compressor.compress(libsvm_bytes(images[start:stop], labels[start:stop]))
    yield compressor.flush()


# ---------------------------------------------------------------------------------------------
# Writing, atomically, and the cache manifest
# ---------------------------------------------------------------------------------------------


def _write_outputs(
    target: Path,
    outputs: Mapping[str, Path],
    manifest: Path,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]],
    spec: DownloadSpec,
    num_classes: int,
    mirror: str,
    say: Callable[[str], None],
) -> None:
    """Write every output to a temporary file in ``target``, then rename; on failure remove them."""
    temporaries: list[Path] = []
    written: dict[str, tuple[Path, str, int]] = {}
    try:
        target.mkdir(parents=True, exist_ok=True)
        for split, (images, labels) in arrays.items():
            temporary = _temporary(target, temporaries)
            digest = hashlib.sha256()
            with temporary.open("xb") as handle:
                for chunk in _compressed_chunks(images, labels, spec, num_classes):
                    handle.write(chunk)
                    digest.update(chunk)
            written[split] = (temporary, digest.hexdigest(), len(labels))
        record = {
            "version": MANIFEST_VERSION,
            "mirror": mirror,
            "sources": {name: dict(spec.checksums[name].items()) for name in spec.file_names()},
            "outputs": {
                outputs[split].name: {"sha256": digest, "rows": rows} for split, (_, digest, rows) in written.items()
            },
        }
        manifest_temporary = _temporary(target, temporaries)
        manifest_temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for split, (temporary, _, _) in written.items():
            os.replace(temporary, outputs[split])
        os.replace(manifest_temporary, manifest)  # last: the manifest vouches for complete outputs
    except OSError as error:
        raise DownloadError(
            f"cannot write the MNIST files in {target} ({error.strerror or error}); check the folder and free space"
        ) from error
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    for split, (_, _, rows) in written.items():
        say(f"wrote {outputs[split]} ({rows:,} rows, {outputs[split].stat().st_size:,} bytes)")


def _temporary(target: Path, temporaries: list[Path]) -> Path:
    path = target / f"{TEMP_PREFIX}{secrets.token_hex(TEMP_TOKEN_BYTES)}{TEMP_SUFFIX}"
    temporaries.append(path)
    return path


def _cache_problem(manifest: Path, outputs: Mapping[str, Path]) -> str | None:
    """Why the outputs cannot be reused, or None when they are there and match the manifest."""
    missing = [path.name for path in outputs.values() if not path.is_file()]
    if missing:
        return f"{', '.join(missing)} not present"
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8"))["outputs"]
        expected = {path.name: recorded[path.name]["sha256"] for path in outputs.values()}
    except FileNotFoundError:
        return f"no {manifest.name} to vouch for the existing files"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest.name} is unreadable or does not list the outputs"
    for path in outputs.values():
        if _sha256_file(path) != expected[path.name]:
            return f"{path.name} does not match {manifest.name}"
    return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
