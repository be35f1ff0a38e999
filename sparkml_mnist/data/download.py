"""Canonical MNIST (IDX ``.gz``) from a mirror -> verified -> the Databricks LIBSVM ``.bz2`` files.

Clusters without ``/databricks-datasets`` need the two files the Databricks runtime ships. Building
them from the canonical IDX files, checked against their published checksums and converted with
the recipe of the shared data's SOURCE.md, gives the same bytes a user would get there.
Settings (mirror, file names, checksums) live in ``conf/download.yaml``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import http.client
import json
import logging
import math
import os
import secrets
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import urlopen

import numpy as np

from sparkml_mnist.config import (
    DataSpec,
    default_conf_file,
    load_data_spec,
    load_yaml,
    require_field,
    require_positive_int,
)
from sparkml_mnist.data.paths import COMPRESSED_SUFFIX, DatasetPaths
from sparkml_mnist.errors import ConfigError, SparkMnistError

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
TEXT_ENCODING = "ascii"
MIRROR_HINT = "use --mirror URL to pick another mirror (alternatives are listed in conf/download.yaml)"

# IDX header: two zero bytes, a data-type code, the number of dimensions, then one big-endian
# uint32 per dimension; the data follows in C order (http://yann.lecun.com/exdb/mnist/).
IDX_TYPE_UBYTE = 0x08
IDX_MAGIC_BYTES = 4
IDX_DIM_BYTES = 4
IDX_IMAGE_DIMS = 3  # images, rows, columns
IDX_LABEL_DIMS = 1
IDX_BYTE_ORDER = "big"

_LOG = logging.getLogger(__name__)


class DownloadError(SparkMnistError):
    """A download, checksum, IDX file or write failed; the message names the URL or file and what to do."""


@dataclass(frozen=True)
class SplitFiles:
    """The two IDX files of one split."""

    images: str
    labels: str


@dataclass(frozen=True)
class DownloadSpec:
    """``conf/download.yaml``: where to fetch, what to expect, how to write."""

    mirror_url: str
    timeout_s: float
    bzip2_level: int
    rows_per_chunk: int
    manifest_file: str
    splits: Mapping[str, SplitFiles]
    checksums: Mapping[str, Mapping[str, str]]  # IDX file name -> {algorithm: lowercase hex}
    source: str

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], source: str) -> "DownloadSpec":
        known = {"mirror_url", "timeout_s", "bzip2_level", "rows_per_chunk", "manifest_file", "splits", "checksums"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; expected {sorted(known)}")
        timeout_s = float(require_field(settings, "timeout_s", float, source))
        if timeout_s <= 0:
            raise ConfigError(f"{source}: field 'timeout_s' must be positive, got {timeout_s}")
        level = require_field(settings, "bzip2_level", int, source)
        if level not in BZIP2_LEVELS:
            raise ConfigError(f"{source}: field 'bzip2_level' must be 1..9, got {level}")
        manifest = require_field(settings, "manifest_file", str, source)
        if not manifest or Path(manifest).name != manifest:
            raise ConfigError(f"{source}: field 'manifest_file' must be a plain file name, got {manifest!r}")
        splits = _splits(require_field(settings, "splits", dict, source), source)
        checksums = require_field(settings, "checksums", dict, source)
        spec = cls(
            mirror_url=require_field(settings, "mirror_url", str, source),
            timeout_s=timeout_s,
            bzip2_level=level,
            rows_per_chunk=require_positive_int(settings, "rows_per_chunk", source),
            manifest_file=manifest,
            splits=splits,
            checksums={str(name): _hashes(value, f"{source}: checksums.{name}") for name, value in checksums.items()},
            source=source,
        )
        missing = sorted(set(spec.file_names()) - set(spec.checksums))
        if missing:
            raise ConfigError(f"{source}: field 'checksums' has no entry for {', '.join(missing)}")
        return spec

    def file_names(self) -> list[str]:
        return [name for files in self.splits.values() for name in (files.images, files.labels)]

    def with_checksums(self, sha256_by_file: Mapping[str, str]) -> "DownloadSpec":
        """Expect these sha256 sums instead of the published ones (a private mirror, or tests)."""
        unknown = sorted(set(sha256_by_file) - set(self.file_names()))
        if unknown:
            raise ConfigError(f"checksums given for unknown file(s) {', '.join(unknown)}; expected {self.file_names()}")
        checksums = dict(self.checksums)
        for name, value in sha256_by_file.items():
            checksums[name] = _hashes({REQUIRED_HASH: value}, f"checksums[{name!r}]")
        return replace(self, checksums=checksums, source=f"{self.source} (with checksums given by the caller)")


def _splits(settings: Mapping[str, Any], source: str) -> dict[str, SplitFiles]:
    if sorted(settings) != sorted(SPLITS):
        raise ConfigError(f"{source}: field 'splits' must name exactly {list(SPLITS)}, got {sorted(settings)}")
    splits = {}
    for split in SPLITS:
        files = settings[split]
        where = f"{source}: splits.{split}"
        if not isinstance(files, dict) or sorted(files) != ["images", "labels"]:
            raise ConfigError(f"{where} must be a mapping with 'images' and 'labels' file names")
        splits[split] = SplitFiles(
            images=require_field(files, "images", str, where), labels=require_field(files, "labels", str, where)
        )
    return splits


def _hashes(settings: Any, where: str) -> dict[str, str]:
    if not isinstance(settings, dict) or REQUIRED_HASH not in settings:
        raise ConfigError(f"{where}: must be a mapping with at least '{REQUIRED_HASH}'")
    hashes = {}
    for algorithm, value in settings.items():
        if algorithm not in HASH_LENGTHS:
            raise ConfigError(f"{where}: unknown checksum {algorithm!r}; expected {', '.join(HASH_LENGTHS)}")
        text = str(value).strip().lower()
        if len(text) != HASH_LENGTHS[algorithm] or any(c not in "0123456789abcdef" for c in text):
            raise ConfigError(f"{where}: {algorithm} must be {HASH_LENGTHS[algorithm]} hex digits, got {value!r}")
        hashes[algorithm] = text
    # The required (strongest) sum is checked and reported first.
    return dict(sorted(hashes.items(), key=lambda item: item[0] != REQUIRED_HASH))


def load_download_spec(path: str | Path | None = None) -> DownloadSpec:
    """``conf/download.yaml`` (or ``path``); read on each call, it is small."""
    source = Path(path) if path is not None else default_conf_file(DOWNLOAD_CONF_FILE)
    return DownloadSpec.from_mapping(load_yaml(source), str(source))


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
        raise DownloadError(f"{target} exists and is not a folder; give a folder for the MNIST files")
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
        raise DownloadError(
            f"mirror {url!r} is not an http://, https:// or file:// URL of a folder; "
            "give e.g. --mirror https://ossci-datasets.s3.amazonaws.com/mnist/"
        )
    text = url.strip()
    return text if text.endswith("/") else text + "/"


def _fetch_verified(mirror: str, name: str, spec: DownloadSpec, say: Callable[[str], None]) -> bytes:
    url = mirror + name
    payload = _fetch(url, spec.timeout_s)
    for algorithm, expected in spec.checksums[name].items():
        actual = hashlib.new(algorithm, payload).hexdigest()
        if actual != expected:
            raise DownloadError(
                f"{name} from {url}: {algorithm} checksum mismatch: expected {expected}, got {actual} "
                f"({len(payload):,} bytes); the download is corrupt or the mirror serves another file; "
                f"retry, or {MIRROR_HINT}"
            )
    say(f"  {name}: {len(payload):,} bytes, {', '.join(spec.checksums[name])} verified")
    return payload


def _fetch(url: str, timeout_s: float) -> bytes:
    """The whole body of ``url``; every failure becomes a DownloadError naming the URL."""
    try:
        with urlopen(url, timeout=timeout_s) as response:
            return response.read()
    except HTTPError as error:
        raise DownloadError(
            f"{url}: HTTP {error.code} {error.reason}; the mirror does not serve this file; {MIRROR_HINT}"
        ) from error
    except URLError as error:
        raise DownloadError(f"cannot reach {url} ({error.reason}); check the network, or {MIRROR_HINT}") from error
    except (OSError, http.client.HTTPException) as error:  # timeouts and broken transfers
        reason = str(error) or type(error).__name__
        raise DownloadError(f"download of {url} failed ({reason}); retry, or {MIRROR_HINT}") from error


# ---------------------------------------------------------------------------------------------
# IDX -> arrays -> LIBSVM text
# ---------------------------------------------------------------------------------------------


def parse_idx(payload: bytes, name: str) -> np.ndarray:
    """A gzip-compressed IDX file of unsigned bytes as an array of its declared shape."""
    try:
        raw = gzip.decompress(payload)
    except (OSError, EOFError, zlib.error) as error:
        raise DownloadError(f"{name}: not a complete gzip file ({error}); {MIRROR_HINT}") from error
    if len(raw) < IDX_MAGIC_BYTES or raw[0] or raw[1]:
        raise DownloadError(f"{name}: not an IDX file (magic number {raw[:IDX_MAGIC_BYTES].hex() or 'missing'})")
    data_type, num_dims = raw[2], raw[3]
    if data_type != IDX_TYPE_UBYTE:
        raise DownloadError(f"{name}: IDX data type 0x{data_type:02x} is not unsigned bytes (0x{IDX_TYPE_UBYTE:02x})")
    header = IDX_MAGIC_BYTES + IDX_DIM_BYTES * num_dims
    if len(raw) < header:
        raise DownloadError(f"{name}: IDX header declares {num_dims} dimensions but the file ends after {len(raw)} bytes")
    dims = tuple(
        int.from_bytes(raw[IDX_MAGIC_BYTES + IDX_DIM_BYTES * i : IDX_MAGIC_BYTES + IDX_DIM_BYTES * (i + 1)], IDX_BYTE_ORDER)
        for i in range(num_dims)
    )
    if len(raw) - header != math.prod(dims):
        raise DownloadError(
            f"{name}: IDX header declares shape {dims} ({math.prod(dims):,} bytes of data) but the file holds "
            f"{len(raw) - header:,}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


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


@lru_cache(maxsize=4)
def _token_table(num_features: int, num_classes: int) -> np.ndarray:
    """Every text piece a line is made of, so a line is a lookup, not a format call per pixel.

    ``feature * 256 + value`` -> ``" <feature+1>:<value>"``; then one entry per label (``"<label>"``)
    and a last one for the line end.
    """
    values = np.iinfo(np.uint8).max + 1
    pieces = [f" {feature + 1}:{value}" for feature in range(num_features) for value in range(values)]
    pieces += [str(label) for label in range(num_classes)] + ["\n"]
    return np.array(pieces, dtype=object)


def libsvm_text(images: np.ndarray, labels: np.ndarray, num_classes: int) -> str:
    """Rows of images (any shape per image, row-major) as LIBSVM lines, exactly SOURCE.md's recipe:
    ``<label>`` then `` <index>:<value>`` for each nonzero pixel (1-based, increasing), then ``\\n``."""
    flat = images.reshape(len(images), -1)
    num_rows, num_features = flat.shape
    table = _token_table(num_features, num_classes)
    label_base = num_features * (np.iinfo(np.uint8).max + 1)
    rows, features = np.nonzero(flat)  # row-major: by row, then by increasing feature
    per_row = np.bincount(rows, minlength=num_rows)
    line_ends = np.cumsum(per_row + 2) - 1  # each line: label, its pixels, newline
    line_starts = line_ends - per_row - 1
    pieces = np.empty(len(rows) + 2 * num_rows, dtype=np.int64)
    is_pixel = np.ones(len(pieces), dtype=bool)
    is_pixel[line_starts] = False
    is_pixel[line_ends] = False
    pieces[line_starts] = label_base + labels.astype(np.int64)
    pieces[line_ends] = len(table) - 1
    pieces[is_pixel] = features.astype(np.int64) * (np.iinfo(np.uint8).max + 1) + flat[rows, features]
    return "".join(table[pieces].tolist())


def _compressed_chunks(images: np.ndarray, labels: np.ndarray, spec: DownloadSpec, num_classes: int) -> Iterator[bytes]:
    """bzip2 output, converting ``rows_per_chunk`` images at a time to bound memory."""
    compressor = bz2.BZ2Compressor(spec.bzip2_level)
    for start in range(0, len(images), spec.rows_per_chunk):
        stop = start + spec.rows_per_chunk
        text = libsvm_text(images[start:stop], labels[start:stop], num_classes)
        yield compressor.compress(text.encode(TEXT_ENCODING))
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
            "sources": {name: spec.checksums[name] for name in spec.file_names()},
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
