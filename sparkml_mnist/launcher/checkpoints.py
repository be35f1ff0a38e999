"""Rank 0's checkpoints as files: on the driver's disk, or in storage every rank reaches (``checkpoint_dir``).

A location is a local path (``/dbfs/...`` and ``/Volumes/...`` are local files on Databricks), or a
``file:``, ``hdfs:``, ``s3a:`` (Hadoop's name, read as ``s3:``), ``s3:``, ``gs:`` or ``abfs:`` URI,
opened through ``pyarrow.fs``. Each checkpoint is two files in its key's folder: the data
(``epoch-000003.ckpt``) and, written last, a small manifest (``epoch-000003.json``: epoch, size, sha256).
Where a rename is atomic (local disks, HDFS) each is written under a temporary name first; on object
stores, whose objects appear whole, the manifest written last is what makes a checkpoint exist. A
checkpoint is taken only when its data matches its manifest's sha256: a torn or corrupt one is named
in a warning and the previous good one is taken instead. The previous one is removed only once the new
one has been read back and checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator
from urllib.parse import urlsplit

from sparkml_mnist.errors import ConfigError, LaunchError

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

logger = logging.getLogger(__name__)

DATA_SUFFIX, MANIFEST_SUFFIX = ".ckpt", ".json"
PARTIAL_SUFFIX = ".partial"  # a file being written under a temporary name (".<name>.partial")
EPOCH_DIGITS = 6
PROBE_PREFIX = ".probe-"
PROBE_BYTES = b"sparkml-mnist checkpoint probe\n"
LOCAL_SCHEME = "file"
# Hadoop's names for S3 -> pyarrow's (the same bucket and key).
SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3"}
# Filesystems (pyarrow's type_name) where a rename replaces the target atomically: a temporary name first.
ATOMIC_RENAME_FILESYSTEMS = ("local", "hdfs")
_DATA = re.compile(rf"^epoch-(\d+){re.escape(DATA_SUFFIX)}$")
_MANIFEST = re.compile(rf"^epoch-(\d+){re.escape(MANIFEST_SUFFIX)}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(LaunchError):
    """A checkpoint's file cannot be written or read, or does not match its sha256; names the file.
    ``reason``: what failed, in one line (the OS's or the filesystem's words), for a caller to reword."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason if reason is not None else message


class Checkpoint:
    """Rank 0's training state after ``epoch`` epochs: opaque bytes (the training side packs them).

    Made with the bytes (``Checkpoint(epoch, data)``), or as a file in checkpoint storage: its
    ``location`` and ``sha256``; then ``data`` reads the file on first use and checks it against the
    sha256 (a ``CheckpointError`` naming the file when they differ).
    """

    __slots__ = ("epoch", "location", "sha256", "_data", "_read")

    def __init__(self, epoch: int, data: bytes | None = None, location: str | None = None,
                 sha256: str | None = None, read: Callable[[str, str], bytes] | None = None) -> None:
        if data is None and (location is None or sha256 is None):
            raise ValueError("a Checkpoint needs its data, or its location and sha256")
        self.epoch = epoch
        self.location = location
        self.sha256 = sha256
        self._data = data
        self._read = read

    @property
    def data(self) -> bytes:
        if self._data is None:
            assert self.location is not None and self.sha256 is not None
            self._data = (self._read or read_verified)(self.location, self.sha256)
        return self._data

    @property
    def loaded(self) -> bool:
        """Whether the bytes are in memory (else ``data`` reads them from ``location``)."""
        return self._data is not None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Checkpoint):
            return NotImplemented
        return (self.epoch, self.location, self.sha256, self._data) == (
            other.epoch, other.location, other.sha256, other._data)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        where = f"location={self.location!r}" if self.location else f"{len(self._data or b'')} bytes"
        return f"Checkpoint(epoch={self.epoch}, {where})"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def valid_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(_SHA256.match(value))


# -- locations -------------------------------------------------------------------------------------


def pyarrow_uri(location: str | Path) -> str:
    """``location`` as pyarrow names it: a path made absolute, Hadoop's ``s3a://`` as ``s3://``."""
    text = os.fspath(location)
    scheme = urlsplit(text).scheme
    if len(scheme) <= 1:  # a path (a one-letter scheme is a Windows drive)
        return os.path.abspath(text)
    alias = SCHEME_ALIASES.get(scheme.lower())
    return alias + text[len(scheme):] if alias else text


def filesystem(location: str | Path) -> tuple[FileSystem, str]:
    """(the filesystem, the path in it) of a location; a ``ConfigError`` naming it when pyarrow cannot open it."""
    from pyarrow.fs import FileSystem, LocalFileSystem

    uri = pyarrow_uri(location)
    if uri.startswith("/"):
        return LocalFileSystem(), uri
    try:
        return FileSystem.from_uri(uri)
    except Exception as error:  # noqa: BLE001 - pyarrow's ArrowInvalid, ArrowNotImplementedError, OSError
        raise ConfigError(
            f"{str(location)!r}: cannot open it ({first_line(error)}); give a local path (/dbfs/..., "
            "/Volumes/... on Databricks) or a file:, hdfs:, s3a:, s3:, gs: or abfs: URI"
        ) from None


def normalized(location: str | Path) -> str:
    """A location as the ranks can use it anywhere: a path made absolute, a URI as given."""
    text = os.fspath(location)
    return os.path.abspath(text) if len(urlsplit(text).scheme) <= 1 else text


def join(location: str, *parts: str) -> str:
    """``location``/``parts``, for a path or a URI (its query, e.g. ``?region=``, kept at the end)."""
    parts = tuple(part for part in parts if part)
    if not parts:
        return location
    split = urlsplit(location)
    if len(split.scheme) <= 1:
        return os.path.join(location, *parts)
    return split._replace(path=split.path.rstrip("/") + "/" + "/".join(parts)).geturl()


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def probe(location: str | Path) -> str:
    """Create the folder, write, read back and delete a small file; the location as given, or a
    ``ConfigError`` in one line naming it and what failed."""
    location = os.fspath(location)
    try:
        fs, root = filesystem(location)
    except ConfigError as error:
        raise ConfigError(f"checkpoint_dir {error}") from None
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    path = f"{root.rstrip('/')}/{name}"
    step = "create the folder"
    try:
        fs.create_dir(root, recursive=True)
        step = "write a file in it"
        _write(fs, path, PROBE_BYTES)
        step = "read a file back from it"
        if _read(fs, path) != PROBE_BYTES:
            raise OSError("what was read differs from what was written")
        step = "delete a file in it"
        fs.delete_file(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises OSError and its own errors
        raise ConfigError(
            f"checkpoint_dir {location!r}: cannot {step} ({first_line(error)}); give a folder that the driver "
            "and every executor can create and write, or leave checkpoint_dir out (checkpoints then travel "
            "to the driver)"
        ) from None
    return location


def read_verified(location: str, sha256: str) -> bytes:
    """A checkpoint file's bytes, checked against ``sha256``."""
    fs, path = filesystem(location)
    return _verified(fs, path, location, sha256)


def _verified(fs: FileSystem, path: str, location: str, sha256: str) -> bytes:
    try:
        data = _read(fs, path)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"{location}: cannot read the checkpoint ({first_line(error)})") from None
    actual = sha256_of(data)
    if actual != sha256:
        raise CheckpointError(f"{location}: corrupt checkpoint: its sha256 is {actual}, its manifest says {sha256}")
    return data


def _name(epoch: int) -> str:
    return f"epoch-{epoch:0{EPOCH_DIGITS}d}"


def _read(fs: FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def _write(fs: FileSystem, path: str, data: bytes) -> None:
    from pyarrow.fs import LocalFileSystem

    if isinstance(fs, LocalFileSystem):  # flushed to the disk before it is renamed or counted on
        with open(path, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        return
    with fs.open_output_stream(path) as out:
        out.write(data)


# -- a run's checkpoint files ---------------------------------------------------------------------


class CheckpointFiles:
    """The checkpoint files under ``location``: one folder per key (the default key "": the folder itself).

    ``fs``: the filesystem to use instead of the one ``location`` names (tests use pyarrow's mock one).
    """

    def __init__(self, location: str | Path, fs: FileSystem | None = None) -> None:
        self.location = normalized(location)
        found, self._root = filesystem(self.location)
        self.fs = fs if fs is not None else found
        self.atomic_rename = self.fs.type_name in ATOMIC_RENAME_FILESYSTEMS

    def folder_location(self, key: str) -> str:
        return join(self.location, key)

    def data_location(self, key: str, epoch: int) -> str:
        """Where ``key``'s checkpoint after ``epoch`` epochs is written."""
        return join(self.folder_location(key), _name(epoch) + DATA_SUFFIX)

    def _folder(self, key: str) -> str:
        return f"{self._root.rstrip('/')}/{key}" if key else self._root

    def write(self, key: str, epoch: int, data: bytes) -> Checkpoint:
        """Keep ``data`` as ``key``'s checkpoint after ``epoch`` epochs: data, then manifest, then checked;
        the older ones are removed only then. Returns it as a file (location and sha256, bytes loaded).

        A write that fails leaves no file of its own behind (the earlier checkpoints stay as they were);
        an epoch that already holds a good checkpoint is kept: the same bytes are that checkpoint, others
        are refused (replacing it in place would leave no good checkpoint while the new one is written)."""
        folder = self._folder(key)
        name = _name(epoch)
        digest = sha256_of(data)
        location = self.data_location(key, epoch)
        manifest = json.dumps({"epoch": epoch, "file": name + DATA_SUFFIX, "bytes": len(data), "sha256": digest})
        existing = self._checked(folder, key, epoch, name + MANIFEST_SUFFIX, quiet=True)
        if existing is not None:
            if existing.sha256 == digest:
                return existing
            raise CheckpointError(f"{location}: already holds another checkpoint after epoch {epoch}; it is kept "
                                  "(a checkpoint is never replaced in place: report a later epoch)",
                                  reason="another checkpoint of that epoch is kept")
        try:
            self.fs.create_dir(folder, recursive=True)
            self._put(folder, name + DATA_SUFFIX, data)
            self._put(folder, name + MANIFEST_SUFFIX, manifest.encode("utf-8"))
            _verified(self.fs, f"{folder}/{name}{DATA_SUFFIX}", location, digest)  # checks out: the older ones go
        except Exception as error:  # noqa: BLE001 - pyarrow raises OSError and its own errors
            self._discard(folder, name)
            if isinstance(error, CheckpointError):
                raise
            raise CheckpointError(f"{location}: cannot write the checkpoint ({first_line(error)}); check that "
                                  "checkpoint_dir is writable from here and has space",
                                  reason=first_line(error)) from None
        older = [entry for entry, found in self._entries(folder) if found < epoch]
        for entry in sorted(older, key=lambda path: not path.endswith(MANIFEST_SUFFIX)):  # manifests first
            self._delete(entry)
        return Checkpoint(epoch, data, location=location, sha256=digest, read=self._reader)

    def _discard(self, folder: str, name: str) -> None:
        """What a failed write of ``name`` left (its temporary files, a data file without its manifest):
        none of it checked out, so none of it is a checkpoint; other epochs are not touched."""
        for file in (name + MANIFEST_SUFFIX, name + DATA_SUFFIX):  # the manifest first: never a manifest alone
            for path in (f"{folder}/.{file}{PARTIAL_SUFFIX}", f"{folder}/{file}"):
                try:
                    self._delete(path)
                except Exception as error:  # noqa: BLE001 - the write's own error is the one to raise
                    logger.warning("%s: cannot remove a failed checkpoint write's file (%s)", path, first_line(error))

    def _put(self, folder: str, name: str, data: bytes) -> None:
        final = f"{folder}/{name}"
        if not self.atomic_rename:  # an object appears whole; the manifest, written last, makes it count
            _write(self.fs, final, data)
            return
        partial = f"{folder}/.{name}{PARTIAL_SUFFIX}"
        _write(self.fs, partial, data)
        try:
            self.fs.move(partial, final)
        except OSError:  # HDFS renames onto no existing file: an earlier write of this epoch is replaced
            self._delete(final)
            self.fs.move(partial, final)

    def latest(self, key: str) -> Checkpoint | None:
        """``key``'s newest checkpoint whose data matches its manifest (bytes loaded); torn or corrupt ones
        are named in a warning and passed over."""
        folder = self._folder(key)
        names = {entry.rsplit("/", 1)[-1] for entry, _ in self._entries(folder)}
        manifests = sorted(((int(m.group(1)), n) for n in names if (m := _MANIFEST.match(n))), reverse=True)
        good = None
        for epoch, name in manifests:
            good = self._checked(folder, key, epoch, name)
            if good is not None:
                break
        newest_good = good.epoch if good is not None else -1
        for name in sorted(names):
            match = _DATA.match(name)
            if match and int(match.group(1)) > newest_good and name[: -len(DATA_SUFFIX)] + MANIFEST_SUFFIX not in names:
                logger.warning("%s: a checkpoint without its manifest (its write did not finish); not taken",
                               join(self.folder_location(key), name))
        return good

    def _checked(self, folder: str, key: str, epoch: int, name: str, quiet: bool = False) -> Checkpoint | None:
        """The checkpoint manifest ``name`` describes, if it and its data check out; ``quiet``: a missing
        manifest is no news (a write looking for an earlier one of its epoch)."""
        where = join(self.folder_location(key), name)
        try:
            manifest = json.loads(_read(self.fs, f"{folder}/{name}"))
            data_name, digest = manifest["file"], manifest["sha256"]
            if manifest["epoch"] != epoch or not valid_sha256(digest) or data_name != _name(epoch) + DATA_SUFFIX:
                raise ValueError("its fields do not match its name")
        except FileNotFoundError:
            if quiet:
                return None
            logger.warning("%s: the checkpoint manifest is gone; not taken", where)
            return None
        except Exception as error:  # noqa: BLE001 - unreadable, not JSON, a field missing
            logger.warning("%s: unreadable checkpoint manifest (%s); not taken", where, first_line(error))
            return None
        location = join(self.folder_location(key), data_name)
        try:
            data = _verified(self.fs, f"{folder}/{data_name}", location, digest)
        except CheckpointError as error:
            logger.warning("%s; not taken, an earlier checkpoint is used if there is one", error)
            return None
        return Checkpoint(epoch, data, location=location, sha256=digest, read=self._reader)

    def stored(self, epoch: int, location: str, sha256: str) -> Checkpoint:
        """A checkpoint of these files known by its location (its bytes are read, and checked, when used)."""
        return Checkpoint(epoch, location=location, sha256=sha256, read=self._reader)

    def _reader(self, location: str, sha256: str) -> bytes:
        relative = self.relative(location)
        if relative is None:
            raise CheckpointError(f"{location}: not a checkpoint under {self.location}")
        return _verified(self.fs, f"{self._root.rstrip('/')}/{relative}", location, sha256)

    def relative(self, location: str) -> str | None:
        """``location``'s path below these files' folder (no ``..``), or None when it is not below it."""
        root, other = urlsplit(self.location), urlsplit(location)
        if len(root.scheme) <= 1:
            root, other = urlsplit(Path(self.location).as_posix()), urlsplit(Path(location).as_posix())
        if (other.scheme, other.netloc, other.query) != (root.scheme, root.netloc, root.query):
            return None
        prefix = root.path.rstrip("/") + "/"
        relative = other.path[len(prefix):] if other.path.startswith(prefix) else ""
        parts = relative.split("/")
        return relative if relative and all(part not in ("", ".", "..") for part in parts) else None

    def keys(self) -> list[str]:
        """The keys that have a folder here, and "" when the folder itself holds checkpoints."""
        from pyarrow.fs import FileType

        keys = []
        for info in self._list(self._root):
            if info.type == FileType.Directory:
                keys.append(info.base_name)
            elif _MANIFEST.match(info.base_name):
                keys.append("")
        return sorted(set(keys))

    def remove_all(self) -> None:
        """Every checkpoint here, and the folder (a run that completed); what cannot be removed is left."""
        try:
            self.fs.delete_dir(self._root)
        except Exception as error:  # noqa: BLE001
            logger.debug("checkpoints in %s not removed: %s", self.location, first_line(error))

    def _entries(self, folder: str) -> Iterator[tuple[str, int]]:
        """(path, epoch) of every checkpoint file, and of every temporary one (epoch -1), in ``folder``."""
        for info in self._list(folder):
            name = info.base_name
            match = _DATA.match(name) or _MANIFEST.match(name)
            if match:
                yield info.path, int(match.group(1))
            elif name.endswith(PARTIAL_SUFFIX):
                yield info.path, -1

    def _list(self, folder: str) -> list:
        from pyarrow.fs import FileSelector

        try:
            return self.fs.get_file_info(FileSelector(folder, allow_not_found=True))
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"{self.location}: cannot list the checkpoints ({first_line(error)})") from None

    def _delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass
